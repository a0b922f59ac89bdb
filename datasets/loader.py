"""Mini-batches straight from memory-mapped Arrow columns.

A ``BatchLoader`` gathers whole batches with one fancy-index per column instead of collating samples one
by one (a ``torch.utils.data.DataLoader`` over single rows is far slower for in-memory features). Batch
order is a pure function of ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted
run would. An epoch is an ``EpochPlan``: the global row order (and optional per-row tags, e.g. SMV's
"keep modality m") decided once, identically on every rank, *before* sharding; under data-parallel
training each rank then takes a strided, equal-length share (as ``DistributedSampler`` does, padding by
wrapping around), so every rank runs the same number of steps.

Batches are gathered on the host in the stored dtypes (uint8 frames and fp16 spectrograms are sent to
the device as they are; ``datasets/device_feed.py`` casts and transforms them there). A variable-length
modality's batch is trimmed to its longest row, and the rows' lengths travel with the inputs
(``ModalityInputs.lengths``) to the encoders.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .format import SplitData, as_torch


class ModalityInputs(dict):
    """A batch's tensor per modality, and for each variable-length modality every row's valid length
    (``lengths[m]``, int64, one per row; the rest of the row is padding). ``model.encode`` hands the
    lengths to the encoders; it refuses a variable-length modality whose lengths are missing, so inputs
    rebuilt as a plain dict fail loudly: re-index rows with ``rows`` and swap values with ``replace``,
    which keep each modality's lengths with its rows."""

    def __init__(
        self,
        values: Mapping[str, torch.Tensor] | None = None,
        lengths: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(values or {})
        self.lengths: dict[str, torch.Tensor] = dict(lengths or {})

    @classmethod
    def of(cls, inputs: Mapping[str, torch.Tensor]) -> ModalityInputs:
        """``inputs`` itself if it already is one (lengths kept), else its tensors without lengths."""
        return inputs if isinstance(inputs, ModalityInputs) else cls(inputs)

    def rows(self, index: Mapping[str, torch.Tensor]) -> ModalityInputs:
        """Modality ``m``'s rows ``index[m]`` (others unchanged), its lengths re-indexed alike."""
        values = {m: (x[index[m]] if m in index else x) for m, x in self.items()}
        lengths = {m: (v[index[m]] if m in index else v) for m, v in self.lengths.items()}
        return ModalityInputs(values, lengths)

    def replace(self, values: Mapping[str, torch.Tensor]) -> ModalityInputs:
        """The same inputs with some modalities' tensors replaced (same rows, so the same lengths)."""
        return ModalityInputs({**self, **values}, self.lengths)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ModalityInputs:
        return ModalityInputs(
            {m: x.to(device, non_blocking=non_blocking) for m, x in self.items()},
            {m: v.to(device, non_blocking=non_blocking) for m, v in self.lengths.items()},
        )

    def pin_memory(self) -> ModalityInputs:
        return ModalityInputs(
            {m: x.pin_memory() for m, x in self.items()}, {m: v.pin_memory() for m, v in self.lengths.items()}
        )


@dataclass
class Batch:
    """Inputs per modality (with variable-length modalities' lengths), labels, each row's index in its
    split, and the rows' epoch-plan tags."""

    inputs: ModalityInputs
    labels: torch.Tensor
    index: torch.Tensor
    tags: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, ModalityInputs):
            self.inputs = ModalityInputs(self.inputs)

    def __len__(self) -> int:
        return len(self.labels)

    def _map(self, move: Any) -> Batch:
        return Batch(
            inputs=move(self.inputs),
            labels=move(self.labels),
            index=move(self.index),
            tags=None if self.tags is None else move(self.tags),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy in page-locked host memory, so the copy to a GPU can run while it computes."""
        return self._map(lambda t: t.pin_memory())


@dataclass(frozen=True)
class EpochPlan:
    """The rows of one epoch in order (repeats allowed), an optional int64 tag per row, and optional
    segments: the end offsets of consecutive runs of rows that no mini-batch may mix (e.g. Data
    Remixing's single-modality subsets). Each segment is sharded and batched on its own.

    A method that re-samples returns its own plan from ``Method.epoch_plan``; the same plan must come
    out on every rank (derive it from seeds and rank-identical state only)."""

    rows: np.ndarray
    tags: np.ndarray | None = None
    segments: np.ndarray | None = None

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, dtype=np.int64)
        object.__setattr__(self, "rows", rows)
        if rows.ndim != 1:
            raise ValueError(f"EpochPlan.rows must be one-dimensional, got shape {rows.shape}")
        if self.tags is not None:
            tags = np.asarray(self.tags, dtype=np.int64)
            if tags.shape != rows.shape:
                raise ValueError(f"EpochPlan.tags has shape {tags.shape}, rows {rows.shape}: one tag a row")
            object.__setattr__(self, "tags", tags)
        if self.segments is not None:
            ends = np.asarray(self.segments, dtype=np.int64)
            if ends.ndim != 1 or len(ends) == 0 or ends[-1] != len(rows) or np.any(np.diff(ends) < 0):
                raise ValueError(
                    f"EpochPlan.segments must be non-decreasing end offsets ending at {len(rows)} rows, "
                    f"got {ends.tolist()}"
                )
            object.__setattr__(self, "segments", ends)

    def __len__(self) -> int:
        return len(self.rows)

    def segment_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of each segment; the whole plan is one segment when none are given."""
        if self.segments is None:
            return [(0, len(self.rows))]
        starts = [0, *self.segments[:-1].tolist()]
        return [(a, b) for a, b in zip(starts, self.segments.tolist(), strict=True) if b > a]

    def shard(self, rank: int, world_size: int) -> EpochPlan:
        """This rank's strided share of each segment, padded by wrapping so that every rank gets
        ceil(n / W) rows of it."""
        if world_size == 1:
            return self
        picks, ends = [], []
        for start, stop in self.segment_bounds():
            per_rank = -(-(stop - start) // world_size)
            picks.append(start + np.resize(np.arange(stop - start), per_rank * world_size)[rank::world_size])
            ends.append((ends[-1] if ends else 0) + per_rank)
        positions = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        return EpochPlan(
            self.rows[positions],
            None if self.tags is None else self.tags[positions],
            None if self.segments is None else np.asarray(ends or [0]),
        )

    def batch_slices(self, batch_size: int, drop_last: bool = False) -> list[tuple[int, int]]:
        """(start, stop) of each mini-batch, never across a segment boundary, except for a segment of a
        single row: BatchNorm cannot train on one row, so it joins the batch before it (or, for the
        first segment, the one after); its rows keep their tags."""
        slices = [
            (start + a, start + b)
            for start, stop in self.segment_bounds()
            for a, b in batch_bounds(stop - start, batch_size, drop_last)
        ]
        merged: list[tuple[int, int]] = []
        for a, b in slices:
            if merged and (b - a == 1 or merged[-1][1] - merged[-1][0] == 1):
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self.batch_slices(batch_size, drop_last))


def batch_bounds(num_rows: int, batch_size: int, drop_last: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of each mini-batch. A trailing batch of a single row joins the one before it
    (``batch_size + 1`` rows): BatchNorm cannot train on one row, and a plan whose length is 1 more than a
    multiple of the batch size (re-sampling methods, odd splits) would otherwise fail its last step."""
    starts = list(range(0, num_rows, batch_size))
    bounds = [(s, min(s + batch_size, num_rows)) for s in starts]
    if drop_last:
        return [(a, b) for a, b in bounds if b - a == batch_size]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], num_rows)]
    return bounds


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch, derived from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_rows)


def gather_batch(split: SplitData, rows: np.ndarray, tags: np.ndarray | None = None) -> Batch:
    """Copy ``rows`` of every column into a batch. Rows are read in sorted order for locality; the tags
    (and repeated rows) follow their rows, so the batch holds exactly the plan's (row, tag) pairs.

    Values keep their stored dtype (float64 excepted, made float32 here, halving what is sent); a
    variable-length modality is cut to the batch's longest row and carries its lengths."""
    order = np.argsort(np.asarray(rows, dtype=np.int64), kind="stable")
    rows = np.asarray(rows, dtype=np.int64)[order]
    values, lengths = {}, {}
    for name, column in split.columns.items():
        array = column.gather(rows)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if name in split.lengths:
            row_lengths = split.lengths[name][rows]
            longest = int(row_lengths.max()) if len(rows) else 0
            if longest < array.shape[1]:
                array = np.ascontiguousarray(array[:, :longest])
            lengths[name] = torch.from_numpy(row_lengths)
        values[name] = as_torch(array)
    return Batch(
        inputs=ModalityInputs(values, lengths),
        labels=torch.from_numpy(split.labels[rows]),
        index=torch.from_numpy(rows),
        tags=None if tags is None else torch.from_numpy(np.asarray(tags, dtype=np.int64)[order]),
    )


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

    def default_plan(self) -> EpochPlan:
        """The global (unsharded) plan of the current epoch: the seeded permutation, or split order."""
        n = len(self.split)
        return EpochPlan(epoch_permutation(n, self.seed, self.epoch) if self.shuffle else np.arange(n))

    def order(self) -> np.ndarray:
        """This rank's row order for the current epoch under the default plan."""
        return self.default_plan().shard(self.rank, self.world_size).rows

    def __len__(self) -> int:
        return (
            self.default_plan().shard(self.rank, self.world_size).num_batches(self.batch_size, self.drop_last)
        )

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(self.default_plan().shard(self.rank, self.world_size))

    def plan_batches(self, plan: EpochPlan) -> Iterator[Batch]:
        """This rank's batches of a global plan (sharded here, so every rank runs the same step count)."""
        return self.batches(plan.shard(self.rank, self.world_size))

    def batches(self, rows: np.ndarray | EpochPlan) -> Iterator[Batch]:
        """Batches over an explicit, already-sharded row order or plan."""
        plan = rows if isinstance(rows, EpochPlan) else EpochPlan(rows)
        for start, stop in plan.batch_slices(self.batch_size, self.drop_last):
            tags = None if plan.tags is None else plan.tags[start:stop]
            yield gather_batch(self.split, plan.rows[start:stop], tags)
