"""The import rules of the architecture: the maths never reaches for files, processes or the
command line, so data flows one way (files -> engine -> method -> engine -> files)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "epimer"

#: module (or package) -> what it may never import
RULES = {
    "methods": ("epimer.distributed", "epimer.engine", "epimer.io", "epimer.cli", "yaml"),
    "frechet.py": ("epimer.distributed", "epimer.engine", "epimer.io", "epimer.cli", "epimer.methods", "yaml"),
    "basis.py": ("epimer.distributed", "epimer.engine", "epimer.io", "epimer.cli", "epimer.methods", "yaml"),
    "diagnostics.py": ("epimer.distributed", "epimer.engine", "epimer.io", "epimer.cli", "yaml"),
    "curvature": ("epimer.engine", "epimer.io", "epimer.cli", "yaml"),
    "progress.py": ("epimer.engine",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("where", sorted(RULES))
def test_import_rules(where: str) -> None:
    target = SRC / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    broken = [f"{f.relative_to(SRC)} imports {name}" for f in files for name in sorted(_imports(f))
              if any(name == bad or name.startswith(bad + ".") for bad in RULES[where])]
    assert broken == []
