"""index → scan → sql, the fast attribution path end to end."""

import shutil

import numpy as np
import pytest

from auditor import sql
from auditor.errors import AuditError
from auditor.index import index_training
from auditor.scan import scan

from . import small_world
from .helpers import audit, sql_value


def test_index_registers_images_contributors_and_vectors(indexed_template, training_dir):
    ws = indexed_template
    assert sql_value(ws, "select count(*) from training_images") == 120
    assert sql_value(ws, "select count(*) from contributors") == 4
    assert sql_value(ws, "select count(*) from training_images where caption_source = 'manifest'") == 120
    assert sql_value(ws, "select name from contributors where id = 'ana'") == "Ana Studio"
    assert sql_value(ws, "select rows from vector_tables") == 120
    assert sql_value(ws, "select count(distinct contributor_id) from training_images") == 4


def test_reindex_adds_only_new_images(indexed_ws, training_dir, tmp_path):
    grown = tmp_path / "training"
    shutil.copytree(training_dir, grown)
    small_world.digit_image(np.eye(8) * 16, (0, 0, 0), (255, 255, 255)).save(grown / "ana" / "new.png")
    with open(grown / "contributors.csv", "a") as fh:
        fh.write("ana/new.png,ana,Ana Studio,a black handwritten one on white paper,CC-BY-4.0\n")
    result = index_training(indexed_ws, grown)
    assert (result.added, result.unchanged) == (1, 120)
    assert sql_value(indexed_ws, "select rows from vector_tables") == 121
    again = index_training(indexed_ws, grown)
    assert again.added == 0 and again.rows == 121


def test_index_without_manifest_uses_folders_as_contributors_and_sidecar_captions(ws, tmp_path):
    root = tmp_path / "plain"
    (root / "zoe").mkdir(parents=True)
    for i in range(3):
        small_world.digit_image(np.eye(8) * (i + 5), (0, 0, 0), (255, 255, 255)).save(root / "zoe" / f"{i}.png")
    (root / "zoe" / "0.txt").write_text("a diagonal stroke\n")
    result = index_training(ws, root)
    assert result.added == 3
    rows = sql.query(ws, "select contributor_id, caption, caption_source from training_images order by id").rows()
    assert rows[0] == ("zoe", "a diagonal stroke", "sidecar_txt")
    assert rows[1] == ("zoe", None, "none")


def test_scan_then_sql_counts_generations_times_k(indexed_ws, outputs_dir):
    audit("scan", outputs_dir, "--top-k", 7, ws=indexed_ws)
    proc = audit("sql", "select count(*) as n from attributions", "--format", "csv", ws=indexed_ws)
    generations = sql_value(indexed_ws, "select count(*) from generations")
    assert generations == 24
    assert int(proc.stdout.splitlines()[1]) == generations * 7


def test_shares_sum_to_one_and_ranks_follow_scores(indexed_ws, outputs_dir):
    scan(indexed_ws, outputs_dir, top_k=10)
    sums = sql.query(indexed_ws, "select generation_id, sum(share) s, count(*) n from attributions group by 1")
    assert np.allclose(sums["s"].to_numpy(), 1.0, atol=1e-9)
    assert set(sums["n"].to_list()) == {10}
    bad = sql_value(
        indexed_ws,
        "select count(*) from attributions a join attributions b on a.generation_id = b.generation_id "
        "and a.rank + 1 = b.rank where a.score < b.score or a.share < b.share",
    )
    assert bad == 0


def test_prompts_are_read_from_every_source(indexed_ws, outputs_dir):
    scan(indexed_ws, outputs_dir, top_k=3)
    counts = dict(sql.query(indexed_ws, "select prompt_source, count(*) from generations group by 1").rows())
    assert counts == {"sidecar_txt": 6, "comfyui": 6, "a1111": 6, "none": 6}
    assert (
        sql_value(indexed_ws, "select count(*) from generations where prompt_source = 'none' and prompt is not null")
        == 0
    )
    prompt = sql_value(indexed_ws, "select prompt from generations where prompt_source = 'a1111' limit 1")
    assert prompt.startswith("a ") and "Negative prompt" not in prompt and "Steps:" not in prompt


def test_rescan_adds_zero_rows(indexed_ws, outputs_dir):
    first = scan(indexed_ws, outputs_dir, top_k=5)
    before = sql_value(indexed_ws, "select count(*) from attributions")
    second = scan(indexed_ws, outputs_dir, top_k=5)
    assert (first.attributed, second.attributed, second.skipped) == (24, 0, 24)
    assert sql_value(indexed_ws, "select count(*) from attributions") == before
    assert sql_value(indexed_ws, "select count(*) from generations") == 24
    assert sql.query(indexed_ws, "select status from scans order by id")["status"].to_list() == ["finished", "finished"]


def test_same_image_under_two_names_is_one_generation(indexed_ws, outputs_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(outputs_dir, copy)
    first = sorted(copy.glob("*.png"))[0]
    shutil.copy(first, copy / "duplicate.png")
    result = scan(indexed_ws, copy, top_k=3)
    assert result.attributed == 24 and result.skipped == 1


def test_scan_before_index_says_what_to_do(ws, outputs_dir):
    with pytest.raises(AuditError, match="audit index"):
        scan(ws, outputs_dir)


def test_sql_is_read_only_unless_write(indexed_ws):
    proc = audit("sql", "delete from contributors", ws=indexed_ws, check=False)
    assert proc.returncode == 1
    assert "--write" in proc.stderr and "Traceback" not in proc.stderr
    assert sql_value(indexed_ws, "select count(*) from contributors") == 4
    audit("sql", "update contributors set name = 'Renamed' where id = 'ana'", "--write", ws=indexed_ws)
    assert sql_value(indexed_ws, "select name from contributors where id = 'ana'") == "Renamed"


def test_sql_errors_are_one_line(indexed_ws):
    proc = audit("sql", "select nope from nowhere", ws=indexed_ws, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: SQL error:") and len(proc.stderr.strip().splitlines()) == 1


def test_sql_output_formats(indexed_ws, tmp_path):
    import json

    import polars as pl

    q = "select id, name from contributors order by id"
    as_json = json.loads(audit("sql", q, "--format", "json", ws=indexed_ws).stdout)
    assert [row["id"] for row in as_json] == ["ana", "ben", "chloe", "dmitri"]
    audit("sql", q, "--format", "parquet", "--out", tmp_path / "c.parquet", ws=indexed_ws)
    assert pl.read_parquet(tmp_path / "c.parquet")["id"].to_list() == ["ana", "ben", "chloe", "dmitri"]
    table = audit("sql", q, ws=indexed_ws).stdout
    assert "dmitri" in table and "Dmitri Studio" in table
