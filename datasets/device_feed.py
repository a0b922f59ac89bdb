"""From the loader's host batches to the model's device batches, without the device waiting (issue 9).

``DeviceFeed.batches`` runs the host side in a background thread, ``prefetch`` batches ahead: the
gather from the memory-mapped columns (numpy releases the GIL while it copies), the draws of the
modalities' random transforms (``transforms.ModalityPipelines.draws``) and, for a GPU, the copy into
page-locked memory. The training thread then only issues non-blocking copies and the transforms'
kernels, so loading the next batch overlaps the step on the current one.

What a batch holds does not depend on the thread: the plan fixes the rows before the epoch starts, and
the draws are a function of (seed, epoch, row). ``prefetch=0`` reads in the calling thread (the same
batches, for debugging).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from .loader import Batch
from .transforms import ModalityPipelines

T = TypeVar("T")
_POLL_S = 0.05


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` produced by a background thread at most ``depth`` ahead of the consumer, in order.

    An exception in the producer is raised in the consumer at the item where it happened; a consumer
    that stops early (``break``, an error, Ctrl-C) stops the thread before this generator returns."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put((kind, value), timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("done", None)
        except BaseException as exc:  # handed to the consumer, raised there
            put("error", exc)

    worker = threading.Thread(target=produce, name="midasbench-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


@dataclass
class HostBatch:
    """A batch ready for its copy: its tensors (pinned for a GPU) and its transforms' draws."""

    batch: Batch
    draws: dict[str, torch.Tensor]


class DeviceFeed:
    """Host batches in, transformed device batches out (module docstring).

    ``pipelines`` holds the modalities' transforms (None: stored values, half precision cast to float32
    on the device); ``seed`` keys their draws."""

    def __init__(
        self,
        device: torch.device,
        pipelines: ModalityPipelines | None = None,
        *,
        seed: int = 0,
        prefetch: int = 2,
    ) -> None:
        self.device = device
        self.pipelines = pipelines
        self.seed = seed
        self.prefetch = prefetch
        self.pin = device.type == "cuda"

    def prepare(self, batch: Batch, epoch: int | None) -> HostBatch:
        """The host side (the prefetch thread's work): draws from the rows, then page-locked copies."""
        draws: dict[str, torch.Tensor] = {}
        if self.pipelines is not None:
            rows = batch.index.numpy()
            draws = {m: torch.from_numpy(u) for m, u in self.pipelines.draws(rows, self.seed, epoch).items()}
        if self.pin:
            batch = batch.pin_memory()
            draws = {m: u.pin_memory() for m, u in draws.items()}
        return HostBatch(batch, draws)

    def to_device(self, host: HostBatch, train: bool) -> Batch:
        """The device side: non-blocking copies, then the transforms (eval ones unless ``train``)."""
        batch = host.batch.to(self.device, non_blocking=True)
        draws = {m: u.to(self.device, non_blocking=True) for m, u in host.draws.items()}
        if self.pipelines is not None:
            values = self.pipelines.apply(batch.inputs, draws, train)
        else:
            half = (torch.float16, torch.float64)
            values = {m: x.float() if x.dtype in half else x for m, x in batch.inputs.items()}
        batch.inputs = batch.inputs.replace(values)
        return batch

    def batches(self, host_batches: Iterable[Batch], *, epoch: int | None) -> Iterator[Batch]:
        """Device batches of ``host_batches``: training transforms drawn for ``epoch``, or the eval
        transforms when ``epoch`` is None."""
        prepared = (self.prepare(b, epoch) for b in host_batches)
        for host in prefetched(prepared, self.prefetch):
            yield self.to_device(host, train=epoch is not None)

    def one(self, batch: Batch, *, epoch: int | None) -> Batch:
        """One host batch to the device, in the calling thread (a method's probe batch)."""
        return self.to_device(self.prepare(batch, epoch), train=epoch is not None)
