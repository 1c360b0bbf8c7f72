"""Ground-truth checks in the store (auditor/checks.py, migration 010): `audit confirm --method auto` picks the
teacher by them, the report's index shows them per teacher, and bundle judgements are shown in its method section."""

import json
from decimal import Decimal

from auditor import checks, workspace
from auditor.report import build_report
from auditor.store import Store

from .test_report import seeded  # noqa: F401  (fixture)


def leave_k_out(store, model, **figures):
    """A stored leave-K-out run: method → (relative loss increase, standard error)."""
    results = [checks.Result(m, "relative_loss_increase", v, se) for m, (v, se) in figures.items()]
    return checks.record(
        store,
        "counterfactual",
        model_hash=model,
        encoder_id="enc",
        settings={"k": 10},
        n=4,
        seconds=1.0,
        results=results,
    )


def test_auto_teacher_follows_the_stored_checks(tmp_path):
    ws = workspace.init(tmp_path / "ws")
    with Store(ws.db_path) as store:
        method, why = checks.choose_teacher(store, "m1", "abu")
        assert method == "abu" and "no ground-truth check" in why and "default" in why
        # The leave-10-out figures: D-TRAK leads AbU by more than their combined standard error.
        leave_k_out(store, "m1", abu=(0.0225, 0.0058), fast=(0.0635, 0.0195), dtrak=(0.0527, 0.0109))
        method, why = checks.choose_teacher(store, "m1", "abu")
        assert method == "dtrak" and "+5.27 % ± 1.09" in why and "+2.25 % ± 0.58" in why
        # Another model's checks say nothing about this one.
        assert checks.choose_teacher(store, "m2", "abu")[0] == "abu"
        # A later run where they are within their standard errors: no clear winner, the default, saying so.
        leave_k_out(store, "m1", abu=(0.03, 0.01), dtrak=(0.035, 0.01))
        method, why = checks.choose_teacher(store, "m1", "abu")
        assert method == "abu" and "no clear winner" in why and "within their standard errors" in why
        # Planted ground truth decides when leave-K-out cannot.
        checks.record(
            store,
            "planted",
            model_hash="m1",
            encoder_id="enc",
            settings={},
            n=16,
            seconds=1.0,
            results=[checks.Result("abu", "map", 0.843, 0.03), checks.Result("dtrak", "map", 0.693, 0.04)],
        )
        assert checks.choose_teacher(store, "m1", "dtrak")[0] == "abu"
        table = checks.standings(store, "m1")
        assert set(table) == {"abu", "dtrak"} and set(table["abu"]) == {"counterfactual", "planted"}
        assert store.value("SELECT count(*) FROM eval_results WHERE method = 'fast'") == 1


def test_report_shows_each_teachers_stored_checks_and_bundle_judgements(seeded, tmp_path):  # noqa: F811
    ws, _ = seeded
    empty = build_report(ws, tmp_path / "before", pool=Decimal("100.00")).index.read_text()
    assert empty.count("not run on this workspace") == 3 and "no distilled bundle has been judged" in empty
    with Store(ws.db_path) as store:
        run = leave_k_out(store, "model-hash-1", abu=(0.0225, 0.0058), dtrak=(0.0527, 0.0109))
        bundle = checks.record(
            store,
            "bundle",
            model_hash="model-hash-1",
            encoder_id="enc-distilled",
            settings={"use": False, "reason": "planted mAP 0.734 ± 0.057 vs untuned 0.959 ± 0.015"},
            n=1,
            seconds=0.0,
            results=[checks.Result("fast", "map", 0.734, 0.057), checks.Result("untuned", "map", 0.959, 0.015)],
        )
        assert json.loads(store.value("SELECT settings FROM eval_runs WHERE id = ?", [bundle]))["use"] is False
    index = build_report(ws, tmp_path / "after", pool=Decimal("100.00")).index.read_text()
    abu_row = index[index.index('data-teacher="abu"') :].split("</tr>")[0]
    assert f"+2.25 % ± 0.58 (eval run {run}, n = 4)" in abu_row and abu_row.count("not run on this workspace") == 2
    assert 'data-teacher="dtrak"' in index and "+5.27 % ± 1.09" in index
    assert f'data-bundle-run="{bundle}"' in index and "refused" in index and "0.959 ± 0.015" in index
