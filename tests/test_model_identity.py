"""Generation metadata in the store and outputs matched to the workspace's model (issue #26): checkpoint hashes as
AUTOMATIC1111 computes them, model_match per generation, counts per model, confirm refusing another model's outputs,
the report's model filter, and migration 007 on a store made before it."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import numpy as np
import pytest
from PIL import Image

from auditor import ingest, model_identity, sql, workspace
from auditor.model_identity import ModelIdentity, hash_checkpoint
from auditor.report import build_report
from auditor.scan import scan
from auditor.store import Store

from . import metadata_fixtures as fx
from .helpers import audit, sql_value, store_made_before

OTHER_HASH = "0123456789"


def safetensors_file(path, body_bytes: int = 0x120000, seed: int = 0) -> bytes:
    """A file laid out as safetensors (8-byte little-endian header length, JSON header, data), over 0x110000 bytes
    so that A1111's legacy hash reads a full slice."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [body_bytes], "data_offsets": [0, body_bytes]}}).encode()
    data = len(header).to_bytes(8, "little") + header + np.random.default_rng(seed).bytes(body_bytes)
    path.write_bytes(data)
    return data


def a1111_text(prompt: str, negative: str | None = None, model_hash: str | None = None, model: str | None = None):
    settings = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 18446744073709551615, Size: 48x40"
    settings += f", Model hash: {model_hash}" if model_hash else ""
    settings += f", Model: {model}" if model else ""
    return "\n".join([prompt, *([f"Negative prompt: {negative}"] if negative else []), settings])


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")


def comfy_png(ckpt_name: str, seed: int) -> bytes:
    graph = fx.comfy_basic()
    graph["4"]["inputs"]["ckpt_name"] = ckpt_name
    return fx.png({"prompt": json.dumps(graph)}, image=image(seed))


