"""The package's shape: the core imports no modality, recipes stay thin, and every docstring example runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("modaltune.vision", "modaltune.audio", "modaltune.text", "modaltune.recipes")


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a file, at any depth (functions included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


def test_the_core_imports_no_modality_package():
    """``modaltune.shared`` stands alone: modalities register into it (plugins), it never reaches into them."""
    bad = [f"shared/{path.name}:{line} imports {module}"
           for path in sorted((ROOT / "shared").rglob("*.py")) for line, module in _imports(path)
           if module.startswith(MODALITIES)]
    assert not bad, bad


def test_the_import_check_sees_nested_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from modaltune.vision.vqa import x\n", encoding="utf-8")
    assert _imports(probe) == [(2, "modaltune.vision.vqa")]


def test_recipes_read_as_tables_of_contents():
    """A recipe wires library pieces; data, evaluation passes and plots live in the library."""
    sizes = {p.name: sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
             for p in (ROOT / "recipes").glob("*.py") if p.name != "__init__.py"}
    assert sizes and all(n <= 180 for n in sizes.values()), sizes


def test_tests_and_benches_use_no_recipe_internals():
    """Only a recipe's config schema is public; everything else they need is in the library."""
    bad = []
    for folder in ("tests", "bench"):
        for path in sorted((ROOT / folder).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modaltune.recipes."):
                    bad += [f"{folder}/{path.name}:{node.lineno} {a.name}" for a in node.names
                            if not a.name.endswith("Config")]
    assert not bad, bad


def _library_modules() -> list[str]:
    names = []
    for package in ("modaltune.shared", "modaltune.vision", "modaltune.audio", "modaltune.text"):
        pkg = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
    return sorted(names)


@pytest.mark.parametrize("name", _library_modules())
def test_docstring_examples_run(name):
    """Every ``>>>`` example in the library runs and prints what it says (doctest, under the installed name)."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
