"""The command's one user-error type and its one map from outcomes to exit statuses.

0  done.
1  refused or failed: the budget is spent, the service is unreachable or refuses, a file is
   missing or unreadable, an optional dependency is not installed, a cluster cannot run a
   sweep, runs of a sweep failed.
2  a mistake on the command line: a bad option value, an unknown name, a wrong file kind,
   runs of a sweep that all failed on their settings.
130  interrupted (Ctrl-C); the message goes to stderr.

Anything else is a bug: it is not caught, so Python prints its traceback and exits with 1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..experiments.sweep import SweepFailed
from ..oracle import BudgetExceeded, ExplanationNotOffered, InvalidQuery

__all__ = ["OK", "FAILURE", "USAGE", "INTERRUPTED", "UsageError", "exit_status", "user_input"]

OK, FAILURE, USAGE, INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A mistake on the command line: reported in one line on stderr, exit status 2."""


# Refusals of the oracle or the service, and failures of the environment (files, network).
_FAILURES: tuple[type[BaseException], ...] = (
    BudgetExceeded,
    ExplanationNotOffered,
    InvalidQuery,
    OSError,
)
# Failures defined in modules that need the 'server' extra, by (module, name): such an
# exception can only have been raised if its module was imported.
_OPTIONAL_FAILURES = (
    ("megex.client", "ServiceError"),
    ("megex.sqlite_ledger", "LedgerInUse"),
    ("megex.experiments.sweep.ray_tasks", "ClusterError"),
)


def _failures() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules.get(module), name, None) for module, name in _OPTIONAL_FAILURES]
    return _FAILURES + tuple(cls for cls in found if isinstance(cls, type))


def exit_status(exc: BaseException) -> int | None:
    """The exit status of an exception the user can act on; None for a bug (a traceback)."""
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, SweepFailed):
        # Runs of a sweep that failed: on their settings (the user's to fix), or otherwise.
        return USAGE if exc.settings_only else FAILURE
    if isinstance(exc, ModuleNotFoundError):
        # A missing optional dependency; a module of megex itself missing is a bug.
        return FAILURE if exc.name and exc.name.split(".")[0] != "megex" else None
    if isinstance(exc, _failures()):
        return FAILURE
    return None


@contextmanager
def user_input(flag: str | None = None) -> Iterator[None]:
    """Run a call that takes the user's input: its ValueError is a UsageError naming `flag`
    (an OSError stays a failure, with `flag` in its message).

    Wrap only the calls whose arguments come from the command line (building a setting,
    reading a file the user named, parsing a spec), so that a ValueError from anywhere else
    stays a bug with its traceback.
    """
    try:
        yield
    except (InvalidQuery, ExplanationNotOffered):
        raise  # refusals of the oracle, not mistakes in the input
    except ValueError as err:
        raise UsageError(f"{flag}: {err}" if flag else str(err)) from None
    except OSError as err:  # a missing or unreadable file stays a failure, named by its flag
        if flag is None:
            raise
        raise OSError(f"{flag}: {err}") from None
