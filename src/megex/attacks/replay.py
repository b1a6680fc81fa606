"""Experience replay: past (image, victim answer) pairs the attacker already paid for.

MAZE and CaBaGE keep the queries they sent and take extra clone steps on them; reusing an
answer costs no query. Images are held in float16 (half the memory; the clone does not
notice the rounding) and probabilities in float32. Once full, a 'ring' overwrites the oldest
pairs; a 'reservoir' keeps a uniform sample of every pair ever added (Vitter's algorithm R),
so the queries of the run's early phases stay in it however long the run.
The buffer's contents are part of a run's checkpoint, so a resumed run samples exactly the
same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ReplayBuffer"]


POLICIES = ("ring", "reservoir")


class ReplayBuffer:
    """At most `capacity` (image, probabilities) pairs, sampled uniformly."""

    def __init__(
        self,
        capacity: int,
        image_shape: tuple[int, ...],
        num_classes: int,
        policy: str = "ring",
    ):
        if int(capacity) < 1:
            raise ValueError(f"replay capacity: expected >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(
                f"replay policy: expected one of {', '.join(POLICIES)}, got {policy!r}"
            )
        self.policy = policy
        self.capacity = int(capacity)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        # torch.empty does not touch the memory: a large capacity costs only what is used.
        self.images = torch.empty(self.capacity, *self.image_shape, dtype=torch.float16)
        self.probs = torch.empty(self.capacity, self.num_classes, dtype=torch.float32)
        self.size = 0
        self.position = 0  # where the next pair goes
        self.added = 0

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        images: torch.Tensor,
        probs: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        """Store a batch of images in [0, 1] with the victim's probabilities for them.

        `generator` draws the reservoir's replacements (so a resumed run repeats them).
        """
        images = images.detach().to("cpu", torch.float16)
        probs = probs.detach().to("cpu", torch.float32)
        if images.shape[0] != probs.shape[0]:
            raise ValueError(f"replay: {images.shape[0]} images but {probs.shape[0]} answers")
        if self.policy == "reservoir":
            self._add_reservoir(images, probs, generator)
            return
        self.added += images.shape[0]
        images, probs = images[-self.capacity :], probs[-self.capacity :]
        while images.shape[0] > 0:
            take = min(images.shape[0], self.capacity - self.position)
            self.images[self.position : self.position + take] = images[:take]
            self.probs[self.position : self.position + take] = probs[:take]
            self.position = (self.position + take) % self.capacity
            self.size = min(self.capacity, self.size + take)
            images, probs = images[take:], probs[take:]

    def _add_reservoir(
        self, images: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        free = min(images.shape[0], self.capacity - self.size)
        if free > 0:
            self.images[self.size : self.size + free] = images[:free]
            self.probs[self.size : self.size + free] = probs[:free]
            self.size += free
            self.added += free
            images, probs = images[free:], probs[free:]
        n = images.shape[0]
        if n == 0:
            return
        # The t-th pair ever added (t >= capacity) takes a random slot with chance capacity/t.
        seen = self.added + 1 + torch.arange(n, dtype=torch.float64)
        slot = (torch.rand(n, generator=generator, dtype=torch.float64) * seen).long()
        keep = slot < self.capacity
        self.images[slot[keep]] = images[keep]
        self.probs[slot[keep]] = probs[keep]
        self.added += n

    def sample(
        self, n: int, generator: torch.Generator, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n pairs drawn uniformly with replacement: (float32 images, probabilities)."""
        if len(self) == 0:
            raise RuntimeError("replay: the buffer is empty")
        idx = torch.randint(self.size, (int(n),), generator=generator)
        return self.images[idx].to(device, torch.float32), self.probs[idx].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "images": self.images[: self.size].clone(),
            "probs": self.probs[: self.size].clone(),
            "position": self.position,
            "added": self.added,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["images"].shape[0])
        self.images[: self.size] = state["images"].to(torch.float16)
        self.probs[: self.size] = state["probs"].to(torch.float32)
        self.position = int(state["position"])
        self.added = int(state["added"])
