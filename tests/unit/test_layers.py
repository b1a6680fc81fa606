"""The layers of DESIGN.md hold: the import contract covers every module, it is kept, and
a module imports the rest of megex at the top of the file (function-level imports only for
modules that need an optional extra)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "megex"
# Third-party packages that only the optional extras install.
EXTRAS = {
    "fastapi", "uvicorn", "httpx", "starlette", "matplotlib", "optuna", "ray", "quantus",
    "sklearn", "scipy", "tritonclient", "PIL", "captum", "kserve", "mlserver",
}  # fmt: skip


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [[name.strip() for name in layer.split(":")] for layer in contract["layers"]]


def test_the_contract_names_every_module_once():
    named = [name for layer in _layers() for name in layer]
    assert len(named) == len(set(named)), "a module is in two layers"
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == set(named), f"not in a layer: {sorted(modules - set(named))}"


def test_the_import_contract_is_kept():
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([linter], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if not node.level:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _source(name: str) -> Path | None:
    path = PACKAGE.parent / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _needs_an_extra(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        if any(name.split(".")[0] in EXTRAS for name in names):
            return True
    return False


def test_megex_is_imported_at_the_top_of_each_file():
    late = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, tree = _module_name(path), ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, ast.ImportFrom):
                continue
            targets = _resolve(node, module, path.name == "__init__.py")
            internal = [t for t in targets if t == "megex" or t.startswith("megex.")]
            sources = [s for s in (_source(t) for t in internal) if s is not None]
            if sources and not any(_needs_an_extra(s) for s in sources):
                late.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not late, "function-level imports of megex modules that need no extra: " + ", ".join(
        late
    )