# --- hashing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [model_identity.CHUNK, 7, 100])
def test_checkpoint_hashes_match_independently_computed_sha256_slices(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(model_identity, "CHUNK", chunk)  # small reads cross the header boundary mid-chunk
    data = safetensors_file(tmp_path / "model.safetensors", body_bytes=0x120000 if chunk > 100 else 0x111000)
    header_end = 8 + int.from_bytes(data[:8], "little")
    hashes = hash_checkpoint(tmp_path / "model.safetensors")
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert hashes.autov2 == hashlib.sha256(data).hexdigest()[:10]
    assert hashes.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert hashes.autov3 == hashlib.sha256(data[header_end:]).hexdigest()
    assert (hashes.size, hashes.name) == (len(data), "model")


def test_a_ckpt_has_no_autov3_and_a_short_file_hashes_an_empty_legacy_slice(tmp_path):
    (tmp_path / "small.ckpt").write_bytes(b"PK\x03\x04 not a safetensors file")
    hashes = hash_checkpoint(tmp_path / "small.ckpt")
    assert hashes.autov3 is None
    assert hashes.autov1 == hashlib.sha256(b"").hexdigest()[:8]  # A1111 reads nothing past the end


# --- matching -------------------------------------------------------------------------------------------------------


def test_declared_hashes_and_names_match_by_prefix_and_file_stem(tmp_path):
    safetensors_file(tmp_path / "sd_xl_base_1.0.safetensors")
    ours = hash_checkpoint(tmp_path / "sd_xl_base_1.0.safetensors")
    ident = ModelIdentity([ours], hashes=("blake3:9a8b7c6d",), names=("juggernaut-xl",))
    cases = {
        (ours.autov2, None): "same",  # A1111 Model hash
        ("0x" + ours.autov2.upper(), None): "same",  # SwarmUI
        (ours.sha256, None): "same",  # InvokeAI legacy sd-metadata: the full SHA-256
        (ours.autov1, None): "same",  # A1111 before 2023
        (ours.autov3[:12], None): "same",
        (OTHER_HASH, "sd_xl_base_1.0"): "other",  # a hash decides before a name
        (ours.autov2[:7], None): "unknown",  # too short to compare, and no name
        (None, "SDXL\\sd_xl_base_1.0.safetensors"): "same",  # ComfyUI ckpt_name in a subfolder
        (None, "sd_xl_base_1.0.safetensors [31e35c80fc]"): "same",  # A1111 checkpoint title
        (None, "OfficialStableDiffusion/SD_XL_BASE_1.0"): "same",  # SwarmUI, case-insensitive
        (None, "dreamshaper_8"): "other",
        ("blake3:9a8b7c6d", "juggernaut-xl"): "same",  # InvokeAI: another scheme, equal to a declared hash
        ("blake3:ffff0000", "sd_xl_base_1.0"): "other",  # another hash of a scheme the identity declares
        ("xxh:1234", "juggernaut-xl"): "same",  # a scheme the identity lacks is set aside: the name decides
        (None, None): "none",
    }
    assert {case: ident.match(*case) for case in cases} == cases
    assert ModelIdentity([]).match(ours.autov2, "x") == "unknown"
    assert ModelIdentity([]).match(None, None) == "none"


def test_checkpoint_files_include_a_single_file_model_path(tmp_path):
    ws = workspace.init(tmp_path / "ws")
    ws.config.paths.model = str(tmp_path / "served.safetensors")
    assert model_identity.checkpoint_files(ws) == [tmp_path / "served.safetensors"]
    ws.config.paths.model = str(tmp_path)  # a diffusers folder: no single file
    assert model_identity.checkpoint_files(ws) == []


# --- ingest and the store -------------------------------------------------------------------------------------------


def test_ingest_item_carries_the_metadata_and_keeps_text_and_source(tmp_path):
    (tmp_path / "a.png").write_bytes(fx.png({"parameters": fx.A1111}))
    item = ingest.load_item(str(tmp_path / "a.png"), ingest.Limits(), lambda image: np.zeros(1))
    assert (item.text, item.text_source) == (fx.A1111_EXPECTED["prompt"], "a1111")
    assert item.metadata.negative_prompt == fx.A1111_EXPECTED["negative_prompt"]
    assert item.metadata.model_hash == "abcdef1234" and item.metadata.raw == fx.A1111
    # settings without a prompt: the metadata is kept, the prompt source stays 'none' as before
    (tmp_path / "b.png").write_bytes(fx.png({"parameters": "Steps: 20, Seed: 1, Model hash: abcdef1234"}))
    item = ingest.load_item(str(tmp_path / "b.png"), ingest.Limits(), lambda image: np.zeros(1))
    assert (item.text, item.text_source, item.metadata.model_hash) == (None, "none", "abcdef1234")


@pytest.fixture
def two_models(indexed_ws, tmp_path):
    """Outputs declaring the workspace's model (by A1111 hash, by ComfyUI name), another model's hash, and none."""
    safetensors_file(tmp_path / "ourmodel.safetensors")
    ours = hash_checkpoint(tmp_path / "ourmodel.safetensors")
    out = tmp_path / "outputs"
    out.mkdir()
    files = {
        "same_hash.png": fx.png({"parameters": a1111_text("a red fox", "blurry", ours.autov2, "x")}, image=image(1)),
        "same_name.png": comfy_png("SD\\ourmodel.safetensors", 2),
        "other_1.png": fx.png({"parameters": a1111_text("a red fox", None, OTHER_HASH, "y")}, image=image(3)),
        "other_2.png": fx.png({"parameters": a1111_text("a blue fox", None, OTHER_HASH, "y")}, image=image(4)),
        "none_plain.png": fx.png(image=image(5)),
        "none_settings.png": fx.png({"parameters": a1111_text("a grey fox")}, image=image(6)),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return indexed_ws, out, tmp_path / "ourmodel.safetensors", ours


def matches(ws) -> dict[str, str]:
    frame = sql.query(ws, "select path, model_match from generations")
    return {path.rsplit("/", 1)[-1]: match for path, match in frame.iter_rows()}


def test_scan_stores_metadata_and_model_match_with_counts_per_model(two_models):
    ws, out, checkpoint, ours = two_models
    ws.config.model = ws.config.model.override(checkpoints=[str(checkpoint)])
    ws.save()
    result = scan(ws, out, top_k=3)
    assert matches(ws) == {
        "same_hash.png": "same",
        "same_name.png": "same",
        "other_1.png": "other",
        "other_2.png": "other",
        "none_plain.png": "none",
        "none_settings.png": "none",
    }
    assert result.models == {
        (f"{ours.autov2} (x)", "same"): 1,
        ("SD\\ourmodel.safetensors", "same"): 1,
        (f"{OTHER_HASH} (y)", "other"): 2,
        ("no model declared", "none"): 2,
    }
    per_hash = sql.query(ws, "SELECT model_hash, count(*) AS n FROM generations GROUP BY 1 ORDER BY 2 DESC, 1")
    assert per_hash.rows() == [(None, 3), (OTHER_HASH, 2), (ours.autov2, 1)]
    row = sql.query(ws, "select * from generations where path like '%same_hash.png'").row(0, named=True)
    assert (row["prompt"], row["negative_prompt"], row["generator"], row["metadata_source"]) == (
        "a red fox",
        "blurry",
        "AUTOMATIC1111",
        "a1111",
    )
    assert (row["seed"], row["steps"], row["sampler"], row["cfg_scale"]) == (2**64 - 1, 20, "Euler a", 7.0)
    assert (row["declared_width"], row["declared_height"], row["metadata_warnings"]) == (48, 40, [])
    assert row["metadata_raw"].startswith("a red fox\nNegative prompt: blurry")
    plain = sql.query(ws, "select * from generations where path like '%none_plain.png'").row(0, named=True)
    assert (plain["metadata_source"], plain["metadata_raw"], plain["model_hash"]) == ("none", None, None)
    assert sql_value(ws, "select count(*) from checkpoint_hashes") == 1


def test_identity_set_after_a_scan_matches_the_stored_generations_again(two_models):
    ws, out, checkpoint, ours = two_models
    result = scan(ws, out, top_k=3)
    assert not result.identity_known
    assert set(matches(ws).values()) == {"unknown", "none"}
    model_identity.add_checkpoints(ws, [checkpoint])
    assert workspace.load(ws.root).config.model.checkpoints == (str(checkpoint),)
    assert sorted(matches(ws).values()) == ["none", "none", "other", "other", "same", "same"]
    model_identity.update(ws, hashes=[OTHER_HASH])  # an alias: the other hash is declared ours too
    assert sorted(matches(ws).values()) == ["none", "none", "same", "same", "same", "same"]


def test_cli_model_commands_and_scan_summary_per_model(two_models):
    ws, out, checkpoint, ours = two_models
    added = audit("model", "add-checkpoint", checkpoint, ws=ws)
    assert ours.sha256 in added.stdout and ours.autov1 in added.stdout
    shown = audit("model", "show", ws=ws)
    assert ours.sha256 in shown.stdout and "ourmodel" in shown.stdout
    scanned = audit("scan", out, "--top-k", 2, ws=ws)
    assert "by the model they declare" in scanned.stdout
    lines = {line.split("│")[1].strip(): line for line in scanned.stdout.splitlines() if line.count("│") >= 3}
    assert "other" in lines[f"{OTHER_HASH} (y)"] and lines[f"{OTHER_HASH} (y)"].rstrip(" │").endswith("2")
    assert "same" in lines[f"{ours.autov2} (x)"]
    proc = audit("model", "alias", ws=ws, check=False)
    assert proc.returncode == 1 and "--hash" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_negative_prompt_is_never_embedded(indexed_ws, tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    for name, negative in (("a.png", "blurry, lowres"), ("b.png", "a completely different negative prompt")):
        (out / name).write_bytes(fx.png({"parameters": a1111_text("a red fox", negative)}, image=image(7)))
    scan(indexed_ws, out, top_k=5)
    negatives = sql.query(indexed_ws, "select negative_prompt from generations order by path")["negative_prompt"]
    assert negatives.to_list() == ["blurry, lowres", "a completely different negative prompt"]
    rows = sql.query(
        indexed_ws,
        "select g.path, a.rank, a.training_id, a.score, a.share from attributions a"
        " join generations g on g.id = a.generation_id order by g.path, a.rank",
    )
    a, b = rows.filter(rows["path"].str.ends_with("a.png")), rows.filter(rows["path"].str.ends_with("b.png"))
    assert a.height == 5 and a.drop("path").equals(b.drop("path"))


# --- confirm and report ---------------------------------------------------------------------------------------------


def test_confirm_refuses_generations_of_another_model_unless_any_model(two_models, cheap_teacher):
    from auditor import confirm

    ws, out, checkpoint, _ = two_models
    ws.config.model = ws.config.model.override(checkpoints=[str(checkpoint)])
    cheap_teacher(ws)
    ws.config.confirm = ws.config.confirm.override(candidates=8, controls=2, k=3)
    ws.save()
    scan(ws, out, top_k=3)
    foreign = sql_value(ws, "select min(id) from generations where model_match = 'other'")
    messages = []
    result = confirm.confirm(ws, generation=foreign, device="cpu", announce=messages.append)
    assert (result.run_id, result.generations, result.other_model) == (None, 0, 1)
    assert any("another model" in m and "--any-model" in m for m in messages)
    result = confirm.confirm(ws, top=1, device="cpu")
    assert (result.generations, result.other_model) == (1, 2)
    confirmed = sql_value(ws, "select generation_id from confirmations")
    assert sql_value(ws, f"select model_match from generations where id = {confirmed}") != "other"
    result = confirm.confirm(ws, generation=foreign, device="cpu", any_model=True)
    assert (result.generations, result.other_model) == (1, 0)


def test_report_filters_generations_by_the_model_they_declare(two_models, tmp_path):
    ws, out, checkpoint, _ = two_models
    ws.config.model = ws.config.model.override(checkpoints=[str(checkpoint)])
    ws.save()
    scan(ws, out, top_k=3)
    counts = {}
    for model in ("same", "not-other", "any"):
        result = build_report(ws, tmp_path / f"report-{model}", pool=Decimal("100.00"), model=model)
        counts[model] = (result.generations, result.model_left_out, result.total_paid)
        assert f'<span class="id">{model}</span>' in result.index.read_text()
    assert counts == {
        "same": (2, 4, Decimal("100.00")),
        "not-other": (4, 2, Decimal("100.00")),
        "any": (6, 0, Decimal("100.00")),
    }
    assert build_report(ws, tmp_path / "default", pool=Decimal("1.00")).model == "not-other"


# --- migration 007 --------------------------------------------------------------------------------------------------


def test_migration_007_applies_to_a_store_made_before_it(tmp_path):
    added = [
        "negative_prompt", "generator", "metadata_source", "model_name", "model_hash", "seed", "steps", "sampler",
        "cfg_scale", "declared_width", "declared_height", "metadata_raw", "metadata_warnings", "model_match",
    ]  # fmt: skip
    path = tmp_path / "audit.duckdb"
    store_made_before(path, 7).close()
    with Store(path) as store:
        assert 7 in {row[0] for row in store.rows("SELECT version FROM schema_migrations")}
        row = store.rows(f"SELECT prompt, {', '.join(added)} FROM generations")[0]
        assert row == ("a fox", *[None] * len(added))
        assert store.value("SELECT count(*) FROM checkpoint_hashes") == 0
        # an old generation is paid by default: it declares nothing, so no other model
        assert store.value("SELECT count(*) FROM generations g WHERE g.model_match IS DISTINCT FROM 'other'") == 1
