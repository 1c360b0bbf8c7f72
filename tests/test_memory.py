"""Memory-bounded teachers: batches sized from the memory available or the settings, out-of-memory errors as one line
naming the setting, the estimate before any heavy work (`--dry-run`), D-TRAK resuming from saved features."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from auditor import confirm, diffusion, dtrak, memory, sql
from auditor.abu import Unlearner
from auditor.config import ConfirmSettings, MemorySettings
from auditor.errors import AuditError

from .helpers import audit, sql_value

MiB = 1 << 20


def _recording(monkeypatch, module, method: str) -> list[int]:
    """The batch sizes `module.method` is called with, as it runs."""
    sizes: list[int] = []
    original = getattr(module, method)

    def wrapper(x, *args, **kwargs):
        sizes.append(len(x))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(module, method, wrapper)
    return sizes


def test_vae_and_text_batches_follow_the_setting_and_the_memory_available(model, monkeypatch):
    pixels = torch.rand(10, 3, model.resolution, model.resolution) * 2 - 1
    prompts = [f"a red digit {i}" for i in range(10)]
    whole = dataclasses.replace(model, memory=MemorySettings(vae_batch_size=64, text_batch_size=64))
    expected_latents, expected_text = whole.latents(pixels), whole.text_embeddings(prompts)

    vae_sizes = _recording(monkeypatch, model.vae, "encode")
    text_sizes = _recording(monkeypatch, model.text_encoder, "forward")
    # As set.
    small = dataclasses.replace(model, memory=MemorySettings(vae_batch_size=3, text_batch_size=4))
    torch.testing.assert_close(small.latents(pixels), expected_latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(small.text_embeddings(prompts), expected_text, rtol=1e-4, atol=1e-5)
    assert (vae_sizes, text_sizes) == ([3, 3, 3, 1], [4, 4, 2])

    # Automatic (0): as many as fit in the budget of the memory available, per the model's own size.
    vae_sizes.clear()
    text_sizes.clear()
    auto = dataclasses.replace(model, memory=MemorySettings(budget=0.5))
    per_image = auto.item_bytes("vae")
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(2 * 4 * per_image))  # budget: 4 images
    assert auto.batch("vae") == memory.Batch(4, "[memory] vae_batch_size", True, "images per VAE pass")
    torch.testing.assert_close(auto.latents(pixels), expected_latents, rtol=1e-4, atol=1e-5)
    assert vae_sizes == [4, 4, 2]
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(2 * 3 * auto.item_bytes("text")))
    torch.testing.assert_close(auto.text_embeddings(prompts), expected_text, rtol=1e-4, atol=1e-5)
    assert text_sizes == [3, 3, 3, 1]
    # Plenty of memory: the batch the product always used, no more.
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 50)
    assert auto.batch("vae").size == 64 and auto.batch("forward").size == 256
    # Less memory per row for a bigger model: the estimate scales with resolution and width.
    assert auto.item_bytes("gradient", checkpointing=True) < auto.item_bytes("gradient", checkpointing=False)


def test_unet_rows_follow_the_teacher_setting(model, monkeypatch):
    fisher = {name: torch.ones_like(p) for name, p in diffusion.kv_parameters(model.unet).items()}
    unlearner = Unlearner(model, ConfirmSettings(timesteps=3, batch_size=4), fisher, n_train=10)
    sizes = _recording(monkeypatch, model.unet, "forward")
    latents = torch.randn(3, 4, 8, 8)
    text = model.text_embeddings(["a", "b", "c"])
    expected = Unlearner(model, ConfirmSettings(timesteps=3, batch_size=64), fisher, 10).losses(
        np.arange(3), latents, text
    )
    sizes.clear()
    np.testing.assert_allclose(unlearner.losses(np.arange(3), latents, text), expected, rtol=1e-5)
    assert sizes == [4, 4, 1]  # 3 candidates × 3 timesteps = 9 rows


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 8589934592 bytes"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
        MemoryError(),
    ],
)
def test_out_of_memory_in_a_stage_is_one_line_naming_the_setting(model, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    small = dataclasses.replace(model, memory=MemorySettings(vae_batch_size=8))
    monkeypatch.setattr(model.vae, "encode", fail)
    with pytest.raises(AuditError) as info:
        small.latents(torch.zeros(2, 3, model.resolution, model.resolution))
    message = str(info.value)
    assert "\n" not in message and "[memory] vae_batch_size below 8" in message and "VAE" in message

    monkeypatch.setattr(model.unet, "forward", fail)
    fisher = {name: torch.ones_like(p) for name, p in diffusion.kv_parameters(model.unet).items()}
    unlearner = Unlearner(model, ConfirmSettings(timesteps=2, batch_size=16), fisher, n_train=10)
    with pytest.raises(AuditError, match=r"scoring candidates with 16 UNet rows .*\[confirm\] batch_size below 16"):
        unlearner.losses(np.arange(2), torch.zeros(2, 4, 8, 8), model.text_embeddings(["a", "b"]))
    # Anything else is not dressed up as a memory problem.
    monkeypatch.setattr(model.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        unlearner.losses(np.arange(2), torch.zeros(2, 4, 8, 8), model.text_embeddings(["a", "b"]))


def test_out_of_memory_in_confirm_names_the_setting(scanned_ws, monkeypatch):
    from diffusers import AutoencoderKL

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")

    monkeypatch.setattr(AutoencoderKL, "encode", fail)
    with pytest.raises(AuditError) as info:
        confirm.confirm(scanned_ws, top=1)
    assert "\n" not in str(info.value) and "[memory] vae_batch_size" in str(info.value)
    assert sql_value(scanned_ws, "select count(*) from confirm_runs") == 0  # it failed in the estimate, first


def _store_counts(ws) -> dict[str, int]:
    tables = sql.query(ws, "select table_name from information_schema.tables where table_schema = 'main'")
    return {t: sql_value(ws, f"select count(*) from {t}") for t in tables["table_name"].to_list()}


def test_dry_run_prints_the_estimate_per_phase_and_stores_nothing(scanned_ws):
    before = _store_counts(scanned_ws)
    said: list[str] = []
    result = confirm.confirm(scanned_ws, top=2, dry_run=True, announce=said.append)
    assert result.run_id is None and result.generations == 0
    phases = result.estimate.phases
    assert {"Fisher (once per model)", "reference update (once per model)", "noise floor (2 generation(s))"} <= set(
        phases
    )
    assert any(p.startswith("scoring (2 generation(s))") for p in phases) and all(v >= 0 for v in phases.values())
    assert result.estimate_seconds == pytest.approx(sum(phases.values()))
    line = next(m for m in said if m.startswith("dry run: would confirm 2 generation(s)"))
    assert "Fisher (once per model)" in line and "scoring (2 generation(s))" in line
    assert _store_counts(scanned_ws) == before
    assert not list((scanned_ws.dir / "cache").glob("fisher-*")) and not list(
        (scanned_ws.dir / "cache").glob("abu-reference-*")
    )

    # The CLI prints it and stops; a real run then finds the Fisher and reference cached and leaves them out.
    proc = audit("confirm", "--top", 1, "--dry-run", ws=scanned_ws)
    assert "dry run: would confirm 1 generation(s)" in proc.stderr and "Fisher" in proc.stderr
    assert "confirm run" not in proc.stdout and _store_counts(scanned_ws) == before
    confirm.confirm(scanned_ws, top=1)
    again = confirm.confirm(scanned_ws, top=1, dry_run=True)
    assert "Fisher (once per model)" not in again.estimate.phases
    assert "reference update (once per model)" not in again.estimate.phases


def test_dtrak_dry_run_stores_no_features(scanned_ws):
    scanned_ws.config.dtrak = scanned_ws.config.dtrak.override(dim=64, timesteps=2)
    result = confirm.confirm(scanned_ws, method="dtrak", top=1, dry_run=True)
    assert "training features (once per model and settings)" in result.estimate.phases
    assert not list((scanned_ws.dir / "cache").glob("dtrak-kernel-*"))
    assert not [name for name in _lance_tables(scanned_ws) if name.startswith("dtrak_")]


def _lance_tables(ws) -> list[str]:
    import lancedb

    return list(lancedb.connect(ws.lancedb_uri).table_names())


def test_summary_seconds_per_generation_are_the_stored_ones(scanned_ws):
    proc = audit("confirm", "--top", 2, ws=scanned_ws)
    per = float(re.search(r"; ([0-9.]+) s each \(\+ ([0-9.]+) s setup\)", proc.stdout).group(1))
    stored = sql_value(scanned_ws, "select avg(seconds) from confirmations")
    assert per == pytest.approx(stored, abs=0.051)
    run = sql_value(scanned_ws, "select seconds_per_generation from confirm_runs")
    assert run == pytest.approx(stored, rel=1e-9)


def test_dtrak_resumes_from_the_features_saved_before_a_failure(scanned_ws, monkeypatch):
    ws = scanned_ws
    ws.config.dtrak = ws.config.dtrak.override(dim=64, timesteps=2)
    ws.config.memory = ws.config.memory.override(vae_batch_size=4)  # blocks of 4 training images
    ws.save()
    n_train = sql_value(ws, "select count(*) from training_images")
    encoded: list[int] = []
    original = diffusion.TrainingSet.encode

    def failing_third_block(self, ids):
        if len(encoded) == 2 * 4:
            raise RuntimeError("killed mid-way")
        encoded.extend(int(i) for i in ids)
        return original(self, ids)

    monkeypatch.setattr(diffusion.TrainingSet, "encode", failing_third_block)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        confirm.confirm(ws, method="dtrak", top=1)
    [name] = [n for n in _lance_tables(ws) if n.startswith("dtrak_")]
    table = dtrak.FeatureTable(ws.lancedb_uri, name, 64)
    saved = sorted(table.ids().tolist())
    assert saved == sorted(encoded) and len(saved) == 8
    first = table.get(saved)

    # The rerun computes only what is missing; what was saved is what a clean run computes.
    monkeypatch.setattr(diffusion.TrainingSet, "encode", original)
    computed: list[int] = []
    each = dtrak.GradientFeatures.each

    def counting(self, latents, *args, **kwargs):
        computed.append(len(latents))
        yield from each(self, latents, *args, **kwargs)

    monkeypatch.setattr(dtrak.GradientFeatures, "each", counting)
    assert confirm.confirm(ws, method="dtrak", top=1).generations == 1
    assert computed[-3:] == [1, 1, 28]  # the query; for the noise floor, the query again and the 28 candidates
    assert sum(computed[:-3]) == n_train - 8
    table = dtrak.FeatureTable(ws.lancedb_uri, name, 64)
    assert sorted(table.ids().tolist()) == sql.query(ws, "select id from training_images order by id")["id"].to_list()
    np.testing.assert_allclose(table.get(saved), first)
    model = diffusion.load(ws.model_dir(None), torch.device("cpu"), ws.dir / "cache")
    rows = sql.query(ws, f"select id, path, caption from training_images where id in ({','.join(map(str, saved))})")
    training = diffusion.TrainingSet(model, sorted(rows.rows()), ws.limits)
    latents, flipped, captions = training.encode(np.array(saved))
    fresh = dtrak.GradientFeatures(model, ws.config.dtrak)(
        latents, captions, np.array(saved), ws.config.dtrak.seed, flipped if model.flip_augmentation else None
    )
    np.testing.assert_allclose(first, fresh, rtol=1e-4, atol=1e-4 * np.abs(fresh).max())
