"""The service's limits, declared as settings with their defaults, and the token buckets
that enforce rates.

The command line (``megex serve``) takes its flags from these declarations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

from ..oracle import DEFAULT_CHUNK_PASSES
from ..settings import COUNT, POSITIVE, OrNone, setting, validate
from ..stored_responses import (
    DEFAULT_IDEMPOTENCY_TTL_S,
    DEFAULT_STORED_RESPONSE_BYTES,
    DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_CHUNK_PASSES",
    "DEFAULT_FAILED_KEY_BURST",
    "DEFAULT_FAILED_KEY_RATE",
    "DEFAULT_IDEMPOTENCY_TTL_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_JSON_VALUES",
    "DEFAULT_MAX_PASSES_PER_REQUEST",
    "DEFAULT_STORED_RESPONSE_BYTES",
    "DEFAULT_STORED_RESPONSE_BYTES_PER_KEY",
    "PARSE_SLOTS",
    "Limits",
    "RateLimiter",
]

MiB = 1024 * 1024

# Request bodies: the size read (after decompression), the time to send it, and the values a
# JSON body may hold (a parsed JSON number costs about 50 bytes, so 2**20 values take about
# 60 MB as Python objects, and the whole request about 130 MB at its peak, as measured in
# docs/results/; binary tensor data has no such cost and no such limit).
DEFAULT_MAX_BODY_BYTES = 32 * MiB
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_JSON_VALUES = 2**20
# Bodies parsed at once: parsing holds Python's lock anyway, so more would add memory, not speed.
PARSE_SLOTS = 2
# Compute, in model passes (megex.compute): at most this many per request, computed in chunks
# of at most DEFAULT_CHUNK_PASSES (megex.oracle) with keys taking turns between chunks.
DEFAULT_MAX_PASSES_PER_REQUEST = 2**20
# Wrong or missing API keys per client address: bursts of 20, then one per second.
DEFAULT_FAILED_KEY_RATE = 1.0
DEFAULT_FAILED_KEY_BURST = 20.0
# Responses stored for idempotent retries (how long, how much): see megex.stored_responses.

# The group of the limits among the service's settings.
_G = "limits"


@dataclass(frozen=True)
class Limits:
    """What one request, one key and one client address may cost the service.

    Each limit is a declared setting (:mod:`megex.settings`: default, rule, help), checked
    when a Limits is made; sizes are in bytes, times in seconds, and a limit of None is no
    limit. The service's other settings extend it
    (:class:`megex.serving.settings.ServiceSettings`).
    """

    max_body_bytes: int = setting(
        DEFAULT_MAX_BODY_BYTES, "largest request body, after decompression", COUNT, _G
    )
    body_timeout_s: float = setting(
        DEFAULT_BODY_TIMEOUT_S, "seconds to receive a request body", POSITIVE, _G
    )
    max_json_values: int = setting(
        DEFAULT_MAX_JSON_VALUES,
        "values in a JSON body; binary tensor data has no such limit",
        COUNT,
        _G,
    )
    max_passes_per_request: int | None = setting(
        DEFAULT_MAX_PASSES_PER_REQUEST,
        "model passes one request may cost",
        OrNone(COUNT),
        _G,
    )
    compute_rate: float | None = setting(
        None, "model passes per second per key (default: no limit)", OrNone(POSITIVE), _G
    )
    compute_burst: float | None = setting(
        None,
        "model passes a key may spend at once (default: the larger of compute_rate and "
        "max_passes_per_request, so that every request allowed alone can run)",
        OrNone(POSITIVE),
        _G,
    )
    rate_limit: float | None = setting(
        None, "requests per second per key (default: no limit)", OrNone(POSITIVE), _G
    )
    rate_burst: float | None = setting(
        None, "requests a key may send at once (default: max(1, rate_limit))", OrNone(POSITIVE), _G
    )
    failed_key_rate: float = setting(
        DEFAULT_FAILED_KEY_RATE,
        "wrong or missing API keys per second per client address",
        POSITIVE,
        _G,
    )
    failed_key_burst: float = setting(
        DEFAULT_FAILED_KEY_BURST,
        "wrong or missing API keys per client address before throttling",
        POSITIVE,
        _G,
    )

    def __post_init__(self) -> None:
        validate(self)

    def compute_limiter(self) -> RateLimiter | None:
        if self.compute_rate is None:
            return None
        burst = self.compute_burst
        if burst is None:
            burst = max(self.compute_rate, self.max_passes_per_request or 0)
        return RateLimiter(self.compute_rate, burst, what="compute rate (model passes/s)")

    def request_limiter(self) -> RateLimiter | None:
        if self.rate_limit is None:
            return None
        return RateLimiter(self.rate_limit, self.rate_burst)

    def failed_key_limiter(self) -> RateLimiter:
        return RateLimiter(
            self.failed_key_rate, self.failed_key_burst, what="failed keys per second"
        )


class RateLimiter:
    """A token bucket per party: `rate` tokens per second, holding up to `burst`
    (default max(1, rate)). Buckets that have filled up again are forgotten, so that many
    parties (client addresses) seen once do not accumulate."""

    _PRUNE_AT = 10_000

    def __init__(self, rate: float, burst: float | None = None, what: str = "rate limit"):
        if not rate > 0:
            raise ValueError(f"{what}: expected > 0 per second, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if not self.burst > 0:
            raise ValueError(f"{what} burst: expected > 0, got {burst}")
        self._buckets: dict[Hashable, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _tokens(self, party: Hashable, now: float) -> float:
        tokens, last = self._buckets.get(party, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def wait(self, party: Hashable, cost: float = 1.0) -> float:
        """Seconds until `party` has `cost` tokens (0: now); takes none."""
        with self._lock:
            tokens = self._tokens(party, time.monotonic())
        return max(0.0, (min(cost, self.burst) - tokens) / self.rate)

    def acquire(self, party: Hashable, cost: float = 1.0) -> float:
        """Take `cost` tokens; returns 0 if granted, else the seconds to wait for them (a
        cost above the burst waits for a full bucket and then takes it all)."""
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(party, now)
            need = min(cost, self.burst)
            if tokens >= need:
                self._buckets[party] = (tokens - need, now)
                return 0.0
            self._buckets[party] = (tokens, now)
            if len(self._buckets) > self._PRUNE_AT:
                self._prune(now)
            return (need - tokens) / self.rate

    def take(self, party: Hashable, cost: float = 1.0) -> None:
        """Take `cost` tokens even if that leaves the bucket below zero (a debt that later
        requests wait for)."""
        now = time.monotonic()
        with self._lock:
            self._buckets[party] = (self._tokens(party, now) - cost, now)
            if len(self._buckets) > self._PRUNE_AT:
                self._prune(now)

    def _prune(self, now: float) -> None:
        full = [
            party
            for party, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for party in full:
            del self._buckets[party]
