"""How many images, prompts or UNet rows a stage that runs the diffusion model handles at once.

Every stage that touches the diffusion model (VAE and text encoding, the Fisher, unlearning, scoring, D-TRAK's
features, `distill collect`, the planted and counterfactual evaluations) asks `sized` for its batch: the setting when
it is above 0, otherwise as many items as fit in `[memory] budget` × the memory available now (free CUDA memory, or
the RAM the kernel reports available), from a per-item estimate that scales with the model's resolution and widths
(`DiffusionModel.item_bytes`). The result is capped at the batch the product used before sizing existed, so small
models run exactly as they did.

Running out of memory anyway (an estimate is an estimate) stops with one line that names the setting to lower (`guard`);
batch sizes are memory only, so a smaller setting resumes the same run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import AuditError

FALLBACK_BYTES = 4 << 30  # when the platform reports nothing


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can use now: free CUDA memory on a GPU, MemAvailable (RAM) on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return FALLBACK_BYTES


@dataclass(frozen=True)
class Batch:
    """A batch size and where it came from, for the out-of-memory message."""

    size: int
    setting: str  # e.g. "[memory] vae_batch_size"
    auto: bool
    what: str  # e.g. "images per VAE pass"


def sized(
    value: int, setting: str, what: str, item_bytes: float, device: torch.device, budget: float, cap: int
) -> Batch:
    """`value` when above 0; otherwise how many items of `item_bytes` fit in `budget` × the available memory, 1 to `cap`."""
    if value > 0:
        return Batch(int(value), setting, False, what)
    fits = int(budget * available_bytes(device) // max(1.0, item_bytes))
    return Batch(max(1, min(cap, fits)), setting, True, what)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return "can't allocate memory" in text or "out of memory" in text.lower() or "not enough memory" in text
    return False


def out_of_memory_message(batch: Batch, where: str) -> str:
    how = "sized from the memory available" if batch.auto else "as set"
    if batch.size > 1:
        lower = f"set {batch.setting} below {batch.size} in audit.toml"
        if batch.auto:
            lower += " (or lower [memory] budget)"
    elif "backward" in batch.what:
        lower = 'set [memory] gradient_checkpointing = "on" in audit.toml, or free memory'
    else:
        lower = "free memory or use a larger device (the batch is already 1)"
    return (
        f"out of memory {where} with {batch.size} {batch.what} ({how}); {lower} and rerun: batch sizes are memory "
        "only, so the run resumes where it stopped"
    )


@contextlib.contextmanager
def guard(batch: Batch, where: str):
    """An out-of-memory error inside the block becomes one AuditError line naming the setting that sized `batch`."""
    try:
        yield
    except AuditError:
        raise
    except BaseException as exc:
        if is_out_of_memory(exc):
            raise AuditError(out_of_memory_message(batch, where)) from None
        raise
