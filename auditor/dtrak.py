"""The gradient teacher (D-TRAK, docs/methods.md §3): attribution by projected per-sample gradients.

Output function of a sample x with caption c: f(x) = mean over T evenly spaced
timesteps of ‖model(x_t, t, c)‖², with noise fixed per sample (seeded by its id, as
AbU's scoring is). D-TRAK found the squared norm of the predicted noise beats the
training loss as f; for a v-prediction (or sample-prediction) model we take the model
output as it is — its squared norm is the analogous "how strongly does the model
push" quantity, and converting v to ε would mix the input into the gradient. When the
model was trained with random flips, a training image's f is averaged over it and its
flip (what training saw).

Features φ(x) = P ∇θ f(x), θ = the cross-attention K/V (default) or every UNet weight,
P a CountSketch projection to k dims: each coordinate of each parameter tensor goes to
one of k buckets with a random sign, both drawn from a generator seeded by (seed,
tensor name). It is unbiased for inner products with the same variance as a dense
Gaussian projection, (‖a‖²‖b‖² + ⟨a,b⟩² − 2Σa_j²b_j²)/k, costs O(parameters) per
sample and stores one bucket and sign per coordinate instead of a k × parameters
matrix (which for SD's K/V alone would be 80 G entries). Per-sample gradients come
block-wise (`batch_size` samples at once) from torch.func.vmap.

Φ (training features) is computed once per model and settings into the Lance table
`dtrak_<model hash>_<settings key>` (id, vector), resumable block by block. The kernel
K = (ΦᵀΦ + λI)⁻¹, λ = damping × trace(ΦᵀΦ)/k (a fraction of its mean eigenvalue, so
the ranking does not depend on the gradients' scale and K stays well-conditioned when
there are fewer training images than k), is cached in the workspace. The score of a
candidate i for a query x̂ is φ(x̂)ᵀ K φ_i.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import lancedb
import numpy as np
import pyarrow as pa
import torch
from torch.func import functional_call, grad, vmap

from .config import DtrakSettings
from .diffusion import DiffusionModel, TrainingSet, evenly_spaced_timesteps, fixed_noise, parameter_set
from .errors import AuditError
from .progress import Progress, Silent
from .workspace import Workspace


class Projection:
    """CountSketch of a parameter-shaped gradient into `dim` buckets (see the module docstring)."""

    def __init__(self, shapes: dict[str, torch.Size], dim: int, seed: int, device: torch.device):
        self.dim = dim
        self.buckets: dict[str, torch.Tensor] = {}
        self.signs: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            # Drawn on the CPU from a per-tensor seed: the same projection on every device and in every process.
            gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}|{name}".encode()).hexdigest()[:15], 16))
            n = int(np.prod(shape))
            self.buckets[name] = torch.randint(0, dim, (n,), generator=gen).to(device)
            self.signs[name] = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1).to(device)

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, *shape)} → (B, dim)."""
        first = next(iter(grads.values()))
        out = torch.zeros(len(first), self.dim, device=first.device, dtype=torch.float32)
        for name, g in grads.items():
            out.index_add_(1, self.buckets[name], g.reshape(len(g), -1).float() * self.signs[name])
        return out


