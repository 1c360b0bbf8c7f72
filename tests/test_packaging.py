"""The package as pip installs it: every third-party import is a declared dependency, and the wheel holds every
subpackage, schema and template without setuptools warnings."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(spec) for spec in project["dependencies"]}
    optional = {_requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in (ROOT / "auditor").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "auditor":
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                # The Ray engine's imports are the [ray] extra's, imported only with --engine ray; the C2PA reader's
                # the [c2pa] extra's, imported only when an image holds a manifest (and missing, a warning).
                allowed = declared | (optional if path.name in ("engine_ray.py", "c2pa.py") else set())
                if not dists & allowed:
                    missing.setdefault(top, set()).add(path.name)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_wheel_holds_every_subpackage_schema_and_template_without_setuptools_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    expected = {f"auditor/{p.relative_to(ROOT / 'auditor').as_posix()}" for p in (ROOT / "auditor").rglob("*.py")}
    expected |= {f"auditor/schemas/{p.name}" for p in (ROOT / "schemas").iterdir() if p.suffix in (".sql", ".md")}
    expected |= {f"auditor/templates/{p.name}" for p in (ROOT / "reports" / "templates").glob("*.html")}
    assert expected <= names, sorted(expected - names)
