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
one sample at a time, its (view × timestep) rows in chunks of `batch_size` whose
gradients add up (f is their mean), through the UNet as it runs everywhere else:
scaled-dot-product attention and, where memory asks for it, gradient checkpointing.
(torch.func.vmap over samples needed plain attention — it has no batching rule for the
fused kernels — which materialises a heads × tokens² matrix per row, 537 MB at 512 px,
and held every sample of a block at once.)

Φ (training features) is computed once per model and settings into the Lance table
`dtrak_<model hash>_<settings key>` (id, vector), saved as it is computed (at least
every `SAVE_SECONDS`), so a run that fails or is killed resumes with what it had. The kernel
K = (ΦᵀΦ + λI)⁻¹, λ = damping × trace(ΦᵀΦ)/k (a fraction of its mean eigenvalue, so
the ranking does not depend on the gradients' scale and K stays well-conditioned when
there are fewer training images than k), is cached in the workspace. The score of a
candidate i for a query x̂ is φ(x̂)ᵀ K φ_i.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import lancedb
import numpy as np
import pyarrow as pa
import torch

from . import cost, memory
from .config import DtrakSettings
from .diffusion import DiffusionModel, TrainingSet, evenly_spaced_timesteps, fixed_noise, parameter_set, trainable
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


SAVE_SECONDS = 60.0  # training features are written to their table at least this often


