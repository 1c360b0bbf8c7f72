"""Settings of the stages that have many: their defaults are the workspace defaults (audit.toml)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import ClassVar


class _Section:
    """A settings dataclass read from its audit.toml section; overrides (CLI options, API keywords) win unless None."""

    @classmethod
    def from_config(cls, section: dict, **overrides):
        values = {k: section[k] for k in cls.__dataclass_fields__ if k in section}
        values.update({k: v for k, v in overrides.items() if v is not None and k in cls.__dataclass_fields__})
        return cls(**values)


def _hash(settings, parts) -> str:
    return hashlib.sha256((json.dumps(asdict(settings), sort_keys=True) + "|".join(parts)).encode()).hexdigest()[:16]


def _memory_default(settings):
    """The settings with batch_size at its default: a teacher's batch size trades memory for speed and leaves its scores
    alone, so a run resumed in smaller batches (after running out of memory) is the same run, and hashes made
    before this rule are kept."""
    return replace(settings, batch_size=type(settings).__dataclass_fields__["batch_size"].default)


@dataclass
class IndexSettings(_Section):
    # Below this many training vectors search is exact; from it on an ANN index is built and used.
    ann_threshold: int = 100_000
    index_type: str = "IVF_PQ"
    num_partitions: int = 0  # 0: sqrt(rows), capped at rows / 256
    num_sub_vectors: int = (
        0  # 0: dim / 4, rounded to a divisor of dim (bench_search: recall 0.997 at 10⁶, vs 0.951 with dim / 8)
    )
    nprobes: int = 20
    refine_factor: int = 10
    # Appended rows are searched exactly until they exceed this fraction of the indexed rows.
    rebuild_fraction: float = 0.2


@dataclass
class AbuSettings(_Section):
    """The unlearning teacher's knobs (methods.md §1); every one is recorded with each confirm run."""

    steps: int = 1
    step_size: float = 0.01
    # Draws and Fisher sample set how well the teacher agrees with itself under independent noise: on the example
    # world mAP@10 between two runs went 0.568 (64 draws, 200 samples) → 0.604 (all 1,617 samples) → 0.657 (and 256
    # draws) on 24 queries in 2026-11; with these defaults it is 0.726 on 120 (examples/digits_world/EVAL.md, 12
    # scoring timesteps). Draws cost one backward each per query; the Fisher, once.
    draws: int = 256
    timesteps: int = 20
    candidates: int = 300
    controls: int = 50
    fisher_samples: int = 1000
    damping: float = 0.1
    bias_correction: bool = True
    reference_samples: int = 64
    k: int = 10
    confirm_threshold: float = 0.3
    batch_size: int = 256
    seed: int = 0
    # Bumped when the teacher scores differently under the same settings, so that runs and collections made before
    # are not taken for current ones (2: scoring noise drawn per query, not per candidate).
    scheme: ClassVar[int] = 2

    def reference_key(self, model_hash: str) -> str:
        fields = (
            self.steps,
            self.step_size,
            self.draws,
            self.timesteps,
            self.fisher_samples,
            self.damping,
            self.reference_samples,
            self.seed,
        )
        return hashlib.sha256(f"{model_hash}|{fields}".encode()).hexdigest()[:16]

    def hash(self, *parts: str) -> str:
        return _hash(_memory_default(self), (f"abu-scheme-{self.scheme}", *parts))

    def scoring_hash(self, *parts: str) -> str:
        """hash() of what the scores depend on: not which candidates are picked or how they are judged (candidates,
        controls, k, confirm_threshold), so changing those keeps a collection resumable."""
        return replace(self, candidates=None, controls=None, k=None, confirm_threshold=None).hash(*parts)

    def selection(self) -> dict:
        """The settings that pick and judge the candidates, shared by every teacher so their verdicts compare."""
        return {k: getattr(self, k) for k in ("candidates", "controls", "k", "confirm_threshold", "seed")}


