"""`audit index` from WebDataset shards and Parquet manifests: the same training ids, contributors, captions and
vectors as the same images indexed from a folder; corrupt members and shards recorded; resumable by shard."""

import hashlib
import re
import shutil
import tarfile
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from auditor import diffusion, sources, sql, workspace
from auditor.cli import app
from auditor.errors import AuditError
from auditor.index import IndexLedger, index_training, reindex
from auditor.report import build_report
from auditor.scan import scan
from auditor.search import VectorTable
from auditor.store import Store

from . import small_world
from .helpers import S3_BUCKET, sql_value

REGISTERED = "select id, sha256, contributor_id, caption from training_images order by id"


def _vectors(ws) -> dict[str, np.ndarray]:
    """Each registered image's vector, by content."""
    encoder_id, dim = sql.query(ws, "select id, dim from encoders").row(0)
    table = VectorTable(ws.lancedb_uri, encoder_id, dim, ws.config.index)
    ids, shas = zip(*sql.query(ws, "select id, sha256 from training_images order by id").rows())
    assert table.count() == len(ids)  # no vector without its row, none twice
    return dict(zip(shas, table.vectors(np.asarray(ids))))


def _same_as_folder(ws, folder_ws) -> None:
    assert sql.query(ws, REGISTERED).rows() == sql.query(folder_ws, REGISTERED).rows()
    mine, theirs = _vectors(ws), _vectors(folder_ws)
    assert mine.keys() == theirs.keys()
    np.testing.assert_allclose(np.stack([mine[k] for k in theirs]), np.stack(list(theirs.values())), atol=1e-6)


@pytest.fixture
def opened(monkeypatch):
    """The shards and Parquet files each index call opens, in order."""
    calls, real = [], sources._open

    def counting(uri, *args, **kwargs):
        calls.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(sources, "_open", counting)
    return calls


def test_shards_give_the_folders_ids_contributors_and_vectors(ws, tmp_path, training_dir, indexed_template):
    shards = small_world.write_shards(training_dir, tmp_path / "shards", contributor_field="owner")
    result = index_training(
        ws, str(tmp_path / "shards" / "{00000..00003}.tar"), fields=sources.Fields(contributor="owner")
    )
    assert (result.added, result.errors) == (120, 0)
    _same_as_folder(ws, indexed_template)
    first = sql.query(
        ws, "select path, shard, shard_key, shard_member, caption_source from training_images where id = 1"
    )
    assert first.row(0) == (f"{shards[0]}#000000000.png", str(shards[0]), "000000000", "000000000.png", "webdataset")
    assert sql_value(ws, "select count(*) from training_shards where status = 'done' and samples = 30") == 4


def test_parquet_with_image_bytes_or_paths_gives_the_folders_index(ws, tmp_path, training_dir, indexed_template):
    small_world.write_parquet(training_dir, tmp_path / "bytes" / "train.parquet", images="bytes")
    assert index_training(ws, str(tmp_path / "bytes" / "*.parquet")).added == 120
    _same_as_folder(ws, indexed_template)
    assert sql_value(ws, "select shard_member from training_images where shard_key = '7'") == "image"

    by_path = workspace.init(tmp_path / "by_path", encoder=ws.config.encoder.path)
    manifest = small_world.write_parquet(training_dir, tmp_path / "manifest.parquet", images="paths")
    refused = index_training(by_path, manifest)  # the paths lead out of the Parquet file's folder
    assert (refused.added, refused.errors) == (0, 120)
    assert sql_value(by_path, "select count(*) from training_shards where status = 'done'") == 1
    sql.query(by_path, "delete from training_shards", write=True)
    assert index_training(by_path, manifest, allow_outside=True).added == 120
    _same_as_folder(by_path, indexed_template)
    path, member = sql.query(by_path, "select path, shard_member from training_images where id = 1").row(0)
    assert (path, member) == (str(training_dir / small_world.training_rows(training_dir)[0]["path"]), None)


