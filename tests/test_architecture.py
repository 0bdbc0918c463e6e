"""The one-way import rule of docs/architecture.md, checked on every import statement of the
package (module level and inside functions): a module imports only its own layer or lower
ones, the layers beside each other (train, eval) do not import each other, and no modules of
a layer import each other in a circle."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import comp

PACKAGE = Path(comp.__file__).parent
# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS = {
    "comp.tokens": 0, "comp.errors": 0, "comp.files": 0, "comp.hub": 0, "comp.cliargs": 0, "comp.recipes": 0,
    "comp.models": 1,
    "comp.data": 2,
    "comp.train": 3, "comp.eval": 3,
    "comp.demo": 4,
    "comp.cli": 5, "comp.auto": 5, "comp": 5, "comp.__main__": 5, "comp.train.__main__": 5,
}
SIBLINGS = {"comp.train", "comp.eval"}  # same layer, but independent of each other
# Circles kept on purpose, each with its reason; the test fails on any other circle, and on an
# entry here that is no circle any more.


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_key(name: str) -> str:
    return max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)


def imports(path: Path, name: str):
    """(module, names) of every ``comp`` import in ``path``, module level and in functions;
    relative imports resolved against the module's package. ``names`` is empty for ``import m``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    annotations_only = {id(n) for block in ast.walk(tree) if is_type_checking_block(block)
                        for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in annotations_only:  # never executed: not an import
            continue
        if isinstance(node, ast.Import):
            yield from ((a.name, ()) for a in node.names if a.name.split(".")[0] == "comp")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "comp":
                yield target, tuple(a.name for a in node.names)


def is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, name: str, known: set[str] | None = None):
    """The modules ``path`` imports, each taken to the deepest module it names: ``from comp
    import recipes`` is comp.recipes, ``from comp.errors import UserError`` comp.errors
    (``known``: the module names; default the package's)."""
    known = known if known is not None else {n for _, n in package_files()}
    for target, names in imports(path, name):
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
        yield from subs
        if len(subs) < len(names) or not names:
            yield target


