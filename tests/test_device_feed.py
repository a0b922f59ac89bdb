"""The prefetching feed (datasets/device_feed.py) and the trainer's device-side logging: the same
batches with and without the background thread, errors and early stops handled, transforms applied on
the way, logged tensors summed without a per-step read."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from midasbench.datasets.device_feed import DeviceFeed, prefetched
from midasbench.datasets.format import ModalitySpec
from midasbench.datasets.loader import Batch, ModalityInputs
from midasbench.datasets.transforms import ModalityPipelines
from midasbench.harness.training.trainer import EpochLogs


def host_batches(count: int) -> list[Batch]:
    return [
        Batch(
            inputs={"a": torch.full((2, 3), float(k), dtype=torch.float16)},
            labels=torch.tensor([k, k]),
            index=torch.tensor([2 * k, 2 * k + 1]),
        )
        for k in range(count)
    ]


def test_prefetched_yields_every_item_in_order():
    assert list(prefetched(iter(range(50)), 3)) == list(range(50))
    assert list(prefetched(iter(range(5)), 0)) == list(range(5))


def test_prefetched_raises_the_producers_error_at_its_item():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone at row 3")

    got = []
    with pytest.raises(OSError, match="disk gone at row 3"):
        for item in prefetched(items(), 2):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_stops_the_thread():
    before = threading.active_count()
    produced = []

    def items():
        for k in range(1000):
            produced.append(k)
            yield k

    for item in prefetched(items(), 2):
        if item == 3:
            break
    assert threading.active_count() == before  # joined, not left running
    assert len(produced) < 10  # at most depth ahead of the consumer


def test_feed_casts_half_precision_on_the_device_and_keeps_the_batches():
    feed = DeviceFeed(torch.device("cpu"), prefetch=2)
    got = list(feed.batches(host_batches(4), epoch=0))
    assert [b.labels.tolist() for b in got] == [[k, k] for k in range(4)]
    assert all(b.inputs["a"].dtype == torch.float32 for b in got)
    assert isinstance(got[0].inputs, ModalityInputs)
    same = list(DeviceFeed(torch.device("cpu"), prefetch=0).batches(host_batches(4), epoch=0))
    assert all(torch.equal(a.inputs["a"], b.inputs["a"]) for a, b in zip(got, same, strict=True))


def test_feed_applies_the_training_or_eval_transforms():
    pipes = ModalityPipelines(
        {
            "a": {
                "train": [{"name": "hflip", "params": {"p": 1.0}}],
                "normalize": {"mean": [1.0], "std": [2.0]},
            }
        },
        {"a": ModalitySpec(dtype="float16", shape=(3,))},
    )
    batch = Batch(
        inputs={"a": torch.tensor([[1.0, 3.0, 5.0]], dtype=torch.float16)},
        labels=torch.tensor([0]),
        index=torch.tensor([0]),
    )
    feed = DeviceFeed(torch.device("cpu"), pipes, seed=0)
    train = next(feed.batches([batch], epoch=0)).inputs["a"]
    evaluated = feed.one(batch, epoch=None).inputs["a"]
    assert train.tolist() == [[2.0, 1.0, 0.0]]  # flipped, then (x - 1) / 2
    assert evaluated.tolist() == [[0.0, 1.0, 2.0]]  # eval: normalised only


def test_epoch_logs_sum_tensors_on_the_device_and_read_them_once():
    logs = EpochLogs()
    logs.add({"loss": torch.tensor(0.5), "share": 0.25}, rows=2)
    logs.add({"loss": torch.tensor(1.5), "share": 0.75}, rows=6)
    assert isinstance(logs.sums["loss"], torch.Tensor)  # not read back per step
    sums, counts = logs.totals()
    assert sums == {"loss": 0.5 * 2 + 1.5 * 6, "share": 0.25 * 2 + 0.75 * 6}  # 10.0 and 5.0
    assert counts == {"loss": 8, "share": 8}
    assert all(isinstance(v, float) for v in sums.values())


def test_training_metrics_are_unchanged_by_prefetching(tiny_config):
    from midasbench.harness.training.trainer import train

    threaded = train(tiny_config("train.epochs=2", "train.resume=false", "train.prefetch_batches=3"))
    inline = train(tiny_config("train.epochs=2", "train.resume=false", "train.prefetch_batches=0"))
    assert threaded.history == inline.history
    assert np.isfinite(threaded.history[-1]["train/loss"])
