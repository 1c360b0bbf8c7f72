"""Bad input never crashes a batch and never loses data: the hostile corpus end to end."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from auditor import workspace
from auditor.ingest import IngestError, Limits, decode
from auditor.prompts import parse_a1111, parse_comfyui

from .corpus.build import ATTRIBUTED, TOO_LARGE_BYTES, build
from .helpers import sql_value

NOBODY = 65534


def _run_as_unprivileged(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """Root reads every file, so the unreadable case needs an unprivileged scan."""
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


@pytest.fixture
def shared_tmp():
    # Outside pytest's root-only tmp tree so an unprivileged scan can reach it.
    path = Path(tempfile.mkdtemp(prefix="audit-corpus-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_hostile_corpus_is_attributed_or_recorded(indexed_template, tiny_encoder, shared_tmp):
    expected = build(shared_tmp / "corpus")
    assert len(expected) >= 30
    ws_root = shared_tmp / "ws"
    shutil.copytree(indexed_template.root, ws_root, symlinks=True)
    shutil.copytree(tiny_encoder, shared_tmp / "encoder")
    ws = workspace.load(ws_root)
    ws.config.encoder.path = str(shared_tmp / "encoder")
    ws.config.scan.max_file_bytes = TOO_LARGE_BYTES
    ws.save()
    if os.geteuid() == 0:
        for dirpath, dirnames, filenames in os.walk(shared_tmp):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                if os.path.basename(name) != "unreadable.png":
                    os.lchown(name, NOBODY, NOBODY)
    env = {**os.environ, "AUDIT_WORKSPACE": str(ws_root), "HOME": str(shared_tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = _run_as_unprivileged(
        [sys.executable, "-m", "auditor", "scan", str(shared_tmp / "corpus"), "--top-k", "5"], env
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    attributed = {
        Path(p).name
        for (p,) in workspace_rows(
            ws,
            "select g.path from generations g where exists (select 1 from attributions a where a.generation_id = g.id)",
        )
    }
    errors = {Path(p).name: code for p, code in workspace_rows(ws, "select path, code from scan_errors")}
    # Identical pixels are one generation (sha256), so compare per expected file, allowing for shared content.
    for name, outcome in expected.items():
        if outcome == ATTRIBUTED:
            assert name not in errors, f"{name!r} was recorded as an error: {errors.get(name)}"
        else:
            assert errors.get(name) == outcome, f"{name!r}: expected {outcome}, got {errors.get(name)}"
    assert len(errors) == sum(1 for v in expected.values() if v != ATTRIBUTED)
    n_attributed = sql_value(ws, "select count(distinct generation_id) from attributions")
    assert n_attributed == len(attributed) >= 15
    prompts = {p for (p,) in workspace_rows(ws, "select prompt from generations where prompt is not null")}
    assert "<script>alert('x')</script> a digit" in prompts
    assert "'); DROP TABLE generations; --" in prompts
    assert "from a json sidecar" in prompts and "a jpeg prompt" in prompts
    assert max(len(p) for p in prompts) >= 1_000_000
    assert sql_value(ws, "select n_errors from scans") == len(errors)


def workspace_rows(ws, query):
    from auditor import sql

    return sql.query(ws, query).rows()


def test_decode_limits_pixels_before_decoding():
    from .corpus.build import _bomb_png

    with pytest.raises(IngestError) as info:
        decode(_bomb_png(5000, 5000), Limits(max_pixels=1_000_000))
    assert info.value.code == "too_many_pixels"


def test_a1111_parameters_parse_to_the_positive_prompt():
    text = "a red seven,\nsecond line\nNegative prompt: blurry\nSteps: 30, Sampler: DDIM, Seed: 1"
    assert parse_a1111(text) == "a red seven,\nsecond line"
    assert parse_a1111("only a prompt") == "only a prompt"


def test_comfyui_prompt_follows_the_sampler_positive_input():
    graph = (
        '{"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "negative words"}},'
        ' "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "positive words"}},'
        ' "3": {"class_type": "KSampler", "inputs": {"positive": ["2", 0], "negative": ["1", 0]}}}'
    )
    assert parse_comfyui(graph) == "positive words"
