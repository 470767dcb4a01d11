"""The layout's rules between sub-packages: library code (solvers, accelerators, runtime) never imports the
testbeds or the sweep, nor the guidance package (which imports the library); evaluation and tests may."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "samplers"
LIBRARY = ("solvers", "accelerators", "runtime")


def imported_modules(path: Path) -> set[str]:
    """Absolute dotted names of everything ``path`` imports (relative imports resolved against its package)."""
    package = ["samplers", path.parent.name]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", [p for sub in LIBRARY for p in sorted((ROOT / sub).glob("*.py"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_code_does_not_import_testbeds_or_the_sweep(path):
    bad = sorted(n for n in imported_modules(path)
                 if n.startswith(("samplers.testbeds", "samplers.evaluation.sweep")))
    assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad}"


@pytest.mark.parametrize("path", [p for sub in LIBRARY for p in sorted((ROOT / sub).glob("*.py"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_code_does_not_import_guidance(path):
    bad = sorted(n for n in imported_modules(path) if n == "guidance" or n.startswith("guidance."))
    assert not bad, f"{path.relative_to(ROOT.parent)} imports {bad} (guidance imports samplers: a cycle)"


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    module = tmp_path / "solvers" / "x.py"
    module.parent.mkdir()
    module.write_text("from ..testbeds.models import ModelOutput\nfrom . import grids\n"
                      "import samplers.evaluation.sweep\n")
    names = imported_modules(module)
    assert {"samplers.testbeds.models", "samplers.solvers.grids", "samplers.evaluation.sweep"} <= names
