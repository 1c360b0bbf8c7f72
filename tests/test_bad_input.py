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
    # shutil.rmtree recurses once per level: the corpus's deep tree is deeper than the recursion limit.
    subprocess.run(["chmod", "-R", "u+rwx", str(path)], capture_output=True)
    subprocess.run(["rm", "-rf", str(path)], check=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 200 else f"{text[:80]}... ({len(value)} chars) ...{text[-40:]}"


def test_hostile_corpus_is_attributed_or_recorded(indexed_template, tiny_encoder, shared_tmp):
    expected = build(shared_tmp / "corpus")
    assert len(expected) >= 60
    ws_root = shared_tmp / "ws"
    shutil.copytree(indexed_template.root, ws_root, symlinks=True)
    shutil.copytree(tiny_encoder, shared_tmp / "encoder")
    ws = workspace.load(ws_root)
    ws.config.encoder.path = str(shared_tmp / "encoder")
    ws.config.scan.max_file_bytes = TOO_LARGE_BYTES
    ws.save()
    if os.geteuid() == 0:  # chown -R walks without recursing (os.walk would not survive the deep tree)
        subprocess.run(["chown", "-R", "-h", f"{NOBODY}:{NOBODY}", str(shared_tmp)], check=True)
        os.chown(shared_tmp / "corpus" / "unreadable.png", 0, 0)
        os.chown(shared_tmp / "corpus" / "locked", 0, 0)
    env = {**os.environ, "AUDIT_WORKSPACE": str(ws_root), "HOME": str(shared_tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = _run_as_unprivileged(
        [sys.executable, "-m", "auditor", "scan", str(shared_tmp / "corpus"), "--top-k", "5"], env
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "x [/bold] y" not in proc.stdout + proc.stderr  # (prompts are not printed; markup must not break output)

    files = {
        Path(path).name: (source, prompt, attributed)
        for path, source, prompt, attributed in workspace_rows(
            ws,
            "select f.path, f.prompt_source, f.prompt,"
            " exists (select 1 from attributions a where a.generation_id = f.generation_id)"
            " from generation_files f",
        )
    }
    errors = {Path(p).name: code for p, code in workspace_rows(ws, "select path, code from scan_errors")}
    wrong = []
    for name, case in expected.items():
        if case.outcome == ATTRIBUTED:
            got = files.get(name)
            if name in errors or got is None or got != (case.source, case.prompt, True):
                got = errors.get(name) or (got and (got[0], _short(got[1]), got[2]))
                wrong.append(f"{name!r}: expected ({case.source}, {_short(case.prompt)}), got {got}")
        elif errors.get(name) != case.outcome:
            wrong.append(f"{name!r}: expected {case.outcome}, got {errors.get(name) or files.get(name, 'nothing')}")
    assert not wrong, "\n".join(wrong)
    assert len(errors) == sum(1 for case in expected.values() if case.outcome != ATTRIBUTED)
    assert set(files) == {name for name, case in expected.items() if case.outcome == ATTRIBUTED}
    # The twins are one generation with two files.
    assert sql_value(ws, "select count(distinct generation_id) from generation_files where path like '%dup_%'") == 1
    n_unsupported = sum(1 for case in expected.values() if case.outcome == "unsupported")
    assert workspace_rows(ws, "select status, n_errors, n_unsupported, finished_at is not null from scans") == [
        ("finished", len(errors) - n_unsupported, n_unsupported, True)
    ]
    assert f"unsupported files (see scan_errors) │ {n_unsupported}" in proc.stdout


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
