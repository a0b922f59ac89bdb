"""GPU benchmark (issue 13): a CREMA-D-shaped ResNet-18 trial on one GPU, fp32 vs bf16 autocast vs bf16 +
channels-last; several trials packed on one GPU with fractional GPUs vs one at a time; a ``workers: 2``
Ray Train trial over NCCL when the machine has two GPUs. Without a CUDA device it says so and exits 0
(the project never needs a GPU); ``make bench`` runs it everywhere.

* **step throughput**: a real ``TrainingRun`` (``joint``, ResNet-18 encoders on CREMA-D's stored shapes:
  fp16 log-mels (1024, 128), uint8 clips (3, 3, 224, 224), 6 classes, batch 64), its ``_step`` timed on
  batches already on the GPU, as ``bench_midas_cost.py`` does: samples/s, peak memory, and the GPU's
  utilisation sampled with ``nvidia-smi`` every 0.1 s during the timed passes. bf16 is the trainer's
  ``train.amp`` (autocast); channels-last is applied to the built model here (the trainer has no switch
  for it), to see whether one is worth adding. MIDAS feature level is timed beside joint in bf16.
* **packing**: ``--pack`` short trials of the same model through ``midasbench sweep`` with
  ``gpus_per_trial: 1/pack`` (all at once on one GPU) against ``gpus_per_trial: 1`` (one at a time);
  whole-command seconds and the speed-up (goal, informally: > 1 when trials are small).
* **NCCL**: with ≥ 2 GPUs, one ``workers: 2, gpus_per_worker: 1`` trial against the same trial on one
  GPU: whole-command and per-epoch seconds.

    .venv/bin/python benchmarks/bench_gpu.py [--steps 20] [--repeats 3] [--batch 64] [--pack 4]
        [--epochs 2] [--rows 512] [--skip-sweeps]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from _bench_support import Row, median, print_table, run_sweep_command
from bench_midas_cost import MODELS, build_cases

CREMAD = replace(
    MODELS["resnet18"],
    key="cremad-gpu",
    title="resnet18, fbank (1024, 128) + frames (3, 3, 224, 224)",
    batch=64,
    steps=20,
    modalities={"audio": ((1024, 128), "float16"), "visual": ((3, 3, 224, 224), "uint8")},
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pass (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per case (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=512, help="training rows of the written dataset")
    parser.add_argument("--pack", type=int, default=4, help="trials packed on one GPU (default 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each sweep trial (default 2)")
    parser.add_argument("--skip-sweeps", action="store_true", help="only the step throughput")
    return parser.parse_args(argv)


class UtilisationSampler:
    """GPU 0's utilisation (%) from ``nvidia-smi`` every 0.1 s while active; None where it is missing."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = shutil.which("nvidia-smi") is not None

    def __enter__(self) -> UtilisationSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.wait(0.1):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def step_rows(args: argparse.Namespace) -> list[Row]:
    """fp32, bf16, bf16 + channels-last joint steps, and bf16 MIDAS feature level."""
    model = replace(CREMAD, batch=args.batch, rows=args.rows)
    variants = {
        "joint fp32": ("joint", ["train.amp=false"], False),
        "joint bf16": ("joint", ["train.amp=true"], False),
        "joint bf16 + channels-last": ("joint", ["train.amp=true"], True),
        "midas feature bf16": ("midas feature", ["train.amp=true"], False),
    }
    rows: list[Row] = []
    for label, (method, overrides, channels_last) in variants.items():
        case_model = replace(model, overrides=(*model.overrides, *overrides))
        (case,) = build_cases(case_model, args, [method])
        if channels_last:
            case.run.model.to(memory_format=torch.channels_last)
        case.steps(args.warmup)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rates = []
        with UtilisationSampler() as sampler:
            for _ in range(args.repeats):
                start = time.perf_counter()
                case.steps(args.steps)
                torch.cuda.synchronize()
                rates.append(args.steps * args.batch / (time.perf_counter() - start))
        peak = torch.cuda.max_memory_allocated() / 2**30
        utilisation = f"{sampler.mean:.0f} %" if sampler.mean is not None else "n/a (no nvidia-smi)"
        spread = f"{median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})"
        rows.append(Row(f"{label}: samples/s, median (min–max)", value=spread))
        rows.append(Row(f"{label}: peak GiB, GPU utilisation", value=f"{peak:.2f} GiB, {utilisation}"))
        del case
        torch.cuda.empty_cache()
    return rows


def sweep_overrides(data: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"data.path={data}",
        "data.split=official",
        "model.default_encoder={name: resnet18}",
        "train.device=cuda",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}",
        "train.num_threads=2",
    ]


def sweep_rows(args: argparse.Namespace) -> list[Row]:
    from bench_midas_cost import write_clips

    data = write_clips(replace(CREMAD, rows=args.rows), args.root)
    overrides = sweep_overrides(data, args)
    grid = {"train.seed": list(range(args.pack))}
    packed = {"gpus_per_trial": round(1 / args.pack, 4), "cpus_per_trial": 2}
    sides = {
        f"{args.pack} trials packed on one GPU": (packed, args.pack),
        f"{args.pack} trials one at a time": ({"gpus_per_trial": 1, "cpus_per_trial": 2}, 1),
    }
    seconds: dict[str, float] = {}
    rows: list[Row] = []
    for label, (resources, concurrent) in sides.items():
        sweep = {
            "base": "synthetic",
            "overrides": overrides,
            "grid": grid,
            "resources": resources,
            "max_concurrent_trials": concurrent,
        }
        run = run_sweep_command("gpu-pack", sweep)
        seconds[label] = run.timed.seconds
        epochs = [i for t in run.trials for i in t.intervals]
        rows.append(Row(f"{label}: whole command", value=f"{run.timed.seconds:.1f} s"))
        rows.append(Row(f"{label}: epoch", value=f"{median(epochs):.2f} s" if epochs else "n/a"))
    one, many = seconds.values()
    rows.append(Row("packing speed-up (one at a time / packed)", value=f"{many / one:.2f}x"))
    if torch.cuda.device_count() >= 2:
        rows += nccl_rows(overrides)
    else:
        rows.append(Row("workers: 2 over NCCL", value=f"not run: {torch.cuda.device_count()} GPU"))
    return rows


def nccl_rows(overrides: list[str]) -> list[Row]:
    rows = []
    for label, resources in {
        "one GPU": {"gpus_per_trial": 1, "cpus_per_trial": 2},
        "workers: 2 over NCCL": {"workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 2},
    }.items():
        run = run_sweep_command(
            "gpu-nccl", {"base": "synthetic", "overrides": overrides, "resources": resources}
        )
        epochs = [i for t in run.trials for i in t.intervals]
        rows.append(Row(f"{label}: whole command", value=f"{run.timed.seconds:.1f} s"))
        rows.append(Row(f"{label}: epoch", value=f"{median(epochs):.2f} s" if epochs else "n/a"))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (the GPU figures need a GPU machine)")
        return 0
    args.device, args.threads, args.memory_steps, args.tmp = "cuda", 2, 0, None
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.root = Path(tempfile.mkdtemp(prefix="midasbench-gpu-"))
    try:
        rows = step_rows(args)
        if not args.skip_sweeps:
            rows += sweep_rows(args)
    finally:
        shutil.rmtree(args.root, ignore_errors=True)
    name = torch.cuda.get_device_name(0)
    print_table(f"GPU: {name} x {torch.cuda.device_count()}, batch {args.batch}, {args.repeats} passes", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
