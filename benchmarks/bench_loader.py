"""Loader throughput against what a training step consumes (issue 9: the loader must keep the device fed).

For each case a dataset is written to a temporary folder and a real ``TrainingRun`` is built on it
(the trainer's loader, device feed, transforms, model, method and optimisers). Two rates are measured
in samples/s, each the best of ``--repeats`` passes after one untimed pass:

* **loader**: the run's feed over one epoch plan (gather from the memory-mapped Arrow file, the
  transforms' draws and the prefetch thread, the copy and the transforms on the device), consumed by
  nothing;
* **step**: ``TrainingRun._step`` (forward, backward, optimiser step) on batches already on the device.

The goal is loader ≥ 5× step in every case, so loading never bounds training; the script exits 1
otherwise. Cases: CREMA-D-shaped inputs scaled to a CPU (uint8 frames with frame choice, random
resized crop, flip and ImageNet normalisation; fp16 log-mels with SpecAugment masking) on ResNet-18
encoders, and 512-d frozen features on the small MLP heads of a head-only sweep (the step the loader
has the least time for).

    .venv/bin/python benchmarks/bench_loader.py [--repeats 3] [--tmp DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from midasbench.datasets.format import SplitArrays, write_dataset
from midasbench.harness.config import load_config
from midasbench.harness.training.trainer import TrainingRun

GOAL = 5.0


@dataclass(frozen=True)
class Case:
    name: str
    rows: int
    batch: int
    modalities: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
    overrides: tuple[str, ...]


CLIP_TRANSFORMS = {
    "visual": {
        "train": [
            {"name": "frames", "params": {"num": 2}},
            {"name": "random_resized_crop", "params": {"size": 56}},
            {"name": "hflip"},
        ],
        "eval": [
            {"name": "frames", "params": {"num": 2, "mode": "center"}},
            {"name": "center_crop", "params": {"size": 56}},
        ],
        "normalize": {"preset": "imagenet"},
    },
    "audio": {"train": [{"name": "spec_mask", "params": {"time_width": 8, "freq_width": 8}}]},
}

CASES = (
    Case(
        "frames+fbank, resnet18",
        rows=384,
        batch=16,
        modalities={"audio": ((128, 64), "float16"), "visual": ((3, 4, 64, 64), "uint8")},
        overrides=(
            "model.default_encoder={name: resnet18}",
            f"data.transforms={json.dumps(CLIP_TRANSFORMS)}",
        ),
    ),
    Case(
        "frozen 512-d features, mlp heads",
        rows=20_000,
        batch=64,
        modalities={"audio": ((512,), "float32"), "visual": ((512,), "float32")},
        overrides=("model.default_encoder={name: mlp, params: {hidden: [256], out_dim: 128}}",),
    ),
)


def write_case(case: Case, root: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int, prefix: str) -> SplitArrays:
        values = {}
        for name, (shape, dtype) in case.modalities.items():
            if dtype == "uint8":
                values[name] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
            else:
                values[name] = rng.standard_normal((n, *shape)).astype(dtype)
        return SplitArrays(ids=[f"{prefix}{i}" for i in range(n)], labels=np.arange(n) % 6, modalities=values)

    path = root / case.name.replace(" ", "_").replace(",", "").replace("+", "_")
    splits = {"train": split(case.rows, "t"), "val": split(64, "v"), "test": split(64, "s")}
    write_dataset(
        path,
        name="bench",
        version="1",
        classes=[str(c) for c in range(6)],
        splits=splits,
        split_protocol="official",
        split_seed=None,
    )
    return path


def build_run(case: Case, path: Path, device: str, checkpoints: Path) -> TrainingRun:
    cfg = load_config(
        "synthetic",
        [
            f"data.path={path}",
            "data.split=official",
            f"train.batch_size={case.batch}",
            f"train.device={device}",
            "train.progress=false",
            f"train.checkpoint_dir={checkpoints}",
            "tracking.enabled=false",
            *case.overrides,
        ],
    )
    return TrainingRun(cfg)


def best_rate(passes: int, run_once) -> float:
    run_once()  # warm-up: page cache, allocator, kernels
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        samples = run_once()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return samples / min(times)


def measure(case: Case, run: TrainingRun, repeats: int) -> tuple[float, float]:
    plan = run.method.epoch_plan(0, run.loader.default_plan())

    def load() -> int:
        count = 0
        for batch in run.feed.batches(run.loader.plan_batches(plan), epoch=0):
            count += len(batch)
        return count

    batches = list(run.feed.batches(run.loader.plan_batches(plan), epoch=0))[:8]
    run.model.train()

    def step() -> int:
        for batch in batches:
            run._step(batch, 0)
        return sum(len(b) for b in batches)

    return best_rate(repeats, load), best_rate(repeats, step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tmp", type=Path, default=None, help="folder for the datasets (default: system temp)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="midasbench-loader-", dir=args.tmp))
    table = Table(
        title=f"loader vs training step, samples/s ({args.device}, {torch.get_num_threads()} threads)"
    )
    for column in ("case", "batch", "loader", "step", "loader / step", "goal"):
        table.add_column(column, justify="left" if column == "case" else "right")
    ok = True
    try:
        for case in CASES:
            run = build_run(case, write_case(case, root), args.device, root / "ckpt")
            loader, step = measure(case, run, args.repeats)
            ratio = loader / step
            ok &= ratio >= GOAL
            table.add_row(
                case.name,
                str(case.batch),
                f"{loader:,.0f}",
                f"{step:,.0f}",
                f"{ratio:.1f}x",
                f">= {GOAL:.0f}x " + ("ok" if ratio >= GOAL else "MISSED"),
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Console().print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