def package_files() -> list[tuple[Path, str]]:
    return [(path, module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def violations(files: list[tuple[Path, str]]) -> list[str]:
    found = []
    known = {name for _, name in files} | {name for _, name in package_files()}
    for path, name in files:
        mine = layer_key(name)
        for target in imported_modules(path, name, known):
            theirs = layer_key(target)
            if LAYERS[theirs] > LAYERS[mine] or (mine in SIBLINGS and theirs in SIBLINGS and mine != theirs):
                found.append(f"{name} ({mine}, layer {LAYERS[mine]}) imports {target} "
                             f"({theirs}, layer {LAYERS[theirs]})")
    return found


def import_graph(files: list[tuple[Path, str]]) -> dict[str, set[str]]:
    """Module -> the modules among ``files`` it imports (module level and in functions); a
    package's own ``__init__`` running before its module is not counted as an import."""
    known = {name for _, name in files} | {name for _, name in package_files()}
    graph: dict[str, set[str]] = {name: set() for _, name in files}
    for path, name in files:
        graph[name] = set(imported_modules(path, name, known)) & set(graph) - {name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[str]:
    """One line per group of modules that import each other (strongly connected): the
    shortest circle through the group's first module, then the group's other members."""
    found, seen = [], set()
    for start in sorted(graph):
        circle = None if start in seen else shortest_path_back(graph, start)
        if circle:
            group = {m for m in reaches(graph, start) if start in reaches(graph, m)}
            seen |= group
            others = sorted(group - set(circle))
            found.append(f"{layer_key(start)}: " + " -> ".join(circle)
                         + (f" (with {', '.join(others)})" if others else ""))
    return found


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    out, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()] - out:
            out.add(nxt)
            todo.append(nxt)
    return out


def shortest_path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import path from ``start`` back to itself (breadth first), or None."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for nxt in sorted(graph[module]):
                if nxt == start:
                    path = [module]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = module
                    following.append(nxt)
        frontier = following
    return None


def test_imports_go_one_way():
    assert violations(package_files()) == []


def test_the_rule_catches_upward_and_sideways_imports(tmp_path):
    upward = tmp_path / "upward.py"
    upward.write_text("def f():\n    from ..train.run import train\n")
    sideways = tmp_path / "sideways.py"
    sideways.write_text("import comp.eval.probe\n")
    assert violations([(upward, "comp.models.upward"), (sideways, "comp.train.sideways")]) == [
        "comp.models.upward (comp.models, layer 1) imports comp.train.run (comp.train, layer 3)",
        "comp.train.sideways (comp.train, layer 3) imports comp.eval.probe (comp.eval, layer 3)"]


def imported_by(*args: str) -> set[str]:
    """Modules a clean interpreter imports running ``python -X importtime <args>`` (its
    stderr lists every module it imports, at the end of each import)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "comp" in lines, proc.stderr[-2000:]
    return set(lines)


def test_import_comp_imports_no_modeling_code():
    """comp.auto registers CoMP with transformers' Auto classes only when those are imported."""
    modules = imported_by("-c", "import comp")
    assert {"torch", "transformers.modeling_utils"} & modules == set()


def test_comp_help_imports_neither_torch_nor_transformers():
    modules = imported_by("-m", "comp", "--help")
    assert "comp.cli" in modules
    assert {"torch", "transformers"} & modules == set()


def test_no_import_circles():
    assert import_circles(import_graph(package_files())) == []


def test_the_circle_check_counts_function_level_imports(tmp_path):
    """The demo's old circle in miniature: pipeline imports run inside a function, run imports
    pipeline at module level and report in a function, report pipeline in a function; once
    pipeline imports only the leaf they all use, the imports go one way."""
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "__init__.py").write_text("")
    (demo / "common.py").write_text("import math\n")
    (demo / "pipeline.py").write_text("from comp.demo.common import x\n\ndef f():\n    from comp.demo.run import y\n")
    (demo / "run.py").write_text("from comp.demo import pipeline, common\n\ndef g():\n    from .report import z\n")
    (demo / "report.py").write_text("from .common import x\n\ndef g():\n    import comp.demo.pipeline\n")
    files = [(demo / f"{m}.py", f"comp.demo.{m}") for m in ("common", "pipeline", "run", "report")]
    files.append((demo / "__init__.py", "comp.demo"))
    assert import_circles(import_graph(files)) == [
        "comp.demo: comp.demo.pipeline -> comp.demo.run -> comp.demo.pipeline (with comp.demo.report)"]
    (demo / "pipeline.py").write_text("from comp.demo.common import x\n")
    assert import_circles(import_graph(files)) == []


def test_an_annotation_only_import_is_not_a_circle(tmp_path):
    """``if TYPE_CHECKING:`` imports never run; any other import in either direction does."""
    pkg = tmp_path / "vision"
    pkg.mkdir()
    (pkg / "model.py").write_text("def load():\n    from . import loading\n")
    (pkg / "loading.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .model import M\n")
    files = [(pkg / "model.py", "comp.models.vision.model"), (pkg / "loading.py", "comp.models.vision.loading")]
    assert import_circles(import_graph(files)) == []
    (pkg / "loading.py").write_text("from .model import M\n")
    assert len(import_circles(import_graph(files))) == 1


def test_private_trainer_and_generation_overrides_are_in_their_contract_tables():
    """The contract rule (its self-tests and the tables' upstream checks are in
    tests/test_trainer_contract.py): no private Trainer or GenerationMixin method is
    overridden without its entry and reason."""
    from transformers import GenerationMixin, Trainer

    from comp.models.mllm import GENERATION_HOOKS, CompForConditionalGeneration
    from comp.train.trainer import TRAINER_HOOKS, CompTrainer
    from test_trainer_contract import unlisted_private

    assert unlisted_private(CompTrainer, Trainer, TRAINER_HOOKS) == set()
    assert unlisted_private(CompForConditionalGeneration, GenerationMixin, GENERATION_HOOKS) == set()
