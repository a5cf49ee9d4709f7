"""The layout of docs/architecture.md holds: each module imports only what its paragraph there
allows (so there are no cycles), every module has a paragraph, and none is over 450 lines."""

from __future__ import annotations

import ast
import dataclasses
import re

import config
from conftest import ROOT

MAX_LINES = 450


def modules() -> list[str]:
    return sorted(p.stem for p in ROOT.glob("*.py") if p.name != "setup.py")


def project_imports(name: str) -> set[str]:
    """The project modules `name`.py imports (anywhere in the file, lazy imports included)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(modules())


def allowed_imports() -> dict[str, set[str]]:
    """module -> the modules its docs/architecture.md paragraph lists after "May import:"."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    allowed = {}
    for paragraph in (" ".join(p.split()) for p in text.split("\n\n")):
        head = re.match(r"\*\*`(\w+)\.py`\*\*", paragraph)
        if head:
            rule = paragraph.split("May import:", 1)[1]
            allowed[head.group(1)] = set(re.findall(r"`(\w+)`", rule))
    return allowed


def test_every_module_has_a_paragraph_with_its_imports():
    assert sorted(allowed_imports()) == modules()


def test_each_module_imports_only_what_its_paragraph_allows():
    allowed = allowed_imports()
    extra = {m: sorted(project_imports(m) - allowed[m]) for m in modules()}
    assert {m: e for m, e in extra.items() if e} == {}


def test_no_module_is_over_the_line_limit():
    sizes = {m: len((ROOT / f"{m}.py").read_text().splitlines()) for m in modules()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_setup_installs_every_module():
    """`pip install` (and the `deepcf` command) sees only the modules setup.py lists."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.keywords)
    listed = next(k.value for k in call.keywords if k.arg == "py_modules")
    assert sorted(ast.literal_eval(listed)) == modules()


def test_readme_flag_tables_list_every_flag():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    listed = {name for row in rows for name in re.findall(r"`--(\w+)`", row.split(" | ")[0])}
    missing = [f.name for f in dataclasses.fields(config.Config) if f.name not in listed]
    assert not missing, f"flags without a row in README's flag tables: {missing}"