def test_corrupt_member_and_truncated_shard_are_recorded_and_the_rest_indexed(ws, tmp_path, training_dir, opened):
    shards = small_world.write_shards(training_dir, tmp_path / "shards")
    png = (training_dir / small_world.training_rows(training_dir)[0]["path"]).read_bytes()
    with tarfile.open(shards[0], "a") as tar:  # a sample whose image bytes are cut short
        small_world.add_member(tar, "bad.png", png[: len(png) // 2])
        small_world.add_member(tar, "bad.txt", b"a broken one")
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # cut mid-member
    result = index_training(ws, str(tmp_path / "shards" / "*.tar"))
    kept = sql_value(ws, f"select count(*) from training_images where shard = '{shards[1]}'")
    assert 0 < kept < 30 and result.added == 90 + kept
    errors = dict(sql.query(ws, "select code, path from index_errors").rows())
    assert errors == {"corrupt": f"{shards[0]}#bad.png", "corrupt_shard": str(shards[1])}
    status = dict(sql.query(ws, "select shard, status from training_shards").rows())
    assert status == {str(s): "failed" if s == shards[1] else "done" for s in shards}

    # A rerun reads only the failed shard again; what it had read is not embedded again.
    opened.clear()
    again = index_training(ws, str(tmp_path / "shards" / "*.tar"))
    assert opened == [str(shards[1])] and (again.added, again.unchanged) == (0, kept)


def test_index_killed_mid_shard_resumes_at_that_shard(
    ws, tmp_path, training_dir, indexed_template, monkeypatch, opened
):
    small_world.write_shards(training_dir, tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{00000..00003}.tar")
    real, commits = IndexLedger.commit, []

    def commit(self, *args):
        commits.append(1)
        if len(commits) == 6:  # batches of 8: shard 0 (30) takes 4, shard 1's second batch is in flight
            raise KeyboardInterrupt  # the kill, after the vectors are written
        return real(self, *args)

    monkeypatch.setattr(IndexLedger, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        index_training(ws, pattern, batch_size=8)
    monkeypatch.setattr(IndexLedger, "commit", real)
    assert sql_value(ws, "select count(*) from training_images") == 38
    assert sql_value(ws, "select count(*) from training_shards") == 1

    opened.clear()
    result = index_training(ws, pattern, batch_size=8)
    assert opened == [pattern.replace("{00000..00003}", f"0000{n}") for n in (1, 2, 3)]
    assert (result.added, result.unchanged) == (120 - 38, 8)  # shard 1's committed batch is not embedded again
    _same_as_folder(ws, indexed_template)


def test_shards_added_later_are_read_on_their_own(ws, tmp_path, training_dir, opened):
    shards = small_world.write_shards(training_dir, tmp_path / "all")
    (tmp_path / "shards").mkdir()
    for shard in shards[:2]:
        shutil.copy(shard, tmp_path / "shards")
    assert index_training(ws, str(tmp_path / "shards" / "*.tar")).added == 60
    for shard in shards[2:]:
        shutil.copy(shard, tmp_path / "shards")
    opened.clear()
    assert index_training(ws, str(tmp_path / "shards" / "*.tar")).added == 60
    assert [p.rsplit("/", 1)[1] for p in opened] == ["00002.tar", "00003.tar"]


def test_switching_encoders_re_embeds_images_from_their_shards(ws, tmp_path, training_dir, indexed_template):
    small_world.write_shards(training_dir, tmp_path / "shards")
    small_world.write_parquet(training_dir, tmp_path / "extra.parquet")  # the same content again: nothing new
    index_training(ws, str(tmp_path / "shards" / "*.tar"))
    other = small_world.build_encoder(tmp_path / "other", seed=3)
    result = reindex(ws, other)
    assert (result.added, result.re_embedded, result.errors) == (0, 120, 0)
    shutil.copytree(indexed_template.root, tmp_path / "folder", symlinks=True)
    folder = workspace.load(tmp_path / "folder")
    reindex(folder, other)
    mine, theirs = _vectors(ws), _vectors(folder)
    assert mine.keys() == theirs.keys()
    np.testing.assert_allclose(np.stack([mine[k] for k in theirs]), np.stack(list(theirs.values())), atol=1e-6)


def test_cli_indexes_shards_and_report_thumbnails_are_read_from_them(ws, tmp_path, training_dir, outputs_dir):
    small_world.write_shards(training_dir, tmp_path / "shards", contributor_field="owner")
    pattern = str(tmp_path / "shards" / "{00000..00003}.tar")
    result = CliRunner().invoke(
        app, ["index", pattern, "--contributor-field", "owner"], env={"AUDIT_WORKSPACE": str(ws.root)}
    )
    assert result.exit_code == 0, result.output
    assert sql_value(ws, "select count(distinct contributor_id) from training_images") == 4
    scan(ws, outputs_dir, top_k=3)
    page = build_report(ws, tmp_path / "report", pool=Decimal("100")).statements["ana"].read_text()
    # A training image's path names a shard member, not a file: its thumbnail can only come from the shard.
    assert re.search(r'<img class="thumb" src="data:image/png;base64,[^"]+" alt="training image \d+"', page)
    assert '<div class="nothumb">' not in page


def test_shards_and_parquet_on_s3_are_read_with_the_storage_settings(
    s3, tmp_path, tiny_encoder, training_dir, indexed_template
):
    endpoint, client = s3
    shards = small_world.write_shards(training_dir, tmp_path / "shards")
    manifest = small_world.write_parquet(training_dir, tmp_path / "train.parquet")
    for path in (*shards, manifest):
        client.upload_file(str(path), S3_BUCKET, f"data/{path.name}")
    created = workspace.init(tmp_path / "ws", encoder=tiny_encoder)
    created.config.storage = created.config.storage.override(endpoint=endpoint, region="us-east-1")
    created.save()
    pattern = f"s3://{S3_BUCKET}/data/{{00000..00003}}.tar"
    with pytest.raises(AuditError, match=r"allow_http = true"):
        index_training(workspace.load(created.root), pattern)
    created.config.storage = created.config.storage.override(allow_http=True)
    created.save()
    ws = workspace.load(created.root)  # the endpoint as read from audit.toml; the environment names none
    result = index_training(ws, pattern)
    assert (result.added, result.errors) == (120, 0)
    _same_as_folder(ws, indexed_template)
    shard, member, key = sql.query(ws, "select shard, shard_member, shard_key from training_images where id = 1").row(0)
    assert (shard, member) == (f"s3://{S3_BUCKET}/data/00000.tar", "000000000.png")

    # A glob over the bucket finds the Parquet manifest: the same images, nothing new.
    again = index_training(ws, f"s3://{S3_BUCKET}/data/*.parquet")
    assert (again.added, again.unchanged, again.errors) == (0, 120, 0)
    rows = small_world.training_rows(training_dir)
    png = (training_dir / rows[0]["path"]).read_bytes()
    # What a report's thumbnail reads: a shard's member, a Parquet row's cell.
    assert sources.read_image("", shard, member, key, ws.limits, ws.storage) == png
    parquet = f"s3://{S3_BUCKET}/data/{manifest.name}"
    seventh = (training_dir / rows[7]["path"]).read_bytes()
    assert sources.read_image("", parquet, "image", "7", ws.limits, ws.storage) == seventh

    # Re-embedding for another encoder reads every image from its shard in the bucket again.
    redone = reindex(ws, small_world.build_encoder(tmp_path / "other", seed=3))
    assert (redone.re_embedded, redone.errors) == (120, 0)


def test_the_teacher_reads_training_images_from_their_shards(ws, tmp_path, training_dir, outputs_dir, cheap_teacher):
    from auditor.confirm import confirm
    from auditor.teacher import registered

    small_world.write_shards(training_dir, tmp_path / "shards", contributor_field="owner")
    index_training(ws, str(tmp_path / "shards" / "{00000..00003}.tar"), fields=sources.Fields(contributor="owner"))
    scan(cheap_teacher(ws), outputs_dir, top_k=3)
    with Store(ws.db_path, read_only=True) as store:
        rows = registered(store)
    loaded = diffusion.load(ws.model_source(), torch.device("cpu"), ws.dir / "cache")
    training = diffusion.TrainingSet(loaded, rows, ws.limits, ws.storage)
    # A path here names a shard member ("...tar#000000000.png"), no file: the pixels can only come from the shard.
    assert not Path(rows[0][1]).exists()
    sha = sql_value(ws, f"select sha256 from training_images where id = {rows[0][0]}")
    source = next(p for p in training_dir.rglob("*.png") if hashlib.sha256(p.read_bytes()).hexdigest() == sha)
    folder_image = diffusion.read_image(str(source), ws.limits)
    assert np.array_equal(np.asarray(training.image(rows[0][0])), np.asarray(folder_image))
    result = confirm(ws, top=1, candidates=6, controls=2)
    assert result.generations == 1 and not result.failed
