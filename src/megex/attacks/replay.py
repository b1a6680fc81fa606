"""Experience replay: past (image, victim answer) pairs the attacker already paid for.

MAZE and CaBaGE keep the queries they sent and take extra clone steps on them; reusing an
answer costs no query. Images are held in float16 (half the memory; the clone does not
notice the rounding) and probabilities in float32, in a ring that overwrites the oldest.
The buffer's contents are part of a run's checkpoint, so a resumed run samples exactly the
same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """A ring of at most `capacity` (image, probabilities) pairs, sampled uniformly."""

    def __init__(self, capacity: int, image_shape: tuple[int, ...], num_classes: int):
        if int(capacity) < 1:
            raise ValueError(f"replay capacity: expected >= 1, got {capacity}")
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

    def add(self, images: torch.Tensor, probs: torch.Tensor) -> None:
        """Store a batch of images in [0, 1] with the victim's probabilities for them."""
        images = images.detach().to("cpu", torch.float16)
        probs = probs.detach().to("cpu", torch.float32)
        if images.shape[0] != probs.shape[0]:
            raise ValueError(f"replay: {images.shape[0]} images but {probs.shape[0]} answers")
        self.added += images.shape[0]
        images, probs = images[-self.capacity :], probs[-self.capacity :]
        while images.shape[0] > 0:
            take = min(images.shape[0], self.capacity - self.position)
            self.images[self.position : self.position + take] = images[:take]
            self.probs[self.position : self.position + take] = probs[:take]
            self.position = (self.position + take) % self.capacity
            self.size = min(self.capacity, self.size + take)
            images, probs = images[take:], probs[take:]

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
