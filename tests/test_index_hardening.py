"""`audit index` hardening (issue #24): the training manifest is confined and checked, and the two stores agree
before anything reads them."""

from __future__ import annotations

import csv
import os
import shutil
from decimal import Decimal

import numpy as np
import pytest

from auditor import sql
from auditor.errors import AuditError
from auditor.index import IndexLedger, index_training
from auditor.report import build_report
from auditor.scan import scan
from auditor.search import VectorTable

from . import small_world
from .helpers import sql_value


def _image(path, k: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    small_world.digit_image(np.eye(8) * (k % 16) + k // 16, (k * 7 % 255, 0, 0), (255, 255, 255)).save(path)
    return path


def _manifest(root, rows, encoding="utf-8"):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "contributors.csv", "w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "contributor_id", "contributor_name", "caption"])
        writer.writerows(rows)
    return root / "contributors.csv"


def _errors(ws):
    return sql.query(ws, "select path, code, reason from index_errors order by path").rows()


def _owners(ws):
    return sql.query(ws, "select path, contributor_id from training_images order by path").rows()


def _contributors(ws):
    return [r[0] for r in sql.query(ws, "select id from contributors order by id").rows()]


def test_manifest_paths_outside_training_dir_are_refused_unless_allowed(ws, tmp_path, tiny_encoder):
    root = tmp_path / "training"
    _image(root / "ana" / "in.png", 1)
    _image(tmp_path / "outside.png", 2)
    absolute = _image(tmp_path / "elsewhere" / "abs.png", 3)
    target = _image(tmp_path / "elsewhere" / "target.png", 4)
    os.symlink(target, root / "ana" / "link.png")
    _manifest(
        root,
        [
            ["ana/in.png", "ana"],
            ["../outside.png", "ana"],
            [str(absolute), "ana"],
            ["ana/link.png", "ana"],
            ["/etc/passwd", "ana"],
        ],
    )
    result = index_training(ws, root)
    assert (result.added, result.errors) == (1, 4)
    assert _owners(ws) == [(str(root / "ana" / "in.png"), "ana")]
    errors = _errors(ws)
    assert [(p, c) for p, c, _ in errors] == [
        ("/etc/passwd", "outside_training_dir"),
        (str(absolute), "outside_training_dir"),
        (str(tmp_path / "outside.png"), "outside_training_dir"),
        (str(root / "ana" / "link.png"), "outside_training_dir"),
    ]
    assert errors[3][2].startswith(f"resolves to {target}, outside the training folder {root};")

    from auditor import workspace

    allowed = workspace.init(tmp_path / "ws2", encoder=tiny_encoder)
    result = index_training(allowed, root, allow_outside=True)
    assert (result.added, result.errors) == (4, 1)  # /etc/passwd is read now, and is not an image
    assert [(p, c) for p, c, _ in _errors(allowed)] == [("/etc/passwd", "not_an_image")]


def test_same_path_for_two_contributors_is_registered_without_owner_and_recorded(ws, tmp_path):
    root = tmp_path / "training"
    _image(root / "a.png", 1)
    _image(root / "b.png", 2)
    _manifest(root, [["a.png", "ana"], ["b.png", "ben"], ["a.png", "ben"], ["a.png", "ana"]])
    result = index_training(ws, root)
    assert (result.added, result.errors) == (2, 1)
    assert _owners(ws) == [(str(root / "a.png"), None), (str(root / "b.png"), "ben")]
    assert _errors(ws) == [
        (
            str(root / "a.png"),
            "conflict_path",
            "listed for contributors ana and ben; indexed without a contributor until the manifest lists it for one",
        )
    ]
    assert _contributors(ws) == ["ben"]  # ana has no image indexed under her name
    # The manifest corrected: the image gets its one owner.
    _manifest(root, [["a.png", "ana"], ["b.png", "ben"]])
    result = index_training(ws, root)
    assert (result.added, result.unchanged, result.errors) == (0, 2, 0)
    assert _owners(ws) == [(str(root / "a.png"), "ana"), (str(root / "b.png"), "ben")]
    assert _contributors(ws) == ["ana", "ben"]


def test_same_bytes_for_two_contributors_is_registered_without_owner_and_recorded(ws, tmp_path):
    root = tmp_path / "training"
    _image(root / "ana" / "x.png", 1)
    (root / "ben").mkdir()
    shutil.copy(root / "ana" / "x.png", root / "ben" / "y.png")
    _image(root / "ben" / "z.png", 2)
    _manifest(root, [["ana/x.png", "ana"], ["ben/z.png", "ben"], ["ben/y.png", "ben"]])
    # Batches of one: ana/x.png is committed to ana before ben/y.png is read.
    result = index_training(ws, root, batch_size=1)
    assert (result.added, result.unchanged, result.errors) == (2, 1, 1)
    assert _owners(ws) == [(str(root / "ana" / "x.png"), None), (str(root / "ben" / "z.png"), "ben")]
    assert _errors(ws) == [
        (
            str(root / "ben" / "y.png"),
            "conflict_content",
            f"same bytes as {root / 'ana' / 'x.png'} (listed for contributor ana); listed here for contributor ben;"
            " indexed without a contributor until the manifest lists it for one",
        )
    ]
    assert _contributors(ws) == ["ana", "ben"]  # ana was registered with x.png before the conflict showed


def test_registered_owner_stands_when_the_manifest_lists_the_bytes_for_another(ws, tmp_path):
    root = tmp_path / "training"
    _image(root / "ana" / "x.png", 1)
    _manifest(root, [["ana/x.png", "ana"]])
    index_training(ws, root)
    (root / "ben").mkdir()
    shutil.copy(root / "ana" / "x.png", root / "ben" / "y.png")
    _manifest(root, [["ben/y.png", "ben"]])
    result = index_training(ws, root)
    assert (result.added, result.errors) == (0, 1)
    assert _owners(ws) == [(str(root / "ana" / "x.png"), "ana")]
    assert _errors(ws) == [
        (
            str(root / "ben" / "y.png"),
            "conflict_content",
            f"same bytes as training image 1 ({root / 'ana' / 'x.png'}), registered to contributor ana;"
            " listed here for contributor ben; it stays ana's",
        )
    ]


def test_contributor_whose_every_image_failed_is_not_registered(ws, tmp_path):
    root = tmp_path / "training"
    _image(root / "ana" / "0.png", 1)
    (root / "zed").mkdir()
    (root / "zed" / "0.png").write_bytes(b"not an image at all")
    _manifest(root, [["ana/0.png", "ana", "Ana"], ["zed/0.png", "zed", "Zed"], ["zed/gone.png", "zed", "Zed"]])
    result = index_training(ws, root)
    assert (result.added, result.errors) == (1, 2)
    assert _contributors(ws) == ["ana"]
    assert [c for _, c, _ in _errors(ws)] == ["not_an_image", "unreadable"]


def test_bom_manifest_is_read_and_its_text_cleaned(ws, tmp_path):
    root = tmp_path / "training"
    _image(root / "ana" / "0.png", 1)
    _manifest(root, [["ana/0.png", "ana", "Ana\x00 Studio", "a red\x01 one\r\non cream"]], encoding="utf-8-sig")
    assert (root / "contributors.csv").read_bytes().startswith(b"\xef\xbb\xbfpath,")
    result = index_training(ws, root)
    assert (result.added, result.errors) == (1, 0)
    assert sql_value(ws, "select name from contributors where id = 'ana'") == "Ana Studio"
    assert sql_value(ws, "select caption from training_images") == "a red one\non cream"


def test_long_csv_field_error_names_the_file_and_line(ws, tmp_path):
    root = tmp_path / "training"
    _image(root / "ana" / "0.png", 1)
    _image(root / "ana" / "1.png", 2)
    long_caption = "a red one " * 20_000  # 200 000 characters: over csv's default limit, under the sidecar read limit
    manifest = _manifest(
        root, [["ana/0.png", "ana", "Ana", long_caption], ["ana/1.png", "ana", "Ana", "x" * 2_000_000]]
    )
    with pytest.raises(AuditError) as err:
        index_training(ws, root)
    assert str(err.value) == f"manifest {manifest}, line 3: field larger than field limit (1048576)"
    _manifest(root, [["ana/0.png", "ana", "Ana", long_caption]])
    assert index_training(ws, root).added == 1
    assert sql_value(ws, "select caption from training_images") == long_caption[: ws.config.scan.max_text_chars]
    assert csv.field_size_limit() == 131072  # restored


# --------------------------------------------------------------------------- the stores agree


def _crashed_index(ws, training_dir, monkeypatch, batch_size=40):
    """`audit index` killed after its second batch's LanceDB append, before that batch's DuckDB commit."""
    real, calls = IndexLedger.commit, []

    def commit(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return real(self, *args)

    monkeypatch.setattr(IndexLedger, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        index_training(ws, training_dir, batch_size=batch_size)
    monkeypatch.setattr(IndexLedger, "commit", real)


def _reference(tmp_path, tiny_encoder, training_dir, outputs_dir, n):
    """An uninterrupted index of the manifest's first n rows (what the crashed index committed), then a scan."""
    from auditor import workspace

    with open(training_dir / "contributors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    manifest = tmp_path / "first.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "path": str(training_dir / row["path"])} for row in rows)
    ref = workspace.init(tmp_path / "ref", encoder=tiny_encoder)
    index_training(ref, training_dir, manifest, batch_size=40)
    scan(ref, outputs_dir, top_k=5)
    return ref


ATTRIBUTIONS = (
    "select g.sha256, a.rank, a.training_id, t.contributor_id, a.share from attributions a"
    " join generations g on g.id = a.generation_id left join training_images t on t.id = a.training_id order by 1, 2"
)
DANGLING = "select count(*) from attributions a where a.training_id not in (select id from training_images)"


def _payouts(ws, out):
    result = build_report(ws, out, pool=Decimal("1000.00"))
    return sorted(zip(result.payouts["contributor_id"].to_list(), result.payouts["amount_minor"].to_list()))


def _vectors(ws):
    encoder_id, dim = sql.query(ws, "select id, dim from encoders").row(0)
    return VectorTable(ws.lancedb_uri, encoder_id, dim, ws.config.index).count()


def test_scan_after_index_killed_between_lance_append_and_duckdb_commit_attributes_committed_images_only(
    ws, tmp_path, monkeypatch, training_dir, outputs_dir, tiny_encoder
):
    _crashed_index(ws, training_dir, monkeypatch)
    assert (sql_value(ws, "select count(*) from training_images"), _vectors(ws)) == (40, 80)
    assert _contributors(ws) == ["ana", "ben"]  # chloe and dmitri had nothing committed

    scan(ws, outputs_dir, top_k=5)
    assert _vectors(ws) == 40
    assert sql_value(ws, DANGLING) == 0
    ref = _reference(tmp_path, tiny_encoder, training_dir, outputs_dir, 40)
    assert sql.query(ws, ATTRIBUTIONS).equals(sql.query(ref, ATTRIBUTIONS))
    assert _payouts(ws, tmp_path / "r1") == _payouts(ref, tmp_path / "r2")


def test_rankings_citing_unregistered_ids_are_refused_by_report_and_redone_by_scan(
    ws, tmp_path, monkeypatch, training_dir, outputs_dir, tiny_encoder
):
    """A store made before the check: a scan searched the uncommitted vectors."""
    _crashed_index(ws, training_dir, monkeypatch)
    monkeypatch.setattr("auditor.scan.reconcile", lambda store, table: (0, 0))
    scan(ws, outputs_dir, top_k=5)
    monkeypatch.undo()
    dangling = sql_value(ws, DANGLING)
    assert dangling > 0
    with pytest.raises(AuditError, match=r"attribution row\(s\) of \d+ generation\(s\) cite training images"):
        build_report(ws, tmp_path / "refused", pool=Decimal("1000.00"))

    scan(ws, outputs_dir, top_k=5)
    assert sql_value(ws, DANGLING) == 0
    ref = _reference(tmp_path, tiny_encoder, training_dir, outputs_dir, 40)
    ours, theirs = sql.query(ws, ATTRIBUTIONS), sql.query(ref, ATTRIBUTIONS)
    # The rankings kept from the first scan were computed by a product over 80 vectors instead of 40: same top-k,
    # float32 rounding apart.
    assert ours.drop("share").equals(theirs.drop("share"))
    assert np.abs(ours["share"].to_numpy() - theirs["share"].to_numpy()).max() < 1e-5
    assert _payouts(ws, tmp_path / "r1") == _payouts(ref, tmp_path / "r2")


# --------------------------------------------------------------------------- a workspace owns its vector table


def test_second_workspace_on_the_same_lancedb_location_is_refused_and_the_first_keeps_its_vectors(
    tmp_path, training_dir, outputs_dir, tiny_encoder
):
    from auditor import workspace

    shared = str(tmp_path / "shared-lancedb")
    first = workspace.init(tmp_path / "first", encoder=tiny_encoder, lancedb=shared)
    index_training(first, training_dir)
    scan(first, outputs_dir, top_k=5)
    encoder_id = sql_value(first, "select id from encoders")
    table = VectorTable(first.lancedb_uri, encoder_id, 64, first.config.index)
    ids = np.sort(table.ids())
    vectors, attributions, payouts = (
        table.vectors(ids),
        sql.query(first, ATTRIBUTIONS),
        _payouts(first, tmp_path / "r1"),
    )

    second = workspace.init(tmp_path / "second", encoder=tiny_encoder, lancedb=shared)
    first_id, second_id = (sql_value(w, "select id from workspace") for w in (first, second))
    assert first_id != second_id
    one = tmp_path / "one"
    shutil.copytree(training_dir / "ana", one / "ana")
    for attempt in (lambda: index_training(second, one), lambda: scan(second, outputs_dir, top_k=5)):
        with pytest.raises(AuditError) as refused:
            attempt()
        message = str(refused.value)
        assert "\n" not in message
        assert f"belongs to workspace {first_id} ({first.dir})" in message
        assert f"not to this workspace {second_id} ({second.dir})" in message
    assert sql_value(second, "select count(*) from training_images") == 0

    # The first workspace's vectors, rankings and payouts are untouched; its re-index finds nothing to do.
    table.table.checkout_latest()
    assert np.array_equal(np.sort(table.ids()), ids)
    assert np.array_equal(table.vectors(ids), vectors)
    again = index_training(first, training_dir)
    assert (again.added, again.re_embedded, again.unchanged) == (0, 0, len(ids))
    scan(first, outputs_dir, top_k=5)
    assert sql.query(first, ATTRIBUTIONS).equals(attributions)
    assert _payouts(first, tmp_path / "r2") == payouts


def test_table_written_before_owners_were_recorded_is_claimed_only_by_its_workspace(
    indexed_ws, tmp_path, tiny_encoder, training_dir
):
    from auditor import workspace
    from auditor.search import OWNER_DIR, OWNER_ID

    encoder_id = sql_value(indexed_ws, "select id from encoders")
    table = VectorTable(indexed_ws.lancedb_uri, encoder_id, 64, indexed_ws.config.index)
    table.table.to_lance().update_config({OWNER_ID: None, OWNER_DIR: None})  # as an older version left it
    table.table.checkout_latest()
    assert table.owner() == (None, None)

    other = workspace.init(
        tmp_path / "other", encoder=tiny_encoder, lancedb=str(tmp_path / "ws" / ".audit" / "lancedb")
    )
    with pytest.raises(AuditError, match=r"holds 120 vectors that no workspace recorded as its own"):
        index_training(other, training_dir)
    assert index_training(indexed_ws, training_dir).unchanged == 120  # listed in its vector_tables: claimed
    table.table.checkout_latest()
    assert table.owner() == (sql_value(indexed_ws, "select id from workspace"), str(indexed_ws.dir))
