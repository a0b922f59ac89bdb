"""Mini-batches straight from memory-mapped Arrow columns.

A ``BatchLoader`` gathers whole batches with one fancy-index per column instead of collating samples one
by one (a ``torch.utils.data.DataLoader`` over single rows is far slower for in-memory features). Batch
order is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted
run would. Under data-parallel training each rank takes a strided, equal-length share of the permutation
(as ``DistributedSampler`` does), padding by wrapping around.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .format import SplitData, as_torch


@dataclass
class Batch:
    """Inputs per modality, labels, and each row's index in its split (for diagnostics and samplers)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            inputs={k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()},
            labels=self.labels.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
        )


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch, derived from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_rows)


def gather_batch(split: SplitData, rows: np.ndarray) -> Batch:
    """Copy ``rows`` of every column into a batch (rows are read in sorted order for locality)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    inputs = {}
    for name, column in split.columns.items():
        values = column.gather(rows)
        if values.dtype == np.float16 or values.dtype == np.float64:
            values = values.astype(np.float32)
        inputs[name] = as_torch(values)
    return Batch(inputs=inputs, labels=torch.from_numpy(split.labels[rows]), index=torch.from_numpy(rows))


class BatchLoader:
    """Iterate over a split in mini-batches; ``shuffle`` uses ``epoch_permutation(seed, epoch)``."""

    def __init__(
        self,
        split: SplitData,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """This rank's row order for the current epoch."""
        n = len(self.split)
        rows = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else np.arange(n)
        if self.world_size > 1:
            per_rank = -(-n // self.world_size)
            padded = np.resize(rows, per_rank * self.world_size)
            rows = padded[self.rank :: self.world_size]
        return rows

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(self.order())

    def batches(self, rows: np.ndarray) -> Iterator[Batch]:
        """Batches over an explicit row order (e.g. one a re-sampling method chose)."""
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield gather_batch(self.split, chunk)
