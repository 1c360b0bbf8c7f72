"""`--engine ray` (a pool of Ray actors + lance_ray fragment writes) gives the local engine's attributions, on a Ray
cluster of two nodes on this machine started as the README says (tests/ray_cluster.py), with the vectors on an
S3-compatible server. The data is the smallest that still makes two index chunks of two batches each (one per node):
Ray's own costs (nodes, actors, encoders) are most of the time."""

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from auditor import engine_ray, ingest, sql, workspace
from auditor.errors import AuditError
from auditor.index import index_training
from auditor.scan import scan
from auditor.search import IndexSettings, VectorTable

from . import ray_cluster, small_world
from .helpers import S3_BUCKET

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster.two_nodes() as started:
        yield started


def _attributions(ws):
    return sql.query(
        ws,
        "select g.sha256, a.rank, a.training_id, a.score, a.share from attributions a"
        " join generations g on g.id = a.generation_id order by 1, 2",
    )


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """16 images: two index chunks of 8 (INDEX_CHUNK below), each two batches of 4, one per node."""
    return small_world.build_training(tmp_path_factory.mktemp("ray") / "training", per_contributor=4)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_encoder, training):
    """`training` indexed by the local engine; tests copy it."""
    ws = workspace.init(tmp_path_factory.mktemp("ray") / "ws", encoder=tiny_encoder)
    index_training(ws, training)
    return ws


def test_joining_without_the_clusters_token_is_one_line_with_the_fix(cluster, tmp_path, tiny_encoder, training):
    ws = workspace.init(tmp_path / "ws", encoder=tiny_encoder)
    env = {**cluster["env"], "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": cluster["address"]}
    env["RAY_NUM_REDIS_GET_RETRIES"] = "2"  # Ray's retries of a refused join: 20 s by default
    command = [sys.executable, "-m", "auditor", "--workspace", str(ws.root), "index", str(training)]
    done = subprocess.run([*command, "--engine", "ray"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"the Ray cluster at RAY_ADDRESS={cluster['address']} refused this process" in lines[0]
    assert "set RAY_AUTH_MODE=token" in lines[0]


def test_ray_index_and_scan_into_s3_match_the_local_engine_across_two_nodes(
    cluster, s3, indexed, tiny_encoder, training, outputs_dir, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="auditor")
    local = workspace.load(shutil.copytree(indexed.root, tmp_path / "local", symlinks=True))
    scan(local, outputs_dir, top_k=5, batch_size=8)

    # The vectors on the S3 server, its endpoint only in audit.toml: lance_ray's writers and the search actors get it.
    endpoint, client = s3
    created = workspace.init(tmp_path / "ray", encoder=tiny_encoder, lancedb=f"s3://{S3_BUCKET}/ray")
    created.config.storage = created.config.storage.override(endpoint=endpoint, region="us-east-1", allow_http=True)
    created.save()
    ws = workspace.load(created.root)
    monkeypatch.setattr(engine_ray, "INDEX_CHUNK", 8)  # two chunks: two Lance + DuckDB commits
    result = index_training(ws, training, batch_size=4, engine="ray")
    assert (result.added, result.errors, result.rows) == (16, 0, 16)
    chunks = [r.getMessage().split(": ")[-1] for r in caplog.records if "ray: embedded on" in r.getMessage()]
    assert len(chunks) == 2
    # One pool for the run, its batches spread over the actors: every chunk is embedded on both nodes.
    nodes = {n["NodeID"][:12] for n in ray.nodes()}
    assert len(nodes) == 2 and all(set(chunk.split(", ")) == nodes for chunk in chunks), chunks
    # Same training ids for the same content, and LanceDB (on S3) agrees with DuckDB.
    query = "select sha256, id, contributor_id, caption, caption_source, width, height from training_images order by id"
    assert sql.query(ws, query).equals(sql.query(local, query))
    stored = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"ray/training_{result.encoder_id}.lance/data/")
    assert stored["KeyCount"] >= 4  # each chunk written by both workers, not one task
    table = VectorTable(ws.lancedb_uri, result.encoder_id, 64, IndexSettings(), storage_options=ws.storage_options)
    assert sorted(table.ids().tolist()) == list(range(1, 17))
    local_table = VectorTable(local.lancedb_uri, result.encoder_id, 64, IndexSettings())
    ids = np.arange(1, 17)
    assert np.abs(table.vectors(ids) - local_table.vectors(ids)).max() < 1e-6

    ray_scan = scan(ws, outputs_dir, top_k=5, batch_size=8, engine="ray")
    assert (ray_scan.seen, ray_scan.attributed, ray_scan.errors) == (24, 24, 0)
    expected, got = _attributions(local), _attributions(ws)
    assert got.height == expected.height == 24 * 5
    assert got.select("sha256", "rank", "training_id").equals(expected.select("sha256", "rank", "training_id"))
    assert (got["score"] - expected["score"]).abs().max() < 1e-6
    assert (got["share"] - expected["share"]).abs().max() < 1e-6
    gens = "select sha256, path, prompt, prompt_source, width, height from generations order by sha256"
    assert sql.query(ws, gens).equals(sql.query(local, gens))
    files = "select path, prompt, prompt_source, first_scan_id, last_scan_id from generation_files order by path"
    assert sql.query(ws, files).equals(sql.query(local, files))

    again = scan(ws, outputs_dir, top_k=5, batch_size=8, engine="ray")  # idempotent, as the local engine
    assert (again.attributed, again.skipped, again.errors) == (0, 24, 0)
    assert _attributions(ws).height == 24 * 5


def test_inputs_a_worker_cannot_see_fail_the_scan_naming_the_node_and_path(cluster, indexed, outputs_dir, tmp_path):
    ws = workspace.load(shutil.copytree(indexed.root, tmp_path / "ws", symlinks=True))
    folder = shutil.copytree(outputs_dir, tmp_path / "outputs")
    found = ingest.walk(folder)
    shutil.rmtree(folder)  # found by the driver, not there for the workers (as on a node without the share)
    with pytest.raises(AuditError) as failed:
        engine_ray.scan(ws, str(folder), found, top_k=5, device="cpu", batch_size=8, limits=ws.limits)
    message = str(failed.value)
    nodes = [(n["NodeManagerAddress"], n["NodeID"][:12]) for n in ray.nodes() if n["Alive"]]
    assert message.startswith("the Ray job failed: Ray node ") and "\n" not in message
    assert any(f"Ray node {ip} (id {node}) cannot see {folder}/" in message for ip, node in nodes), message
    assert "every node needs the inputs at the same path" in message
    assert sql.query(ws, "select status, finished_at is not null f from scans").rows() == [("failed", True)]