@contextlib.contextmanager
def _plain_attention(unet: torch.nn.Module):
    """vmap has no batching rule for the fused attention kernels and falls back to a slow per-sample loop (with a
    warning); the plain attention processor computes the same attention with batched matmuls."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


class GradientFeatures:
    """φ(x) for batches of samples, `batch_size` per-sample gradients at a time."""

    def __init__(self, model: DiffusionModel, settings: DtrakSettings):
        self.model = model
        self.settings = settings
        self.params = parameter_set(model.unet, settings.params, "dtrak.params")
        self.projection = Projection(
            {n: p.shape for n, p in self.params.items()}, settings.dim, settings.seed, model.device
        )
        self.timesteps = evenly_spaced_timesteps(settings.timesteps, model.num_train_timesteps).to(model.device)

    def _output(
        self, params: dict, noisy: torch.Tensor, text_emb: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """f of one sample: its noisy latents at every scoring timestep (T, C, H, W) and caption embedding (S, D)."""
        pred = functional_call(
            self.model.unet, params, (noisy, timesteps), {"encoder_hidden_states": text_emb.expand(len(noisy), -1, -1)}
        ).sample
        return pred.float().pow(2).flatten(1).sum(1).mean()

    def __call__(
        self, latents: torch.Tensor, text_emb: torch.Tensor, ids, seed: int, flipped: torch.Tensor | None = None
    ) -> np.ndarray:
        """(n, dim) features; noise seeded by (seed, id); with `flipped`, f averages the image and its flip."""
        dev, n_t = self.model.device, len(self.timesteps)
        params = {name: p.detach() for name, p in self.params.items()}
        per_sample = vmap(grad(self._output), in_dims=(None, 0, 0, None))
        out = []
        with _plain_attention(self.model.unet):
            for start in range(0, len(latents), self.settings.batch_size):
                sl = slice(start, start + self.settings.batch_size)
                views = [latents[sl]] if flipped is None else [latents[sl], flipped[sl]]
                noise = fixed_noise(ids[sl], n_t, tuple(latents.shape[1:]), seed).to(dev)
                timesteps = self.timesteps.repeat(len(views))
                noisy = torch.cat([self._noisy(v.to(dev), noise) for v in views], dim=1)  # (b, views × T, C, H, W)
                grads = per_sample(params, noisy, text_emb[sl].to(dev), timesteps)
                out.append(self.projection(grads).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.settings.dim), np.float32)

    def _noisy(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        b, n_t = noise.shape[:2]
        x = latents[:, None].expand(b, n_t, *latents.shape[1:]).reshape(b * n_t, *latents.shape[1:])
        noisy = self.model.scheduler.add_noise(x, noise.reshape(b * n_t, *noise.shape[2:]), self.timesteps.repeat(b))
        return noisy.view(b, n_t, *latents.shape[1:])


class FeatureTable:
    """Training features Φ in a Lance table (id, vector)."""

    def __init__(self, uri: str, name: str, dim: int):
        self.name = name
        self.dim = dim
        db = lancedb.connect(uri)
        try:
            self.table = db.open_table(name)
        except (ValueError, FileNotFoundError):
            schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])
            self.table = db.create_table(name, schema=schema)

    @property
    def version(self) -> int:
        return int(self.table.version)

    def ids(self) -> np.ndarray:
        return self.table.to_lance().to_table(columns=["id"])["id"].to_numpy()

    def add(self, ids, vectors: np.ndarray) -> None:
        self.table.add(
            pa.table(
                {
                    "id": pa.array(np.asarray(ids), pa.int64()),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), self.dim),
                }
            )
        )

    def get(self, ids) -> np.ndarray:
        """The features of these ids, in that order."""
        data = self.table.to_lance().to_table(
            columns=["id", "vector"], filter=f"id IN ({','.join(str(int(i)) for i in ids)})"
        )
        found = dict(zip(data["id"].to_numpy().tolist(), _matrix(data["vector"], self.dim)))
        return np.stack([found[int(i)] for i in ids])

    def blocks(self, rows: int = 8192) -> Iterator[np.ndarray]:
        for batch in self.table.to_lance().to_batches(columns=["vector"], batch_size=rows):
            yield _matrix(batch["vector"], self.dim)


def _matrix(column, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy().reshape(-1, dim)


def kernel(blocks: Iterable[np.ndarray], dim: int, damping: float) -> tuple[np.ndarray, float]:
    """(K, λ): K = (ΦᵀΦ + λI)⁻¹ with λ = damping × trace(ΦᵀΦ)/dim, ΦᵀΦ accumulated block by block in float64."""
    gram = np.zeros((dim, dim))
    for block in blocks:
        block = block.astype(np.float64)
        gram += block.T @ block
    lam = damping * float(np.trace(gram)) / dim
    if not lam > 0:
        raise AuditError(
            "the D-TRAK training features are all zero; the model's output does not depend on the chosen parameters"
        )
    gram[np.diag_indices(dim)] += lam
    return np.linalg.inv(gram).astype(np.float32), lam


class DtrakTeacher:
    """D-TRAK on one model and training set, speaking confirm's teacher protocol."""

    method = "dtrak"

    def __init__(self, training: TrainingSet, settings: DtrakSettings, table: FeatureTable):
        self.training = training
        self.model = training.model
        self.settings = settings
        self.table = table
        self.features = GradientFeatures(self.model, settings)
        self.kernel: np.ndarray | None = None
        self.lam: float | None = None

    @classmethod
    def for_workspace(
        cls,
        ws: Workspace,
        training: TrainingSet,
        settings: DtrakSettings,
        progress: Progress | None = None,
        announce: Callable[[str], None] = lambda message: None,
    ) -> DtrakTeacher:
        """Φ of every registered training image in the workspace's LanceDB (computed once), and the cached kernel."""
        name = f"dtrak_{training.model.hash}_{settings.feature_key()}"
        teacher = cls(training, settings, FeatureTable(ws.lancedb_uri, name, settings.dim))
        teacher.fill(training.ids, progress, announce)
        cache = ws.dir / "cache" / f"dtrak-kernel-{name}-v{teacher.table.version}-{settings.damping}.npz"
        if cache.is_file():
            saved = np.load(cache)
            teacher.kernel, teacher.lam = saved["kernel"], float(saved["lam"])
        else:
            teacher.kernel, teacher.lam = kernel(teacher.table.blocks(), settings.dim, settings.damping)
            cache.parent.mkdir(parents=True, exist_ok=True)
            for stale in cache.parent.glob(f"dtrak-kernel-{name}-*.npz"):
                stale.unlink()  # kernels of earlier versions of this table (before images were added)
            np.savez(cache, kernel=teacher.kernel, lam=teacher.lam)
        return teacher

    def training_features(self, ids, seed: int) -> np.ndarray:
        latents, flipped, captions = self.training.encode(ids)
        return self.features(latents, captions, ids, seed, flipped if self.model.flip_augmentation else None)

    def fill(
        self,
        ids,
        progress: Progress | None = None,
        announce: Callable[[str], None] = lambda message: None,
        block: int = 256,
    ) -> None:
        """Compute and append the features of the ids the table lacks, a block at a time (an interrupted run resumes)."""
        missing = np.setdiff1d(np.asarray(ids), self.table.ids())
        if not len(missing):
            return
        progress = progress or Silent()
        t0 = time.perf_counter()
        first = missing[: min(len(missing), self.settings.batch_size)]
        self.table.add(first, self.training_features(first, self.settings.seed))
        per_sample = (time.perf_counter() - t0) / len(first)
        announce(
            f"D-TRAK: computing the gradient features of {len(missing)} training images (once per model and settings); "
            f"estimated {per_sample * len(missing):.0f} s"
        )
        progress.start("D-TRAK features", len(missing))
        progress.advance(len(first))
        for start in range(len(first), len(missing), block):
            chunk = missing[start : start + block]
            self.table.add(chunk, self.training_features(chunk, self.settings.seed))
            progress.advance(len(chunk))

    def query_feature(self, image, prompt: str | None, seed: int, stream: int) -> np.ndarray:
        """φ(x̂) of a generation; its noise is seeded by its id in a stream of its own (no training image shares it)."""
        latent = self.model.latents(self.model.pixels(image)[None]).cpu()
        return self.features(latent, self.model.text_embeddings([prompt]).cpu(), [seed], self.settings.seed + stream)[0]

    # ------------------------------------------------------------------ the teacher protocol
    def describe(self) -> str:
        return f"D-TRAK, {self.settings.timesteps} timesteps, {self.settings.params} parameters projected to {self.settings.dim}"

    def record(self) -> dict:
        return {
            **asdict(self.settings),
            "lambda": self.lam,
            "feature_table": self.table.name,
            "flip": self.model.flip_augmentation,
        }

    def score(self, image, prompt, candidate_ids, seed):
        scores = self.table.get(candidate_ids).astype(np.float64) @ (
            self.kernel @ self.query_feature(image, prompt, seed, 1)
        )
        return scores, scores

    def noise_floor(self, image, prompt, candidate_ids, seed, raw) -> float:
        """Query and candidates re-featurised with independent noise (same kernel): floor = std(s_a − s_b)/√2."""
        query = self.kernel @ self.query_feature(image, prompt, seed, 2)
        raw_b = self.training_features(candidate_ids, self.settings.seed + 3).astype(np.float64) @ query
        return float(np.std(raw - raw_b) / np.sqrt(2))

    def estimate(self, n_generations: int, n_candidates: int) -> float:
        """Seconds for the run: one feature per generation, plus the candidates again for the noise floor."""
        probe = self.training.ids[: min(2, len(self.training.ids))]
        t0 = time.perf_counter()
        self.training_features(probe, self.settings.seed)
        per_sample = (time.perf_counter() - t0) / len(probe)
        return per_sample * (n_generations + n_candidates + 1)
