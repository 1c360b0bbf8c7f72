"""What every teacher offers `audit confirm`, and what they all start from.

A teacher is the slow, faithful attribution method that checks the fast path: AbU
(abu.py, unlearning) or D-TRAK (dtrak.py, projected gradients). Each is built on the
workspace's diffusion model and registered training images (`training_set`) and
speaks the protocol below, so `confirm`, `distill` and the evaluations drive either
the same way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from . import cost, diffusion, families
from .store import Store
from .workspace import Workspace


class Teacher(Protocol):
    """What `confirm` needs from a teacher; AbU (abu.AbuTeacher) and D-TRAK (dtrak.DtrakTeacher) provide it."""

    method: str

    def describe(self) -> str: ...  # its cost knobs, for the announcement

    def estimate(self, n_generations: int, n_candidates: int) -> cost.Estimate:
        """Seconds per phase of a run, from a probe on one training image; nothing heavy runs before it."""

    def prepare(self, progress, announce) -> None:
        """The once-per-model work (AbU's Fisher and reference update, D-TRAK's training features and kernel)."""

    def record(self) -> dict: ...  # its settings, stored in confirm_runs.settings

    def score(self, image, prompt: str | None, candidate_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw, influence) per candidate; `seed` (the generation id) fixes the query's own randomness."""

    def noise_floor(
        self, image, prompt: str | None, candidate_ids: np.ndarray, seed: int, influence: np.ndarray
    ) -> float:
        """The spread of `influence` (score's second result, what verdicts rank by) that independent noise alone
        produces, in its units."""


def training_set(
    ws: Workspace, store: Store, model: families.Source, device: torch.device, flip: str
) -> diffusion.TrainingSet:
    """The workspace's diffusion model and its registered training images."""
    loaded = diffusion.load(model, device, ws.dir / "cache", flip, ws.config.memory)
    return diffusion.TrainingSet(loaded, registered(store), ws.limits, ws.storage)


def registered(store: Store) -> list[tuple]:
    """The registered training images as diffusion.TrainingSet reads them: id, path, caption and where in a shard."""
    return store.rows("SELECT id, path, caption, shard, shard_member, shard_key FROM training_images ORDER BY id")
