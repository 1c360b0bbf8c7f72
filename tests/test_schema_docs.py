"""Every table and column of the store is documented in schemas/README.md (they are public API)."""

import re
from pathlib import Path

from auditor import workspace
from auditor.store import Store


def test_every_table_and_column_is_documented(tmp_path):
    ws = workspace.init(tmp_path)
    doc = (Path(__file__).parent.parent / "schemas" / "README.md").read_text()
    documented_tables = set(re.findall(r"^## `(\w+)`", doc, re.M)) | {"schema_migrations"}
    with Store(ws.db_path) as store:
        columns = store.rows(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'"
        )
    tables = {t for t, _ in columns}
    assert tables <= documented_tables, f"undocumented tables: {tables - documented_tables}"
    documented_columns = set(re.findall(r"^\| `([\w`, ]+)` \|", doc, re.M))
    names = {n.strip(" `") for group in documented_columns for n in group.split(",")}
    missing = {f"{t}.{c}" for t, c in columns if c not in names}
    assert not missing, f"undocumented columns: {missing}"
