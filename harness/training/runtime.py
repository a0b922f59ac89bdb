"""What a method may use while it runs: device, precision, ranks, collectives, the data, the optimisers.

A method reaches the run only through its ``Runtime`` (``self.runtime``), so one file per method is
correct on one process and on many without knowing which. The collectives are no-ops on one process;
under ``torch.distributed`` they reduce on the training device (NCCL reduces GPU tensors only) and hand
back a tensor on the caller's device. Every rank must call a collective at the same point with the
same shape: methods call them unconditionally, whatever their local batch held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from midasbench.datasets.device_feed import DeviceFeed
    from midasbench.datasets.format import SplitData
    from midasbench.datasets.loader import Batch
    from midasbench.harness.models.model import MultimodalModel

# (model, split, rows, modalities) -> (features per modality, labels): the evaluation's encoder pass
EncodeFn = Callable[
    ["MultimodalModel", "SplitData", np.ndarray, list[str]], tuple[dict[str, torch.Tensor], torch.Tensor]
]
# parameter groups (dicts or a list of parameters) -> an optimiser of the run's configured kind and settings
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


def distributed_rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Runtime:
    """The run as a method sees it. ``amp_dtype`` is the encoders' autocast dtype (None: full fp32)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    train_split: SplitData | None = None
    val_split: SplitData | None = None
    batch_size: int = 64  # the per-rank training batch size
    eval_batch_size: int = 512
    encode_fn: EncodeFn | None = None
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    optimizer_factory: OptimizerFactory | None = None
    checkpoint_dir: Path | None = None  # the run's checkpoint folder (a method's own files go under it)
    feed: DeviceFeed | None = None  # host batches -> device batches with the run's transforms

    def device_feed(self) -> DeviceFeed:
        """The run's feed (its transforms, prefetch), or a plain one to the device outside a run."""
        if self.feed is None:
            from midasbench.datasets.device_feed import DeviceFeed

            self.feed = DeviceFeed(self.device)
        return self.feed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- collectives (no-ops on one process)
    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.distributed:
            return tensor.clone()
        buffer = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(buffer, op=op)
        return buffer.to(tensor.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over ranks (a new tensor). Sum numerators and denominators, then divide (spec §20.4 R1)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a new tensor)."""
        total = self.all_reduce_sum(tensor)
        return total / self.world_size if self.distributed else total

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s value on every rank (a new tensor): for state one rank decides for all."""
        if not self.distributed:
            return tensor.clone()
        buffer = tensor.detach().to(self.device, copy=True)
        dist.broadcast(buffer, src=src)
        return buffer.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0 in rank order (equal shapes on every rank)."""
        if not self.distributed:
            return tensor.clone()
        buffer = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(buffer) for _ in range(self.world_size)]
        dist.all_gather(parts, buffer)
        return torch.cat(parts).to(tensor.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A picklable object from rank ``src`` (e.g. a numpy plan); use sparingly, once per epoch."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    # ---- data
    def encode_rows(
        self,
        model: MultimodalModel,
        rows: np.ndarray,
        *,
        split: SplitData | None = None,
        modalities: list[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Encoder features (fp32, eval mode, no grad) and labels of ``rows`` of a split (default: train),
        in the order given, identical on every rank. Under DDP each rank encodes a strided share and the
        shares are gathered (spec §20.4 R5; padding rows are dropped), so the pass costs 1/W per rank."""
        split = split if split is not None else self.train_split
        if split is None or self.encode_fn is None:
            raise RuntimeError("encode_rows needs a runtime bound to a run (train split and encoder pass)")
        names = list(model.modalities if modalities is None else modalities)
        rows = np.asarray(rows, dtype=np.int64)
        if not self.distributed:
            return self.encode_fn(model, split, rows, names)
        per_rank = -(-len(rows) // self.world_size)
        padded = np.resize(rows, per_rank * self.world_size) if len(rows) else rows
        mine = padded[self.rank :: self.world_size]
        features, labels = self.encode_fn(model, split, mine, names)
        # all_gather is rank-major: gathered position r*per_rank + k holds padded[k*W + r]
        source = np.arange(self.world_size)[:, None] + np.arange(per_rank)[None, :] * self.world_size
        inverse = torch.from_numpy(np.argsort(source.reshape(-1)))
        gathered = {m: self.all_gather(f)[inverse][: len(rows)] for m, f in features.items()}
        return gathered, self.all_gather(labels)[inverse][: len(rows)]

    def train_batches(self, epoch: int, seed: int, rows: np.ndarray | None = None) -> Iterator[Batch]:
        """This rank's mini-batches of one shuffled pass over the training split (or over its ``rows``),
        on the device with the training transforms of ``epoch``, in an order that is a function of
        ``(seed, epoch)``: for a method's own trainings
        (G-Blending's probes). Every rank runs the same number of batches (sharded as the trainer's are);
        average the gradients with ``average_gradients`` before stepping."""
        from midasbench.datasets.loader import BatchLoader, EpochPlan, epoch_permutation

        if self.train_split is None:
            raise RuntimeError("train_batches needs a runtime bound to a run (its train split)")
        pool = np.arange(len(self.train_split)) if rows is None else np.asarray(rows, dtype=np.int64)
        plan = EpochPlan(pool[epoch_permutation(len(pool), seed, epoch)])
        loader = BatchLoader(
            self.train_split, self.batch_size, shuffle=False, rank=self.rank, world_size=self.world_size
        )
        yield from self.device_feed().batches(loader.plan_batches(plan), epoch=epoch)

    def rows_batch(self, rows: np.ndarray, split: SplitData | None = None) -> Batch:
        """One batch of ``rows`` (default: of the training split) on the device, with the eval transforms:
        for a method's own fixed passes (LFM's probe batch)."""
        from midasbench.datasets.loader import gather_batch

        split = split if split is not None else self.train_split
        if split is None:
            raise RuntimeError("rows_batch needs a runtime bound to a run (its train split)")
        return self.device_feed().one(gather_batch(split, np.asarray(rows, dtype=np.int64)), epoch=None)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average ``params``' gradients over ranks (missing ones count as zeros), as the trainer does for
        its own step: for a method's own trainings, so its copies stay identical on every rank."""
        from midasbench.harness.training.distributed import all_reduce_gradients

        all_reduce_gradients(params, self)

    def average_normalization_stats(self, module: torch.nn.Module) -> None:
        """Average ``module``'s BatchNorm running statistics over ranks, as the trainer does after each
        epoch: for a model copy a method trains itself (G-Blending's probes)."""
        from midasbench.harness.training.distributed import sync_normalization_stats

        sync_normalization_stats(module, self)

    # ---- optimisers
    def param_groups(self, optimizer: str = "main") -> list[dict[str, Any]]:
        """The parameter groups of one of the run's optimisers (read their lr; do not replace them)."""
        return self._optimizer(optimizer).param_groups

    def reset_optimizer_state(self, optimizer: str = "main") -> None:
        """Forget an optimiser's per-parameter state (momentum, Adam moments) but keep its groups and their
        current lr: what re-creating the optimiser at a phase boundary does (ReconBoost, §28.2)."""
        self._optimizer(optimizer).state.clear()

    def new_optimizer(self, groups: Any) -> torch.optim.Optimizer:
        """A fresh optimiser of the run's configured kind and settings (``optimizer:``) over ``groups``,
        for a method's own trainings; the trainer neither steps nor checkpoints it."""
        if self.optimizer_factory is None:
            raise RuntimeError("new_optimizer needs a runtime bound to a run (its optimizer config)")
        return self.optimizer_factory(groups)

    def _optimizer(self, name: str) -> torch.optim.Optimizer:
        if name not in self.optimizers:
            raise KeyError(f"no optimizer {name!r}; the run has {sorted(self.optimizers)}")
        return self.optimizers[name]
