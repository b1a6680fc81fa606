"""What an answer costs to compute, and turns on the compute.

The query ledger counts images: one image is one query whatever is asked of it, as the threat
model counts. Compute is counted apart, in *model passes*: one forward or one backward pass
of one image through the model. A prediction costs 1; an explanation adds, per SmoothGrad
sample or integrated-gradients step, one forward pass and one backward pass per class
explained (every class for target "all"). Integrated gradients with 256 steps over 10 classes
thus costs 2,817 passes per image against 1 for a prediction.

A service computes one chunk at a time; :class:`TurnLock` hands the compute to waiting
parties (API keys) in rotation, so a long request waits behind other keys' chunks between
its own instead of holding the compute until it is done.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from .explain import Explanation

__all__ = ["TurnLock", "passes_per_image"]


def passes_per_image(spec: Explanation | None, num_classes: int) -> int:
    """Model passes that answering one image costs, with explanation `spec` (None: a
    prediction only)."""
    if spec is None:
        return 1
    backward = num_classes if spec.target == "all" else 1
    repeats = {"smoothgrad": "samples", "integrated_gradients": "steps"}.get(spec.method)
    evaluations = int(spec.params[repeats]) if repeats else 1
    return 1 + evaluations * (1 + backward)


class TurnLock:
    """A lock that parties hold in turns.

    When it is released, the next holder is the longest-waiting request of the party that
    comes next in rotation; a party that asks again at once (the next chunk of a long
    request) joins the end of the rotation, behind the parties already waiting. Requests of
    one party are served in the order they asked.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        # party -> its waiting tickets; the dict's order is the rotation.
        self._waiting: dict[Hashable, deque[object]] = {}

    @contextmanager
    def turn(self, party: Hashable) -> Iterator[None]:
        """Hold the lock for one turn of `party`."""
        self.acquire(party)
        try:
            yield
        finally:
            self.release()

    def acquire(self, party: Hashable) -> None:
        ticket = object()
        with self._cond:
            self._waiting.setdefault(party, deque()).append(ticket)
            try:
                while self._held or self._next_ticket() is not ticket:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: leave the queue
                self._remove(party, ticket)
                self._cond.notify_all()
                raise
            self._held = True
            queue = self._waiting.pop(party)
            queue.popleft()
            if queue:  # the party's other requests wait for everyone else's turn
                self._waiting[party] = queue

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def _next_ticket(self) -> object | None:
        for queue in self._waiting.values():
            return queue[0]
        return None

    def _remove(self, party: Hashable, ticket: object) -> None:
        queue = self._waiting.get(party)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._waiting[party]
