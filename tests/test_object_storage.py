"""LanceDB on an S3-compatible server (moto's, started on loopback by the test): `[paths] lancedb = s3://...` with the
endpoint and plain HTTP from audit.toml only gives the rankings of a local folder."""

import shutil

import pytest

from auditor import sql, workspace
from auditor.index import index_training
from auditor.scan import scan

from .helpers import S3_BUCKET, sql_value


def _ranking(ws):
    return sql.query(
        ws,
        "select g.sha256, a.rank, a.training_id, t.contributor_id from attributions a"
        " join generations g on g.id = a.generation_id join training_images t on t.id = a.training_id order by 1, 2",
    )


def test_index_and_scan_with_lancedb_on_s3_match_a_local_folder(
    s3, tmp_path, tiny_encoder, training_dir, outputs_dir, indexed_template
):
    endpoint, client = s3
    created = workspace.init(tmp_path / "remote", encoder=tiny_encoder, lancedb=f"s3://{S3_BUCKET}/team/audit")
    created.config.storage = created.config.storage.override(endpoint=endpoint, region="us-east-1", allow_http=True)
    created.save()
    remote = workspace.load(created.root)  # the settings as read from audit.toml
    assert remote.storage_options == {
        "aws_endpoint": endpoint,
        "aws_region": "us-east-1",
        "allow_http": "true",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    result = index_training(remote, training_dir)
    assert (result.added, result.rows) == (120, 120)
    stored = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"team/audit/training_{result.encoder_id}.lance/")
    assert stored["KeyCount"] > 0
    scan(remote, outputs_dir, top_k=5)

    local = workspace.load(shutil.copytree(indexed_template.root, tmp_path / "local", symlinks=True))
    scan(local, outputs_dir, top_k=5)
    assert _ranking(remote).equals(_ranking(local))
    assert sql_value(remote, "select uri from vector_tables") == f"s3://{S3_BUCKET}/team/audit"

    # The table is the workspace's: a second workspace on the same prefix is refused.
    other = workspace.init(tmp_path / "other", encoder=tiny_encoder, lancedb=f"s3://{S3_BUCKET}/team/audit")
    other.config.storage = remote.config.storage
    with pytest.raises(Exception, match=r"belongs to workspace"):
        index_training(other, training_dir)
    assert index_training(remote, training_dir).unchanged == 120
