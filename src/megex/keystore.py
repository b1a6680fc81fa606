"""API keys for the server: the keys file and the per-key rate limiter."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["RateLimiter", "read_keys_file"]


def read_keys_file(path: str | os.PathLike) -> dict[str, int | None]:
    """Read API keys, one per line: ``KEY`` or ``KEY,BUDGET``; '#' starts a comment."""
    keys: dict[str, int | None] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, budget = (part.strip() for part in line.partition(","))
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"keys file {path}, line {number}: not a key: {raw.strip()!r}")
        if budget:
            try:
                value = int(budget)
            except ValueError:
                raise ValueError(
                    f"keys file {path}, line {number}: budget {budget!r} is not an integer"
                ) from None
            if value < 0:
                raise ValueError(f"keys file {path}, line {number}: budget must be >= 0")
            keys[key] = value
        else:
            keys[key] = None
    return keys


class RateLimiter:
    """A token bucket per key: `rate` requests per second, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None):
        if not rate > 0:
            raise ValueError(f"rate limit: expected > 0 requests/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, account_id: int) -> float:
        """Take one token; returns 0 if granted, else the seconds to wait for one."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(account_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[account_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[account_id] = (tokens, now)
            return (1.0 - tokens) / self.rate
