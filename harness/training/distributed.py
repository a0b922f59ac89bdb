"""What keeps data-parallel replicas identical, for every method at once (spec methods-more §20.4).

* Gradients of every trainable parameter are averaged in one flat buffer, with a presence mask: a
  parameter a rank left without a gradient contributes zeros there, and only a parameter no rank
  touched keeps ``grad = None`` (so the optimiser skips it, weight decay included).
* Epoch logs are reduced over the union of the ranks' keys, each key over the rows that logged it.
* Normalisation running statistics (BatchNorm) are averaged before evaluation and checkpoints, so every
  rank evaluates, and rank 0 saves, the same model.
* Each rank's RNG state is gathered into the checkpoint and restored on its own rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from midasbench.harness.training.runtime import Runtime


def all_reduce_gradients(params: Sequence[nn.Parameter], runtime: Runtime) -> None:
    """Average every parameter's gradient over ranks; missing gradients count as zeros."""
    if not runtime.distributed or not params:
        return
    device = runtime.device
    pieces = [
        (p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)).to(
            device, torch.float32
        )
        for p in params
    ]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([*pieces, present])
    dist.all_reduce(flat)
    counts = flat[-len(params) :]
    flat = flat[: -len(params)] / runtime.world_size
    offset = 0
    for p, count in zip(params, counts.tolist(), strict=True):
        n = p.numel()
        p.grad = None if count == 0 else flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def reduce_epoch_logs(
    sums: dict[str, float], counts: dict[str, int], runtime: Runtime
) -> tuple[dict[str, float], dict[str, int]]:
    """Per-key sums and row counts over all ranks, for the union of keys any rank logged."""
    if not runtime.distributed:
        return sums, counts
    keys_per_rank: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(keys_per_rank, sorted(sums))
    keys = sorted(set().union(*keys_per_rank))
    buffer = torch.tensor(
        [sums.get(k, 0.0) for k in keys] + [float(counts.get(k, 0)) for k in keys],
        dtype=torch.float64,
        device=runtime.device,
    )
    dist.all_reduce(buffer)
    values = buffer.tolist()
    return dict(zip(keys, values[: len(keys)], strict=True)), {
        k: int(v) for k, v in zip(keys, values[len(keys) :], strict=True)
    }


def normalization_layers(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@torch.no_grad()
def sync_normalization_stats(model: nn.Module, runtime: Runtime) -> None:
    """Average BatchNorm running means and variances over ranks (one collective for all layers)."""
    if not runtime.distributed:
        return
    buffers = [
        b
        for layer in normalization_layers(model)
        for b in (layer.running_mean, layer.running_var)
        if b is not None
    ]
    if not buffers:
        return
    flat = runtime.all_reduce_mean(torch.cat([b.reshape(-1).to(torch.float64) for b in buffers]))
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b).to(b.dtype))
        offset += b.numel()


def gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's picklable object, in rank order (e.g. RNG states for the checkpoint)."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out
