"""The one-way import rule of docs/architecture.md, checked on every import statement of the
package (module level and inside functions): a module imports only its own layer or lower
ones, and the layers beside each other (train, eval) do not import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import comp

PACKAGE = Path(comp.__file__).parent
# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS = {
    "comp.tokens": 0, "comp.errors": 0, "comp.files": 0, "comp.hub": 0, "comp.cliargs": 0,
    "comp.models": 1,
    "comp.data": 2,
    "comp.train": 3, "comp.eval": 3,
    "comp.demo": 4,
    "comp.cli": 5, "comp.auto": 5, "comp": 5, "comp.__main__": 5, "comp.train.__main__": 5,
}
SIBLINGS = {"comp.train", "comp.eval"}  # same layer, but independent of each other


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_key(name: str) -> str:
    return max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)


def imported_modules(path: Path, name: str):
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "comp")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "comp":
                yield target


def package_files() -> list[tuple[Path, str]]:
    return [(path, module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def violations(files: list[tuple[Path, str]]) -> list[str]:
    found = []
    for path, name in files:
        mine = layer_key(name)
        for target in imported_modules(path, name):
            theirs = layer_key(target)
            if LAYERS[theirs] > LAYERS[mine] or (mine in SIBLINGS and theirs in SIBLINGS and mine != theirs):
                found.append(f"{name} ({mine}, layer {LAYERS[mine]}) imports {target} "
                             f"({theirs}, layer {LAYERS[theirs]})")
    return found


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
