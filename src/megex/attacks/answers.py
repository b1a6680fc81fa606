"""Every answer an attacker with images has paid for: the images it sent, the victim's
probabilities and, where the service explained, its maps read as d log p / dx.

Unlike the data-free attacks' replay buffer (a bounded sample of invented images), this
keeps every answer: the attacker's data set grows by one labelled image per query, and its
clone trains on all of it, as Knockoff Nets and JBDA train on their whole transfer set.
Images are kept in float32 (pool images are exact), maps in float16: a map of every class
costs K x C x H x W x 2 bytes per answer (15.7 KB at 28 x 28 with 10 classes, so 50,000
answers take 784 MB). The store is part of a run's checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AnswerStore"]


class AnswerStore:
    """Answered queries in arrays that grow by doubling; `sample` draws a uniform batch.

    `map_shape`: the shape of one answer's map as d log p / dx, (K, C, H, W) for maps of
    every class or (C, H, W) for one class's, or None when answers carry no maps (or until
    `keep_maps`). A map also keeps the class it explains (`classes`: the predicted class
    for maps of every class).
    """

    def __init__(
        self,
        image_shape: tuple[int, ...],
        num_classes: int,
        map_shape: tuple[int, ...] | None = None,
    ):
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.map_shape: tuple[int, ...] | None = None
        self.size = 0
        self.fields: dict[str, torch.Tensor] = {
            "images": torch.empty(0, *self.image_shape),
            "probs": torch.empty(0, self.num_classes),
            # How often each answer was drawn by 'balanced' sampling.
            "uses": torch.empty(0, dtype=torch.long),
        }
        if map_shape is not None:
            self.keep_maps(map_shape)

    def keep_maps(self, map_shape: tuple[int, ...]) -> None:
        """Keep maps of this shape from now on (before the first answer: the first answer
        says which maps the service returns)."""
        shape = tuple(int(s) for s in map_shape)
        if self.map_shape == shape:
            return
        if self.size or self.map_shape is not None:
            raise ValueError(
                f"answer store: keeps maps of shape {self.map_shape}, got {shape} after "
                f"{self.size} answers"
            )
        self.map_shape = shape
        self.fields["maps"] = torch.empty(self.fields["images"].shape[0], *shape).half()
        self.fields["classes"] = torch.empty(self.fields["images"].shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return self.size

    @property
    def stores_maps(self) -> bool:
        return self.map_shape is not None

    def add(
        self,
        images: torch.Tensor,
        probs: torch.Tensor,
        maps: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> None:
        """Keep a batch of answers (maps and the classes they explain where stored)."""
        batch = {"images": images, "probs": probs}
        if self.stores_maps:
            if maps is None or classes is None:
                raise ValueError("answer store: this store keeps maps; pass maps and classes")
            batch.update(maps=maps.to(torch.float16), classes=classes)
        n = int(images.shape[0])
        # A new answer starts level with the least used: it joins them in the next draws,
        # and is then drawn as often as the others (not as often as all the updates it
        # missed).
        start = int(self.fields["uses"][: self.size].min()) if self.size else 0
        batch["uses"] = torch.full((n,), start, dtype=torch.long)
        self._reserve(self.size + n)
        for name, values in batch.items():
            self.fields[name][self.size : self.size + n] = values.detach().cpu()
        self.size += n

    def _reserve(self, rows: int) -> None:
        have = self.fields["images"].shape[0]
        if rows <= have:
            return
        grown = max(rows, 2 * have, 256)
        for name, values in self.fields.items():
            bigger = torch.empty(grown, *values.shape[1:], dtype=values.dtype)
            bigger[: self.size] = values[: self.size]
            self.fields[name] = bigger

    def get(self, name: str) -> torch.Tensor:
        """All stored values of one field (a view)."""
        return self.fields[name][: self.size]

    def sample(
        self, n: int, rng: torch.Generator, policy: str = "uniform"
    ) -> dict[str, torch.Tensor]:
        """`n` answers, maps back in float32: drawn uniformly with replacement ('uniform'),
        or the `n` used least so far, ties broken at random ('balanced': every answer is
        used about equally often, as in epochs over a fixed set, however late it came)."""
        if policy == "balanced":
            uses = self.fields["uses"][: self.size]
            jitter = torch.rand(self.size, generator=rng, device=rng.device).cpu()
            index = torch.topk(uses.double() + jitter.double(), min(n, self.size), largest=False)
            index = index.indices
            if n > self.size:  # fewer answers than a batch: each of them, then at random
                extra = torch.randint(0, self.size, (n - self.size,), generator=rng).cpu()
                index = torch.cat([index, extra])
            self.fields["uses"].index_add_(0, index, torch.ones(len(index), dtype=torch.long))
        elif policy == "uniform":
            index = torch.randint(0, self.size, (n,), generator=rng, device=rng.device).cpu()
        else:
            raise ValueError(f"sampling: expected 'uniform' or 'balanced', got {policy!r}")
        out = {name: values[index] for name, values in self.fields.items() if name != "uses"}
        if "maps" in out:
            out["maps"] = out["maps"].float()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, **{k: v[: self.size].clone() for k, v in self.fields.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "uses" not in state:
            state = {**state, "uses": torch.zeros(int(state["size"]), dtype=torch.long)}
        if "maps" in state and self.map_shape is None:
            self.keep_maps(tuple(state["maps"].shape[1:]))
        self.size = 0
        size = int(state["size"])
        self._reserve(size)
        for name in self.fields:
            self.fields[name][:size] = state[name]
        self.size = size
