"""This process's share of a batch when several processes run one job, and the gather that rejoins it.

A job split over processes stays the same job: each process computes rows ``bounds(n)`` of every
``n``-row batch, ``gather`` returns the whole batch (every process's rows, in process order) to all
of them, so anything computed from gathered batches is identical on every process and equal to what
one process computes alone. Used by the online probe; pretraining and extraction shard their own way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count`` (``Shard()``: one process, where ``gather`` returns its input)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count}), got {self.index}")

    @classmethod
    def current(cls) -> "Shard":
        """The running ``torch.distributed`` group's rank and size, or one process when none is set up."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(index=dist.get_rank(), count=dist.get_world_size())
        return cls()

    def sizes(self, n: int) -> list[int]:
        """Rows each process holds of an ``n``-row batch: as equal as possible, the first ones one larger."""
        base, extra = divmod(n, self.count)
        return [base + (1 if i < extra else 0) for i in range(self.count)]

    def bounds(self, n: int) -> slice:
        """This process's rows of an ``n``-row batch, as a slice."""
        sizes = self.sizes(n)
        start = sum(sizes[: self.index])
        return slice(start, start + sizes[self.index])

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """All processes' ``local`` rows (this one holds ``bounds(n)``) joined into the ``n``-row batch."""
        if self.count == 1:
            return local
        import torch.distributed as dist

        sizes = self.sizes(n)
        if local.shape[0] != sizes[self.index]:
            raise ValueError(f"process {self.index} holds {local.shape[0]} rows, expected {sizes[self.index]}")
        padded = local.new_zeros((max(sizes), *local.shape[1:]))  # all_gather needs equal shapes
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])


__all__ = ["Shard"]
