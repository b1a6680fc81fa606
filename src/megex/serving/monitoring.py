"""The service's query monitors (:mod:`megex.detection`), fed after each answer.

Every answered request's images and the victim's honest probabilities are queued, once the
response is computed and stored, to one worker thread that shows them to every monitor, in
the order the requests were answered, and records the flags in the ledger's ``flags`` table.
Clients do not wait for the monitors; a monitor that fails is logged and never fails a
request. The images waiting for the monitors take at most `max_pending_bytes` (a larger
request waits until none are): past that, answering waits, so that the monitors are never
skipped (flooding the service does not hide a key's queries) and the queue cannot fill the
memory.

The monitors' state per key lives in memory: a restarted server starts every key's history
over (flags already recorded stay in the ledger).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..detection import Flag, Monitor
from ..sqlite_ledger import SQLiteLedger

__all__ = ["DEFAULT_MAX_PENDING_BYTES", "MonitorHub", "check_monitors"]

log = logging.getLogger("megex.server")

# Bytes of images waiting for the monitors before answering waits for them.
DEFAULT_MAX_PENDING_BYTES = 256 * 1024 * 1024


def check_monitors(monitors: Sequence[Monitor]) -> None:
    """Refuse monitors a service cannot use: two of a kind (flags name their kind), or one
    without a threshold (it would never flag)."""
    names = [m.name for m in monitors]
    if len(set(names)) != len(names):
        raise ValueError(f"monitors: each kind at most once (flags name it), got {names}")
    unset = [m.name for m in monitors if m.threshold is None]
    if unset:
        raise ValueError(
            f"monitors: {', '.join(unset)} has no threshold and would never flag; give one, "
            "or a calibration"
        )


class MonitorHub:
    """Monitors behind a service: observe each answered request, record the flags."""

    def __init__(
        self,
        monitors: Sequence[Monitor],
        ledger: SQLiteLedger,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ):
        check_monitors(monitors)
        self.monitors = list(monitors)
        self.ledger = ledger
        self.max_pending_bytes = int(max_pending_bytes)
        self._pending_bytes = 0
        self._room = threading.Condition()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megex-monitors")

    def submit(self, account_id: int, images: torch.Tensor, probabilities: torch.Tensor) -> None:
        """Queue one answered request for the monitors (waits while the queue is full)."""
        size = images.numel() * images.element_size()
        with self._room:
            self._room.wait_for(
                lambda: (
                    self._pending_bytes == 0 or self._pending_bytes + size <= self.max_pending_bytes
                )
            )
            self._pending_bytes += size
        try:
            self._worker.submit(self._observe, account_id, images, probabilities, size)
        except BaseException:
            self._release(size)
            raise

    def _release(self, size: int) -> None:
        with self._room:
            self._pending_bytes -= size
            self._room.notify_all()

    def _observe(
        self, account_id: int, images: torch.Tensor, probabilities: torch.Tensor, size: int
    ) -> None:
        try:
            flags: list[Flag] = []
            for monitor in self.monitors:
                try:
                    flags += monitor.observe(account_id, images, probabilities)
                except Exception:
                    log.exception(
                        "monitor %s failed on a request of account %s; the request was answered",
                        monitor.name,
                        account_id,
                    )
            for flag in flags:
                log.warning(
                    "monitor %s flagged account %s after %d queries: statistic %.4g past "
                    "threshold %.4g",
                    flag.monitor,
                    account_id,
                    flag.queries_seen,
                    flag.statistic,
                    flag.threshold,
                )
            if flags:
                try:
                    self.ledger.record_flags(account_id, flags)
                except Exception:
                    log.exception(
                        "recording %d flag(s) of account %s failed", len(flags), account_id
                    )
        finally:
            self._release(size)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every request queued so far has been observed."""
        self._worker.submit(lambda: None).result(timeout)

    def close(self) -> None:
        """Observe what is queued, then stop the worker."""
        self._worker.shutdown(wait=True)
