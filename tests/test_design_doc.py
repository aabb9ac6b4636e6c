"""docs/design.md's module table names every module of the package, and only those."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_module_table_matches_the_package():
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([\w/]+\.py)`", table))
    package = ROOT / "stackwise_ray"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert modules - listed == set(), "modules missing from docs/design.md's table"
    assert listed - modules == set(), "docs/design.md names modules that do not exist"