@dataclass
class DtrakSettings(_Section):
    """The gradient teacher's knobs (D-TRAK, methods.md §3; see auditor/dtrak.py)."""

    timesteps: int = 10
    # "kv": the cross-attention key/value projections (what AbU moves); "all": every UNet weight.
    params: str = "kv"
    dim: int = 4096  # k of the random projection
    # λ = damping × trace(ΦᵀΦ)/k, i.e. a fraction of the mean eigenvalue of the projected Gram matrix.
    damping: float = 0.1
    batch_size: int = 16  # samples whose per-sample gradients are held at once
    seed: int = 0

    def feature_key(self) -> str:
        """What the training features Φ depend on besides the model (not λ: the kernel is rebuilt from Φ)."""
        return hashlib.sha256(f"{self.timesteps}|{self.params}|{self.dim}|{self.seed}".encode()).hexdigest()[:12]

    def hash(self, *parts: str) -> str:
        return _hash(_memory_default(self), parts)


@dataclass
class DistillSettings(_Section):
    """FastGDA distillation (methods.md §2): query collection, head training, share calibration."""

    queries: int = 300
    test_fraction: float = 0.2
    candidates: int = 200
    sample_steps: int = 25
    guidance: float = 4.0
    hidden_dims: tuple[int, ...] = (768, 768, 768)
    out_dim: int = 768
    layernorm: bool = True
    dropout: float = 0.1
    # Start from the untuned feature (identity skip, zero last layer); see embed.ProjectionHead.
    residual: bool = True
    # Queries pass through a learned linear map the training side does not (embed.ProjectionHead): the teacher's
    # influence is not symmetric.
    query_map: bool = True
    strengths: bool = True  # a learned influence strength per training image (distill.py)
    strength_decay: float = 1e-4  # L2 on the log strengths, per batch
    epochs: int = 40
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.01
    negatives: float = 0.1
    val_fraction: float = 0.2
    patience: int = 6
    # After early stopping, train again on fit + validation queries for the epochs validation picked (distill.fit).
    refit: bool = True
    ema: float = (
        0.95  # per step: the moving average of the weights that validation scores and the bundle keeps; 0 = off
    )
    k: int = 10
    calibration_k: int = 10
    seed: int = 0


@dataclass
class PlantedSettings(_Section):
    """The planted ground-truth benchmark (AbC, methods.md §4; see auditor/planted.py)."""

    customisations: int = 4
    exemplars: int = 4  # per customisation
    # How exemplars get a style the model has not seen: "palette" (recoloured), "stroke" (mirrored, upside down, bold,
    # thin, in their own colours), "as-is" (one subfolder of --exemplars per customisation, used unchanged).
    style: str = "palette"
    # Caption of the exemplars and prompt of the generations; {word} is the customisation's new word.
    prompt: str = "a handwritten digit in {word} style"
    generations: int = 4  # images generated with each customised model
    # Weights fine-tuned: "kv" (cross-attention keys/values, Custom Diffusion) or "all" (the whole UNet, DreamBooth).
    tune: str = "kv"
    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 8  # half exemplars, half prior-preservation images
    prior_samples: int = 128  # training images (under their captions) that keep the rest of the model as it was
    candidates: int = 100  # fast top-K of the augmented index that AbU and D-TRAK rank (plus the exemplars)
    kernel_samples: int = 256  # training images whose D-TRAK features form the kernel of each customised model
    sample_steps: int = 25
    guidance: float = 4.0
    seed: int = 0

    def hash(self, *parts: str) -> str:
        return _hash(self, parts)


@dataclass
class CounterfactualSettings(_Section):
    """The leave-K-out check (methods.md §1; see auditor/counterfactual.py)."""

    generations: int = 4  # AbU-scored generations checked, distinct prompts first
    k: int = 10  # images left out per generation and method
    methods: tuple[str, ...] = ("fast", "abu", "dtrak")  # those whose scores every checked generation has
    retrain_steps: int = 0  # 0: the model recipe's own length
    loss_timesteps: int = 50
    loss_draws: int = 4  # noise draws per timestep
    sample_steps: int = 30
    guidance: float = 4.0
    seed: int = 0
