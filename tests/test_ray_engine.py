"""`--engine ray` (Ray Data actors + lance_ray writes) gives the local engine's attributions, on a 2-CPU local Ray."""

import shutil

import numpy as np
import pytest

from auditor import engine_ray, sql, workspace
from auditor.index import index_training
from auditor.scan import scan
from auditor.search import IndexSettings, VectorTable

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own deprecated context fields


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _attributions(ws):
    return sql.query(
        ws,
        "select g.sha256, a.rank, a.training_id, a.score, a.share from attributions a"
        " join generations g on g.id = a.generation_id order by 1, 2",
    )


def test_ray_index_and_scan_match_the_local_engine(
    local_ray, ws, indexed_template, outputs_dir, training_dir, tmp_path, monkeypatch
):
    # Local reference: the session's template (indexed locally), scanned locally.
    local = workspace.load(shutil.copytree(indexed_template.root, tmp_path / "local", symlinks=True))
    scan(local, outputs_dir, top_k=5, batch_size=8)

    monkeypatch.setattr(engine_ray, "INDEX_CHUNK", 60)  # 120 images: two chunks, two Lance + DuckDB commits
    result = index_training(ws, training_dir, batch_size=8, engine="ray")
    assert (result.added, result.errors, result.rows) == (120, 0, 120)
    # Same training ids for the same content, and LanceDB agrees with DuckDB.
    query = "select sha256, id, contributor_id, caption, caption_source, width, height from training_images order by id"
    assert sql.query(ws, query).equals(sql.query(local, query))
    encoder_id = result.encoder_id
    table = VectorTable(ws.lancedb_uri, encoder_id, 64, IndexSettings())
    assert sorted(table.ids().tolist()) == list(range(1, 121))
    local_table = VectorTable(local.lancedb_uri, encoder_id, 64, IndexSettings())
    ids = np.arange(1, 121)
    assert np.abs(table.vectors(ids) - local_table.vectors(ids)).max() < 1e-5

    again = index_training(ws, training_dir, engine="ray")  # idempotent: nothing new
    assert (again.added, again.unchanged, again.rows) == (0, 120, 120)

    ray_scan = scan(ws, outputs_dir, top_k=5, batch_size=8, engine="ray")
    assert (ray_scan.seen, ray_scan.attributed, ray_scan.errors) == (24, 24, 0)
    expected, got = _attributions(local), _attributions(ws)
    assert got.height == expected.height == 24 * 5
    assert got.select("sha256", "rank", "training_id").equals(expected.select("sha256", "rank", "training_id"))
    assert (got["score"] - expected["score"]).abs().max() < 1e-5
    assert (got["share"] - expected["share"]).abs().max() < 1e-5
    gens = "select sha256, path, prompt, prompt_source, width, height from generations order by sha256"
    assert sql.query(ws, gens).equals(sql.query(local, gens))
    files = "select path, prompt, prompt_source, first_scan_id, last_scan_id from generation_files order by path"
    assert sql.query(ws, files).equals(sql.query(local, files))

    rerun = scan(ws, outputs_dir, top_k=5, engine="ray")  # resumable/idempotent like the local path
    assert (rerun.attributed, rerun.skipped) == (0, 24)
    assert sql.query(ws, "select count(*) n, min(last_scan_id) s from generation_files").row(0) == (24, 2)
    assert sql.query(ws, "select count(*) n from attributions")["n"].item() == 24 * 5
