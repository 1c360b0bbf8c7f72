"""audit.toml is typed and strict: unknown sections, keys and options are refused in one line, and its reference
(docs/config.md) is generated from the settings themselves."""

import dataclasses
from pathlib import Path

import pytest

from auditor import config, workspace
from auditor.errors import AuditError

from .helpers import audit

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_current():
    assert DOCS.read_text() == config.reference(), "run `make docs`"


def test_every_setting_has_a_help_text_and_round_trips_through_toml(tmp_path):
    ws = workspace.init(tmp_path)
    for section in config.SECTIONS:
        for f in dataclasses.fields(section):
            assert f.metadata["help"], (section.name, f.name)
    assert workspace.load(tmp_path).config == ws.config


@pytest.mark.parametrize("section", [s.name for s in config.SECTIONS])
def test_an_unknown_key_in_any_section_is_refused_naming_key_and_section(tmp_path, section):
    ws = workspace.init(tmp_path)
    text = ws.config_path.read_text().replace(f"[{section}]\n", f"[{section}]\nepoch = 3\n")
    ws.config_path.write_text(text)
    with pytest.raises(AuditError) as caught:
        workspace.load(tmp_path)
    message = str(caught.value)
    assert f"[{section}] has no setting 'epoch'" in message and "\n" not in message
    assert str(ws.config_path) in message


def test_the_cli_refuses_an_unknown_key_in_one_line(tmp_path):
    ws = workspace.init(tmp_path)
    ws.config_path.write_text(ws.config_path.read_text().replace("[distill]\n", "[distill]\nepoch = 3\n"))
    proc = audit("sql", "select 1", ws=ws, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "[distill] has no setting 'epoch'" in proc.stderr
    assert "epochs" in proc.stderr  # the settings it does have are named


def test_an_unknown_section_a_wrong_type_and_a_value_outside_its_choices_are_refused(tmp_path):
    ws = workspace.init(tmp_path)
    original = ws.config_path.read_text()
    for edit, expected in (
        (original + "\n[distil]\nepochs = 3\n", "no section [distil]"),
        (original.replace("top_k = 50", 'top_k = "fifty"'), "[scan] top_k must be an integer"),
        (original.replace("layernorm = true", "layernorm = 1"), "[distill] layernorm must be true or false"),
        (original.replace('method = "abu"', 'method = "trak"'), "[confirm] method is 'trak'; use abu, dtrak"),
        (original.replace("hidden_dims = [", 'hidden_dims = ["a", '), "[distill] hidden_dims must be an integer"),
    ):
        ws.config_path.write_text(edit)
        with pytest.raises(AuditError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            workspace.load(tmp_path)


def test_a_missing_key_falls_back_to_its_default_and_a_retired_key_is_dropped(tmp_path):
    ws = workspace.init(tmp_path)
    text = (
        ws.config_path.read_text()
        .replace("nprobes = 20\n", "")
        .replace("[index]\n", '[index]\nindex_type = "IVF_PQ"\n')
    )
    ws.config_path.write_text(text)
    loaded = workspace.load(tmp_path)
    assert loaded.config.index.nprobes == config.IndexSettings.nprobes
    loaded.save()
    assert "index_type" not in ws.config_path.read_text()


def test_overrides_are_checked_like_the_file():
    settings = config.DistillSettings()
    assert settings.override(epochs=3, lr=None).epochs == 3 and settings.override(lr=None).lr == settings.lr
    with pytest.raises(AuditError, match=r"epoch: no \[distill\] setting"):
        settings.override(epoch=3)
    with pytest.raises(AuditError, match=r"\[distill\] epochs must be an integer"):
        settings.override(epochs="3")


def test_hashes_of_what_changes_the_scores_leave_memory_settings_out():
    base = config.ConfirmSettings()
    assert base.hash("m") == base.override(batch_size=7).hash("m") != base.override(draws=7).hash("m")
    # Picking and judging the candidates is not scoring: a collection stays resumable when they change.
    assert base.scoring_hash("m") == base.override(candidates=5, k=3).scoring_hash("m") != base.hash("m")
    # Neither is which teacher `audit confirm` runs by default, or the flip setting (hashed as the model applies it).
    assert base.hash("m") == base.override(method="dtrak", flip="off").hash("m")
    dtrak = config.DtrakSettings()
    assert dtrak.hash("m") == dtrak.override(batch_size=1).hash("m") != dtrak.override(dim=8).hash("m")


def test_eval_modes_are_subcommands_that_refuse_each_others_options(tmp_path):
    ws = workspace.init(tmp_path)
    for args in (
        ("eval", "teacher", "--exemplars", tmp_path),
        ("eval", "counterfactual", "--replicate"),
        ("eval", "planted", "--exemplars", tmp_path, "--remove", "3"),
    ):
        proc = audit(*args, ws=ws, check=False)
        assert proc.returncode == 2 and "No such option" in proc.stderr, args
