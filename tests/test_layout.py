"""The package layout: every module imports, its import graph has no cycle, imports come from the
defining module (no re-exports), the solver imports nothing outside ``solvers``, and no stage imports
``examples``."""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import datamodels_ml

PACKAGE = Path(datamodels_ml.__file__).parent
# The one back edge left: ``solvers.candidates.gram_syrk`` imports ``solvers.blas`` inside the function
# (blas imports kernels, which imports candidates, at module level).
LAZY_BACK_EDGES = {("datamodels_ml.solvers.candidates", "datamodels_ml.solvers.blas")}
STAGES = ("store", "training", "dataset", "regression", "evaluation", "tracking", "solvers")


def module_names() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "datamodels_ml."))


def source(name: str) -> Path:
    path = PACKAGE.parent / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def is_module(name: str) -> bool:
    return source(name).exists()


def imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(source(name).read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("datamodels_ml")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("datamodels_ml"):
            for alias in node.names:  # `from pkg import module` names the module
                full = f"{node.module}.{alias.name}"
                out.add(full if is_module(full) else node.module)
    return {m for m in out if m != name and m != "datamodels_ml"}


def top_level_names(name: str) -> tuple[set[str], set[str]]:
    """(names ``name`` defines, names it only imports)."""
    defined, imported = set(), set()
    for node in ast.walk(ast.parse(source(name).read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {a.asname or a.name.split(".")[0] for a in node.names}
    return defined, imported - defined


@pytest.mark.parametrize("name", [m for m in module_names() if not m.endswith("__main__")])
def test_every_module_imports_and_says_what_it_owns(name):
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{name} opens with no docstring"


def test_the_import_graph_has_no_cycle():
    graph = {m: {n for n in imports(m) if (m, n) not in LAZY_BACK_EDGES} for m in module_names()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_solvers_stay_pure_and_stages_never_import_examples():
    for m in module_names():
        deps = imports(m)
        if m.startswith("datamodels_ml.solvers"):
            assert all(d.startswith("datamodels_ml.solvers") for d in deps), (m, deps)
        if m.split(".")[1] in STAGES:
            assert not any(d.startswith("datamodels_ml.examples") for d in deps), (m, deps)


def test_imports_come_from_the_defining_module():
    """An import from a module of the package names what that module defines (or a submodule), never
    a name it only imports: in the package, its tests, its benchmarks and code they run from a string."""
    root = PACKAGE.parent
    wrong = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        if "solvers" in path.relative_to(root).parts[:2] and path.name == "__init__.py":
            continue  # the solver's package API, kept as it is
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("datamodels_ml"):
                if not is_module(node.module):
                    wrong.append(f"{path}:{node.lineno}: no module {node.module}")
                    continue
                defined, _ = top_level_names(node.module)
                for alias in node.names:
                    if alias.name not in defined and not is_module(f"{node.module}.{alias.name}"):
                        wrong.append(f"{path.relative_to(root)}:{node.lineno}: {node.module} does not define {alias.name}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # code run in a subprocess
                for module, names in re.findall(r"from (datamodels_ml[\w.]*) import ([\w, ]+)", node.value):
                    if not is_module(module):
                        wrong.append(f"{path.relative_to(root)}:{node.lineno}: no module {module} (in a string)")
                        continue
                    defined, _ = top_level_names(module)
                    for name in (n.strip().split(" as ")[0] for n in names.split(",") if n.strip()):
                        if name not in defined and not is_module(f"{module}.{name}"):
                            wrong.append(f"{path.relative_to(root)}:{node.lineno}: {module} does not define {name} (in a string)")
    assert not wrong, "\n".join(wrong)


def test_the_readme_layout_names_every_module():
    """The README's Layout section lists every module under its folder, with a line on what it owns."""
    section = (PACKAGE.parent / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    folder, listed = "", set()
    for line in section.splitlines():
        name = line.strip().split(" ", 1)[0]
        if name.endswith("/") and line.startswith("  ") and not line.startswith("    "):
            folder = name
        elif name.endswith(".py") and len(line.strip().split(None, 1)) == 2:
            listed.add((folder if line.startswith("    ") else "") + name)
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and p.parts[-2] != "examples" and "__pycache__" not in p.parts}
    assert sorted(modules - listed) == []
