"""Features several stages share: untuned image and text embeddings of training images and queries, their joint
(image ⊕ text) vector, and a distilled head's scores over them. Used by distillation, evaluation, the planted and
the leave-K-out checks; the scan and index paths embed through embed.Encoder directly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import embed, ingest
from .store import Store
from .workspace import Workspace


def embed_images(encoder: embed.Encoder, images, texts, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Untuned (image, text) embeddings, each L2-normalised, for PIL images and their prompts."""
    img, txt = [], []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([encoder.preprocess(im) for im in images[start : start + batch_size]])
        img.append(encoder.embed_images(pixels).cpu().numpy())
        txt.append(encoder.embed_texts(list(texts[start : start + batch_size])).cpu().numpy())
    return np.concatenate(img), np.concatenate(txt)


def training_embeddings(
    ws: Workspace, store: Store, encoder: embed.Encoder
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, image embeddings, caption embeddings) of every training image, cached per encoder in the workspace."""
    rows = store.rows("SELECT id, path, caption FROM training_images ORDER BY id")
    ids = np.array([r[0] for r in rows], np.int64)
    cache = ws.dir / "cache" / f"embeddings-{encoder.id}.npz"
    if cache.is_file():
        saved = np.load(cache)
        if np.array_equal(saved["ids"], ids):
            return ids, saved["image"], saved["text"]
    limits, reduce_to = ws.limits, encoder.preprocess.min_decode_size  # decoded as `audit index` decodes them
    images = [ingest.decode(ingest.read_bytes(r[1], limits), limits, reduce_to)[0] for r in rows]
    img, txt = embed_images(encoder, images, [r[2] for r in rows])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=ids, image=img, text=txt)
    return ids, img, txt


def training_digests(store: Store) -> list[str]:
    """The sha256 of every training image, in the row order of training_embeddings: how bundles key strengths."""
    return [r[0] for r in store.rows("SELECT sha256 FROM training_images ORDER BY id")]


def head_space_scores(
    head: embed.ProjectionHead, q_feat: np.ndarray, t_feat: np.ndarray, strength: np.ndarray | None
) -> np.ndarray:
    """Queries × training rows from untuned image ⊕ text features: the inner product the index searches."""
    with torch.no_grad():
        t_out = head(torch.as_tensor(t_feat, dtype=torch.float32)).numpy()
        q_out = head(torch.as_tensor(q_feat, dtype=torch.float32), query=True).numpy()
    return q_out @ (t_out if strength is None else t_out * strength[:, None]).T


def head_scores(encoder: embed.Encoder, q_feat: np.ndarray, t_feat: np.ndarray, digests: list[str]) -> np.ndarray:
    """A distilled bundle's scores (queries × training images), as its index ranks them."""
    return head_space_scores(encoder.head, q_feat, t_feat, encoder.strength(digests))


def joint(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    x = np.concatenate([img, txt], axis=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def query_embeddings(encoder: embed.Encoder, queries, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Image and prompt features of load_rankings' queries and images."""
    return embed_images(encoder, images, [q[2] for q in queries])


def fast_space(encoder: embed.Encoder, img: np.ndarray, txt: np.ndarray):
    """(training rows, query map): untuned (image, text) embeddings in the space the encoder's index searches (its
    head and strengths when it has them); score = rows @ query_map(query image, query text)."""

    def features(i, t, query=True):
        return (
            encoder.combine(
                torch.as_tensor(i, device=encoder.device), torch.as_tensor(t, device=encoder.device), query=query
            )
            .cpu()
            .numpy()
        )

    return features(img, txt, query=False), features
