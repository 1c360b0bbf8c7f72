from pathlib import Path

from auditor.cli.reference import reference


def test_cli_reference_is_current():
    doc = Path(__file__).parent.parent / "docs" / "cli.md"
    assert doc.read_text() == reference(), "docs/cli.md is stale: run `make docs`"
