"""Imports only go down the layers: runtime <- {models, data_tools} <- {pretrain, finetune}
<- launch (docs/interfaces.md), and no package module exceeds 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "models", "data_tools", "pretrain", "finetune", "launch")
# what each package may import from the others
ALLOWED = {
    "runtime": set(),
    "models": {"runtime"},
    "data_tools": {"runtime"},
    "pretrain": {"runtime", "models", "data_tools"},
    "finetune": {"runtime", "models", "data_tools"},
    "launch": {"runtime", "models", "data_tools", "pretrain", "finetune"},
}
MAX_LINES = 400


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages a module imports (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names)
    return found & set(PACKAGES)


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_down_the_layers(package):
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package]
                                                 - {package})
             for path in modules(package)}
    assert not {k: v for k, v in wrong.items() if v}


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package):
    long = {str(p.relative_to(ROOT)): n for p in modules(package)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long
