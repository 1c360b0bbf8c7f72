from pathlib import Path

from auditor.cli.reference import reference


def test_cli_reference_is_current():
    doc = Path(__file__).parent.parent / "docs" / "cli.md"
    assert doc.read_text() == reference(), "docs/cli.md is stale: run `make docs`"


def test_help_shows_setting_names_in_brackets_verbatim():
    from typer.testing import CliRunner

    from auditor.cli import app

    runner = CliRunner()
    for args, text in ((["scan", "--help"], "[scan] top_k"), (["model", "alias", "--help"], "[model] hashes")):
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0 and text in result.output, result.output
