"""The package's shape: the core imports no modality, recipes stay thin, and every docstring example runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
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


LIBRARY = ("modaltune.shared", "modaltune.vision", "modaltune.audio", "modaltune.text")


def _library_modules() -> list[str]:
    """Every module of the library, subpackages (``shared/peft/``, ...) included."""
    names = []
    for package in LIBRARY:
        pkg = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")]
    return sorted(names)


def _source(name: str) -> str:
    """A module's source, read without importing it (collection stays fast)."""
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).read_text(encoding="utf-8")


def _modules_with_examples() -> list[str]:
    return [name for name in _library_modules() if ">>>" in _source(name)]


def _run_examples(obj, name: str, globs: dict | None = None) -> doctest.TestResults:
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(obj, name, globs=globs):
        runner.run(test)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name):
    """Every ``>>>`` example in the library runs and prints what it says (doctest, under the installed name).

    Only modules whose source holds an example are collected, and each must run at least one: a module whose
    examples doctest cannot find (or which are all skipped) is a failure, not a pass."""
    module = importlib.import_module(name)
    result = _run_examples(module, name)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    if result.attempted == 0:
        examples = [e for t in doctest.DocTestFinder().find(module, name) for e in t.examples]
        assert examples, f"{name} has '>>>' in its source but doctest finds no example in it"
        assert all(e.options.get(doctest.SKIP) for e in examples), f"{name}: doctest ran none of its examples"
        pytest.skip(f"{name}: its only examples are marked +SKIP (they need installed weights)")


def test_modules_carry_examples_where_the_style_asks():
    """Metric functions carry a runnable example (docs/STYLE: speechbrain ``ErrorRateStats``): every public
    function of a ``metrics`` module runs at least one ``>>>`` line that is not skipped."""
    metric_modules = [n for n in _library_modules() if n.rsplit(".", 1)[-1] == "metrics"]
    assert metric_modules, "no metrics module found in the library"
    bare = []
    for name in metric_modules:
        module = importlib.import_module(name)
        for fname, fn in vars(module).items():
            if fname.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != name:
                continue
            if _run_examples(fn, f"{name}.{fname}").attempted == 0:
                bare.append(f"{name}.{fname}")
    assert not bare, f"metric functions without a runnable example: {bare}"


def test_the_example_count_sees_a_function_without_examples():
    """The guard above can fail: a function with no example attempts nothing."""
    def plain(x):
        """No example here."""
        return x

    def with_example(x):
        """Doubles.

        >>> with_example(2)
        4
        """
        return 2 * x

    assert _run_examples(plain, "plain").attempted == 0
    result = _run_examples(with_example, "with_example", {"with_example": with_example})
    assert (result.attempted, result.failed) == (1, 0)