class GradientFeatures:
    """φ(x) for batches of samples, one sample's per-sample gradient at a time."""

    def __init__(self, model: DiffusionModel, settings: DtrakSettings):
        self.model = model
        self.settings = settings
        self.params = parameter_set(model.unet, settings.params, "dtrak.params")
        self.projection = Projection(
            {n: p.shape for n, p in self.params.items()}, settings.dim, settings.seed, model.device
        )
        self.timesteps = evenly_spaced_timesteps(settings.timesteps, model.num_train_timesteps).to(model.device)

    def batch(self) -> memory.Batch:
        return self.model.batch("gradient", self.settings.batch_size, "[dtrak] batch_size")

    def __call__(
        self, latents: torch.Tensor, text_emb: torch.Tensor, ids, seed: int, flipped: torch.Tensor | None = None
    ) -> np.ndarray:
        """(n, dim) features; noise seeded by (seed, id); with `flipped`, f averages the image and its flip."""
        return np.concatenate(
            list(self.each(latents, text_emb, ids, seed, flipped)) or [np.zeros((0, self.settings.dim), np.float32)]
        )

    def each(
        self, latents: torch.Tensor, text_emb: torch.Tensor, ids, seed: int, flipped: torch.Tensor | None = None
    ) -> Iterator[np.ndarray]:
        """The (1, dim) feature of each sample in turn, as `__call__` computes them."""
        dev, n_t = self.model.device, len(self.timesteps)
        batch = self.batch()
        params = list(self.params.values())
        with trainable(self.params), memory.guard(batch, "computing D-TRAK's per-sample gradients"):
            for i in range(len(latents)):
                views = [latents[i]] if flipped is None else [latents[i], flipped[i]]
                noise = fixed_noise(ids[i : i + 1], n_t, tuple(latents.shape[1:]), seed)[0].to(dev)
                noisy = torch.cat([self._noisy(v.to(dev), noise) for v in views])  # (views × T, C, H, W)
                timesteps = self.timesteps.repeat(len(views))
                text = text_emb[i].to(dev)
                total = [torch.zeros_like(p) for p in params]
                for start in range(0, len(noisy), batch.size):
                    rows = slice(start, start + batch.size)
                    pred = self.model.predict(noisy[rows], timesteps[rows], text.expand(len(noisy[rows]), -1, -1))
                    # f is the mean over all the sample's rows: each chunk adds its share of the gradient.
                    part = pred.float().pow(2).flatten(1).sum(1).sum() / len(noisy)
                    for acc, g in zip(total, torch.autograd.grad(part, params)):
                        acc += g
                grads = {name: g[None] for name, g in zip(self.params, total)}
                yield self.projection(grads).cpu().numpy()

    def _noisy(self, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One sample's latent (C, H, W) noised at every scoring timestep with its noise (T, C, H, W)."""
        x = latent[None].expand(len(noise), *latent.shape)
        return self.model.scheduler.add_noise(x, noise, self.timesteps)


class FeatureTable:
    """Training features Φ in a Lance table (id, vector), created with its first rows."""

    def __init__(self, uri: str, name: str, dim: int, storage_options: dict[str, str] | None = None):
        self.name = name
        self.dim = dim
        self.db = lancedb.connect(uri, storage_options=storage_options or None)
        try:
            self.table = self.db.open_table(name)
        except (ValueError, FileNotFoundError):
            self.table = None

    @property
    def version(self) -> int:
        return int(self.table.version) if self.table is not None else 0

    def ids(self) -> np.ndarray:
        if self.table is None:
            return np.zeros(0, np.int64)
        return self.table.to_lance().to_table(columns=["id"])["id"].to_numpy()

    def add(self, ids, vectors: np.ndarray) -> None:
        data = pa.table(
            {
                "id": pa.array(np.asarray(ids), pa.int64()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), self.dim),
            }
        )
        if self.table is None:
            self.table = self.db.create_table(self.name, data)
        else:
            self.table.add(data)

    def get(self, ids) -> np.ndarray:
        """The features of these ids, in that order."""
        data = self.table.to_lance().to_table(
            columns=["id", "vector"], filter=f"id IN ({','.join(str(int(i)) for i in ids)})"
        )
        found = dict(zip(data["id"].to_numpy().tolist(), _matrix(data["vector"], self.dim)))
        return np.stack([found[int(i)] for i in ids])

    def blocks(self, rows: int = 8192) -> Iterator[np.ndarray]:
        if self.table is None:
            return
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
        self.cache_dir = None

    @classmethod
    def for_workspace(
        cls,
        ws: Workspace,
        training: TrainingSet,
        settings: DtrakSettings,
        progress: Progress | None = None,
        announce: Callable[[str], None] = lambda message: None,
        prepare: bool = True,
    ) -> DtrakTeacher:
        """The teacher over the workspace's LanceDB; `prepare` (or a later `prepare()`) computes Φ of every
        registered training image (once, resumable) and the cached kernel."""
        name = f"dtrak_{training.model.hash}_{settings.feature_key()}"
        teacher = cls(training, settings, FeatureTable(ws.lancedb_uri, name, settings.dim, ws.storage_options))
        teacher.cache_dir = ws.dir / "cache"
        if prepare:
            teacher.prepare(progress, announce)
        return teacher

    def prepare(self, progress: Progress | None = None, announce: Callable[[str], None] = lambda message: None) -> None:
        """Φ of every training image (what the table lacks) and the kernel, cached by the table's version."""
        settings, name = self.settings, self.table.name
        self.fill(self.training.ids, progress, announce)
        cache = self.cache_dir / f"dtrak-kernel-{name}-v{self.table.version}-{settings.damping}.npz"
        if cache.is_file():
            saved = np.load(cache)
            self.kernel, self.lam = saved["kernel"], float(saved["lam"])
        else:
            self.kernel, self.lam = kernel(self.table.blocks(), settings.dim, settings.damping)
            cache.parent.mkdir(parents=True, exist_ok=True)
            for stale in cache.parent.glob(f"dtrak-kernel-{name}-*.npz"):
                stale.unlink()  # kernels of earlier versions of this table (before images were added)
            np.savez(cache, kernel=self.kernel, lam=self.lam)

    def training_features(self, ids, seed: int) -> np.ndarray:
        latents, flipped, captions = self.training.encode(ids)
        return self.features(latents, captions, ids, seed, flipped if self.model.flip_augmentation else None)

    def fill(
        self,
        ids,
        progress: Progress | None = None,
        announce: Callable[[str], None] = lambda message: None,
    ) -> None:
        """Compute and append the features of the ids the table lacks, a VAE batch of images at a time, each feature
        saved with its block or after at most SAVE_SECONDS: a run that fails or is killed resumes with what it saved."""
        missing = np.setdiff1d(np.asarray(ids), self.table.ids())
        if not len(missing):
            return
        progress = progress or Silent()
        announce(
            f"D-TRAK: computing the gradient features of {len(missing)} training images (once per model and settings; "
            "saved as they are computed)"
        )
        progress.start("D-TRAK features", len(missing))
        step = self.model.batch("vae").size
        flip = self.model.flip_augmentation
        done: list[int] = []
        vectors: list[np.ndarray] = []
        saved_at = time.perf_counter()

        def save() -> None:
            nonlocal saved_at
            if done:
                self.table.add(done, np.concatenate(vectors))
                done.clear()
                vectors.clear()
            saved_at = time.perf_counter()

        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            latents, flipped, captions = self.training.encode(chunk)
            for i, vector in zip(
                chunk, self.features.each(latents, captions, chunk, self.settings.seed, flipped if flip else None)
            ):
                done.append(int(i))
                vectors.append(vector)
                progress.advance()
                if time.perf_counter() - saved_at >= SAVE_SECONDS:
                    save()
            save()

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

    def estimate(self, n_generations: int, n_candidates: int) -> cost.Estimate:
        """Seconds per phase, from operations timed on one training image (cost.probe) before any heavy work: the
        training features the table lacks, one feature per generation, and the candidates again for each generation's noise floor."""
        return self.phases(cost.probe(self.training, self.features.params), n_generations, n_candidates)

    def phases(self, t: cost.Timings, n_generations: int, n_candidates: int) -> cost.Estimate:
        flip = self.model.flip_augmentation
        rows = self.settings.timesteps * cost.views(flip)
        missing = len(np.setdiff1d(self.training.ids, self.table.ids()))
        query = t.vae + t.text + self.settings.timesteps * t.gradient
        return cost.rounded(
            {
                "training features (once per model and settings)": cost.encoding(t, missing, flip)
                + missing * rows * t.gradient,
                f"query features ({n_generations} generation(s))": n_generations * query,
                f"noise floor ({n_generations} generation(s))": n_generations
                * (query + cost.encoding(t, n_candidates, flip) + n_candidates * rows * t.gradient),
            }
        )
