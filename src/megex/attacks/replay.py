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
    """At most `capacity` answered queries, sampled uniformly.

    Each holds the image and the victim's probabilities; with `maps=True` also one map per
    image: a combination sum_k v_k d log p_k / dx of the returned explanation (float16, the
    image's size) and its weights v (K floats; all zero where the answer carried no map).
    That is C x H x W x 2 + 4 K bytes more per stored query (1,608 bytes at 28 x 28 with
    10 classes, beside the image's 1,568). `device`: where the buffer is held (an
    accelerator's memory keeps replay off the host: ``on_device``); its random draws then
    come from a generator on that device.
    """

    def __init__(
        self,
        capacity: int,
        image_shape: tuple[int, ...],
        num_classes: int,
        policy: str = "ring",
        maps: bool = False,
        device: str | torch.device = "cpu",
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
        self.device = torch.device(device)
        d = self.device
        # Off the CPU a spare row takes the reservoir's rejected pairs, so that a batch is
        # placed by one indexed copy instead of a boolean mask (which waits for the device).
        self.mask_free = d.type != "cpu"
        rows = self.capacity + 1
        # torch.empty does not touch the memory: a large capacity costs only what is used.
        self._storage = {
            "images": torch.empty(rows, *self.image_shape, dtype=torch.float16, device=d),
            "probs": torch.empty(rows, self.num_classes, dtype=torch.float32, device=d),
        }
        if maps:
            self._storage["maps"] = torch.empty(
                rows, *self.image_shape, dtype=torch.float16, device=d
            )
            self._storage["projections"] = torch.empty(
                rows, self.num_classes, dtype=torch.float32, device=d
            )
        self.fields = {k: v[: self.capacity] for k, v in self._storage.items()}
        self.size = 0
        self.position = 0  # where the next pair goes
        self.added = 0

    @property
    def images(self) -> torch.Tensor:
        return self.fields["images"]

    @property
    def probs(self) -> torch.Tensor:
        return self.fields["probs"]

    @property
    def stores_maps(self) -> bool:
        return "maps" in self.fields

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        images: torch.Tensor,
        probs: torch.Tensor,
        generator: torch.Generator | None = None,
        maps: torch.Tensor | None = None,
        projections: torch.Tensor | None = None,
    ) -> None:
        """Store a batch of images in [0, 1] with the victim's probabilities for them (and,
        in a buffer of maps, their projected maps and weights; None: no map for these).

        `generator` draws the reservoir's replacements (so a resumed run repeats them).
        """
        d = self.device
        batch = {
            "images": images.detach().to(d, torch.float16),
            "probs": probs.detach().to(d, torch.float32),
        }
        n = batch["images"].shape[0]
        if batch["probs"].shape[0] != n:
            raise ValueError(f"replay: {n} images but {batch['probs'].shape[0]} answers")
        if self.stores_maps:
            if maps is None:
                batch["maps"] = torch.zeros(n, *self.image_shape, dtype=torch.float16, device=d)
                batch["projections"] = torch.zeros(n, self.num_classes, device=d)
            else:
                batch["maps"] = maps.detach().to(d, torch.float16)
                batch["projections"] = projections.detach().to(d, torch.float32)
        if self.policy == "reservoir":
            self._add_reservoir(batch, generator)
            return
        self.added += n
        batch = {k: v[-self.capacity :] for k, v in batch.items()}
        while batch["images"].shape[0] > 0:
            take = min(batch["images"].shape[0], self.capacity - self.position)
            for name, values in batch.items():
                self.fields[name][self.position : self.position + take] = values[:take]
            self.position = (self.position + take) % self.capacity
            self.size = min(self.capacity, self.size + take)
            batch = {k: v[take:] for k, v in batch.items()}

    def _add_reservoir(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> None:
        free = min(batch["images"].shape[0], self.capacity - self.size)
        if free > 0:
            for name, values in batch.items():
                self.fields[name][self.size : self.size + free] = values[:free]
            self.size += free
            self.added += free
            batch = {k: v[free:] for k, v in batch.items()}
        n = batch["images"].shape[0]
        if n == 0:
            return
        # The t-th pair ever added (t >= capacity) takes a random slot with chance capacity/t.
        d = generator.device if generator is not None else self.device
        seen = self.added + 1 + torch.arange(n, dtype=torch.float64, device=d)
        slot = (torch.rand(n, generator=generator, dtype=torch.float64, device=d) * seen).long()
        slot = slot.to(self.device)
        keep = slot < self.capacity
        if not self.mask_free:
            for name, values in batch.items():
                self.fields[name][slot[keep]] = values[keep]
        else:
            # Two pairs of a batch may draw one slot: the later one wins, as in the loop above
            # (an indexed copy with repeated indices leaves the winner undefined on a GPU,
            # even per element). Losers and rejected pairs go to the spare row.
            slot = torch.where(keep, slot, self.capacity)
            arrival = torch.arange(n, device=slot.device)
            last = torch.full((self.capacity + 1,), -1, dtype=torch.long, device=slot.device)
            last.scatter_reduce_(0, slot, arrival, reduce="amax")
            slot = torch.where(last[slot] == arrival, slot, self.capacity)
            for name, values in batch.items():
                self._storage[name][slot] = values
        self.added += n

    def sample_batch(
        self, n: int, generator: torch.Generator, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """n stored queries drawn uniformly with replacement, every field (float32)."""
        if len(self) == 0:
            raise RuntimeError("replay: the buffer is empty")
        idx = torch.randint(self.size, (int(n),), generator=generator, device=generator.device)
        idx = idx.to(self.device)
        return {k: v[idx].to(device, torch.float32) for k, v in self.fields.items()}

    def sample(
        self, n: int, generator: torch.Generator, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n pairs drawn uniformly with replacement: (float32 images, probabilities)."""
        batch = self.sample_batch(n, generator, device)
        return batch["images"], batch["probs"]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: v[: self.size].clone() for k, v in self.fields.items()}
        state.update(position=self.position, added=self.added)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["images"].shape[0])
        for name, values in self.fields.items():
            values[: self.size] = state[name].to(values.device, values.dtype)
        self.position = int(state["position"])
        self.added = int(state["added"])
