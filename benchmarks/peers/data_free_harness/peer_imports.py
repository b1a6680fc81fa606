"""Importing a peer's code from the folder given on the command line, never copied.

Packages the called functions never use but the peers' modules import at the top
(torchvision, torchmetrics, tensorboard, ipdb; for the dual students authors' code also
scipy and matplotlib) stand in as empty modules when they are not installed; a call into one
is an error naming the package. Once a run is over, the peer's modules and the stand-ins are
forgotten, so that the next run imports them afresh.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import PeerUnavailable, UserError

# Imported at the top of the peers' modules, used by none of the functions called here.
UNUSED_PACKAGES = ("torchvision", "torchmetrics", "tensorboard", "ipdb")


class _Absent:
    """Whatever a peer's module takes from a package that is not installed."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> _Absent:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        package = self._name.split(".")[0]
        raise RuntimeError(
            f"the peer's code called {self._name}, but {package} is not installed; this "
            f"harness calls only functions that do not need it"
        )


class _AbsentPackage(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__path__: list[str] = []  # a package, so that its submodules import too

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}")


class _BarePackage(types.ModuleType):
    """A peer's package whose __init__ is not run (its submodules import from __path__)."""

    def __init__(self, name: str, folder: Path):
        super().__init__(name)
        self.__path__ = [str(folder)]


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an empty stand-in for the packages (and their submodules) named, and nothing
    else."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return _AbsentPackage(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def absent_packages(names: Sequence[str] = UNUSED_PACKAGES) -> list[str]:
    """Which of `names` are not installed (and torch's tensorboard module, which needs the
    tensorboard package)."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if "tensorboard" in missing:
        missing.append("torch.utils.tensorboard")
    return missing


@contextlib.contextmanager
def peer_imports(folder: Path, unused: Sequence[str] = UNUSED_PACKAGES) -> Iterator[list[str]]:
    """Import from `folder` for the length of the block, with stand-ins for the packages of
    `unused` that :func:`absent_packages` finds missing; afterwards the peer's modules and
    the stand-ins are forgotten, so that the next run imports them afresh. Yields the
    stand-ins' names."""
    folder = folder.resolve()
    missing = absent_packages(unused)
    finder = _AbsentFinder(missing)
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    sys.meta_path.insert(0, finder)
    try:
        yield missing
    finally:
        sys.meta_path.remove(finder)
        sys.path.remove(str(folder))
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            origin = getattr(module, "__file__", None)
            inside = origin is not None and Path(origin).resolve().is_relative_to(folder)
            if inside or isinstance(module, _AbsentPackage | _BarePackage):
                del sys.modules[name]
                # The import system also set it on its parent (torch.utils.tensorboard).
                parent, _, child = name.rpartition(".")
                if getattr(sys.modules.get(parent), child, None) is module:
                    delattr(sys.modules[parent], child)


def import_from(folder: Path, name: str) -> types.ModuleType:
    """Module `name`, which must come from `folder` (not from elsewhere on the path)."""
    module = importlib.import_module(name)
    origin = getattr(module, "__file__", None)
    if origin is None or not Path(origin).resolve().is_relative_to(folder.resolve()):
        raise UserError(
            f"{name}: imported from {origin}, not from {folder}; another module of that name "
            "comes first on the path"
        )
    return module


def import_attack_module(folder: Path, name: str) -> tuple[types.ModuleType, str | None]:
    """mebench's attack module `name` (mebench.attackers.X), and how it was imported: None
    normally; a sentence when the package's __init__, which imports every attacker, fails on
    another attacker and the module is imported without it."""

    def unavailable() -> PeerUnavailable:
        return PeerUnavailable(
            f"{folder} has no {name.replace('.', '/')}.py (commit "
            f"{git_commit(folder) or 'unknown'})"
        )

    try:
        return import_from(folder, name), None
    except ModuleNotFoundError as err:
        if err.name == name:
            raise unavailable() from None
        failure: ImportError = err
    except ImportError as err:
        failure = err
    package = name.rsplit(".", 1)[0]
    for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[loaded]
    sys.modules[package] = _BarePackage(package, folder.joinpath(*package.split(".")))
    try:
        module = import_from(folder, name)
    except ModuleNotFoundError as err:
        if err.name == name:
            raise unavailable() from None
        raise
    return module, f"{package}/__init__.py not run: it fails at this commit ({failure})"


def git_commit(folder: Path) -> str | None:
    """The commit of the checkout at `folder` (or at its parent: the authors' code lives in
    the checkout's disguide/ or dual_students/), or None where it is not the top of a git
    checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2 or len(lines[1]) != 40:
        return None
    top = Path(lines[0]).resolve()
    return lines[1] if top in (folder.resolve(), folder.resolve().parent) else None


def mebench_root(path: Path) -> Path:
    """The folder holding the mebench package, checked."""
    if not (path / "mebench" / "__init__.py").is_file():
        raise UserError(
            f"--mebench: {path} has no mebench/__init__.py; expected a checkout of "
            "caumin/model-extraction-benchmark"
        )
    return path


def authors_root(path: Path) -> Path:
    """The folder holding the authors' train.py (the checkout's disguide/ or that folder)."""
    for candidate in (path / "disguide", path):
        if (candidate / "train.py").is_file() and (candidate / "cli_parser.py").is_file():
            return candidate
    raise UserError(
        f"--disguide: no disguide/train.py and cli_parser.py under {path}; expected a checkout "
        "of lin-tan/disguide"
    )


def dual_students_root(path: Path) -> Path:
    """The folder holding the dual students authors' train.py (the checkout's
    dual_students/ or that folder)."""
    for candidate in (path / "dual_students", path):
        code = (candidate / "train.py", candidate / "network" / "multi_student.py")
        if all(p.is_file() for p in code):
            return candidate
    raise UserError(
        f"--dual-students: no dual_students/train.py and network/multi_student.py under "
        f"{path}; expected a checkout of James-Beetham/dual_students"
    )
