"""The signals that ask a long job to stop (SIGTERM: `kill`, a batch scheduler; SIGHUP: a
closed terminal), handled for the length of a block."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["handled_stop_signals"]


@contextlib.contextmanager
def handled_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[bool]:
    """Within the block, SIGTERM and SIGHUP call `handler(signum, frame)`; the previous
    handlers come back after it. Yields whether the handler is set: only the main thread
    can set one, so elsewhere the signals keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), handler) for name in names}
    try:
        yield True
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)
