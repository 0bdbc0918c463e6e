"""The docs match the tree: the README's source tree names every module, and the statements of
docs/architecture.md that name files hold."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import comp

PACKAGE = Path(comp.__file__).parent
ROOT = PACKAGE.parents[1]


def readme_tree() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```\nsrc/comp/\n(.*?)```", text, re.S).group(1)


def test_the_readme_tree_names_every_module():
    tree = readme_tree()
    words = set(re.findall(r"[A-Za-z_0-9]+", tree))
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and p.stem not in words]
    assert missing == [], f"README.md's source tree lacks {missing}"
    for folder in sorted({p.parent for p in PACKAGE.rglob("*.py")} - {PACKAGE}):
        assert f"  {folder.relative_to(PACKAGE).as_posix()}/ " in tree, folder


def _imports_comp(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n.split(".")[0] == "comp" for n in names):
            return True
    return False


def test_only_loading_and_standalone_of_the_encoder_import_comp():
    """docs/architecture.md, "The encoder is self-contained"."""
    vision = PACKAGE / "models" / "vision"
    assert sorted(p.name for p in vision.glob("*.py") if _imports_comp(p)) == ["loading.py", "standalone.py"]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert "`loading.py`" in doc and "`standalone.py`" in doc


def _functions(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_architecture_names_where_train_parses():
    doc = " ".join((ROOT / "docs" / "architecture.md").read_text().split())
    assert "`comp.train.args.build_parser`" in doc and "`comp.train.run.main`" in doc
    assert "build_parser" in _functions(PACKAGE / "train" / "args.py")
    assert "main" in _functions(PACKAGE / "train" / "run.py")
