"""The cost of MIDAS: step time and peak memory of ``joint`` and ``midas`` (feature, input level), issue 13.

For each model a real ``TrainingRun`` is built per method (the trainer's model, method and optimisers) and
``TrainingRun._step`` (forward, backward, optimiser step, the method's hooks) is timed on batches already
on the device, cycled from a few fed through the run's own feed. Methods: ``joint``, ``midas`` with
``{level: feature, warmup_epochs: 0}`` and ``midas`` with ``{level: input, warmup_epochs: 0}`` (misaligned
inputs re-encoded, the paper's Table 8 comparison). Models:

* **resnet18**: ResNet-18 encoders on CREMA-D-shaped inputs scaled to a CPU (fp16 log-mels (128, 64),
  uint8 clips (3, 2, 64, 64), 6 classes, a dataset of a few hundred rows written to a temporary folder);
* **mlp heads**: the ``synthetic`` preset as is (MLP encoders 256/16 → 128 → 128, concat head, 10
  classes), the small heads of a head-only sweep on frozen features.

Time: after ``--warmup`` untimed steps per run, ``--repeats`` passes of ``--steps`` steps each; the
methods take turns pass by pass so that a noisy moment hits all alike; ms/step is a pass's time over its
steps, reported as median (min, max) over the passes. On CUDA each pass ends with a synchronize.
Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed passes, above what was allocated
before them. On CPU a child process (this script, ``--memory-child``) builds the same runs and, after the
warm-up, takes ``--memory-steps`` steps per run twice: "peak MB" is the peak of the tensor memory
allocated during the steps and not yet freed, from the allocation events of
``torch.profiler(profile_memory=True)`` (exact, whatever the allocator caches; frees of blocks older than
the steps are not seen, so the previous step's gradients count as if still held); "peak RSS MB" is the
growth of the process's anonymous RSS, sampled every millisecond in a thread as ``tests/memory_probe.py``
does. The child starts with glibc told to hand freed blocks back at once (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``): with its default, adaptive threshold the blocks freed by the warm-up stay
in the heap and later steps hardly grow the RSS whatever they allocate, and set at run time
(``mallopt``) it did not take on the heap already built. The timing process keeps the default
allocator, which the fixed threshold would slow down (fresh pages at every step). The RSS figure also
counts what is not a tensor (oneDNN scratch pads, Python objects) and sees the previous step's gradients
freed, but misses peaks shorter than the sampling period; on the small heads it is below what RSS
resolves.

Goals (the script exits 1 when one is missed): feature-level MIDAS ≤ 1.10× joint on ResNet-18 and
≤ 1.5× on the small heads; input level ≥ 1.4× feature level on ResNet-18 (Table 8's claim; on the small
heads the ratio is shown for information).

``--profile`` instead runs ``torch.profiler`` over a few feature-level MIDAS steps on the small heads
(and joint's, for reference), prints the top 15 ops by self CPU time, and counts the host-device syncs
it can identify per step: ``aten::_local_scalar_dense`` (``.item()``, ``int()``, ``float()``, ``bool()``
of a tensor), ``aten::nonzero`` (boolean-mask indexing, whose output size the host must read), device to
host copies and, on CUDA, ``cudaStreamSynchronize``/``cudaDeviceSynchronize`` calls; with the source
lines that issue them.

    .venv/bin/python benchmarks/bench_midas_cost.py [--device cpu|cuda] [--threads 1] [--steps N]
        [--repeats 5] [--warmup 3] [--batch N] [--models resnet18,mlp] [--memory-steps 2] [--tmp DIR]
    .venv/bin/python benchmarks/bench_midas_cost.py --profile [--device cpu|cuda] [--profile-steps 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from midasbench.datasets.format import SplitArrays, write_dataset
from midasbench.harness.config import load_config
from midasbench.harness.training.trainer import TrainingRun

FEATURE_GOAL = {"resnet18": 1.10, "mlp": 1.5}  # feature-level MIDAS / joint, at most
INPUT_GOAL = 1.4  # input level / feature level, at least (ResNet-18)
BATCHES_KEPT = 8  # device batches cycled through by the timed steps


@dataclass(frozen=True)
class Model:
    key: str
    title: str
    batch: int
    steps: int
    overrides: tuple[str, ...] = ()
    modalities: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # written dataset
    rows: int = 0
    floor: bool = False  # also time ``floor_step``, the least a MIDAS step computes on these heads

    def methods(self) -> list[str]:
        return [m for m in METHODS if m != FLOOR or self.floor]


MODELS = {
    "resnet18": Model(
        "resnet18",
        "resnet18, fbank (128, 64) + frames (3, 2, 64, 64)",
        batch=16,
        steps=3,
        overrides=("model.default_encoder={name: resnet18}",),
        modalities={"audio": ((128, 64), "float16"), "visual": ((3, 2, 64, 64), "uint8")},
        rows=256,
    ),
    "mlp": Model("mlp", "mlp heads, synthetic preset (256 + 16 dims)", batch=64, steps=40, floor=True),
}

METHODS = {
    "joint": "method={name: joint}",
    "midas feature": "method={name: midas, params: {level: feature, warmup_epochs: 0}}",
    "midas input": "method={name: midas, params: {level: input, warmup_epochs: 0}}",
    # not a method: the least any MIDAS step computes, on the feature-level run's model (see floor_step)
    "midas floor": "method={name: midas, params: {level: feature, warmup_epochs: 0}}",
}
FLOOR = "midas floor"


# ----------------------------------------------------------------------------------------------- set-up
def write_clips(model: Model, root: Path) -> Path:
    """A CREMA-D-shaped dataset (6 classes) of random values, written in the canonical format."""
    rng = np.random.default_rng(0)

    def split(n: int, prefix: str) -> SplitArrays:
        values = {}
        for name, (shape, dtype) in model.modalities.items():
            if dtype == "uint8":
                values[name] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
            else:
                values[name] = rng.standard_normal((n, *shape)).astype(dtype)
        return SplitArrays(ids=[f"{prefix}{i}" for i in range(n)], labels=np.arange(n) % 6, modalities=values)

    path = root / f"data-{model.key}"
    if (path / "manifest.json").is_file():  # written already (one dataset serves every case of a model)
        return path
    write_dataset(
        path,
        name="bench",
        version="1",
        classes=[str(c) for c in range(6)],
        splits={"train": split(model.rows, "t"), "val": split(32, "v"), "test": split(32, "s")},
        split_protocol="official",
        split_seed=None,
    )
    return path


def build_run(
    model: Model, method: str, data: list[str], batch: int, args: argparse.Namespace
) -> TrainingRun:
    cfg = load_config(
        "synthetic",
        [
            *data,
            f"train.batch_size={batch}",
            f"train.device={args.device}",
            f"train.num_threads={args.threads}",
            "train.progress=false",
            f"train.checkpoint_dir={args.root / 'ckpt'}",
            "tracking.enabled=false",
            *model.overrides,
            METHODS[method],
        ],
    )
    return TrainingRun(cfg)


def device_batches(run: TrainingRun) -> list[Any]:
    plan = run.method.epoch_plan(0, run.loader.default_plan())
    batches = []
    for batch in run.feed.batches(run.loader.plan_batches(plan), epoch=0):
        batches.append(batch)
        if len(batches) == BATCHES_KEPT:
            break
    return batches


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Case:
    """One (model, method): its run, its batches, and what was measured."""

    model: Model
    method: str
    run: TrainingRun
    batches: list[Any]
    cursor: int = 0
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = 0.0  # CUDA: max_memory_allocated; CPU: the profiler's allocation events
    rss_mb: float | None = None  # CPU: peak growth of the anonymous RSS

    def steps(self, n: int) -> None:
        for _ in range(n):
            batch = self.batches[self.cursor % len(self.batches)]
            floor_step(self.run, batch) if self.method == FLOOR else self.run._step(batch, 0)
            self.cursor += 1


def floor_step(run: TrainingRun, batch: Any) -> None:
    """The computation no implementation of feature-level MIDAS can avoid, and nothing else: the unimodal
    heads and their loss, one pass of the fusion head over the aligned batch and both misaligned batches
    of a random permutation, a cross-entropy over them, backward and the optimiser step. No soft labels,
    no α, no hard-sample weights, no statistics: what MIDAS costs beyond this is its bookkeeping."""
    model, labels = run.model, batch.labels
    names = model.modalities
    features = model.encode(batch.inputs)
    unimodal = model.unimodal(features)
    loss_uni = sum(torch.nn.functional.cross_entropy(unimodal[m], labels) for m in names) / len(names)
    anchor, partner = torch.arange(labels.numel(), device=labels.device), torch.randperm(labels.numel())
    rows = {names[0]: torch.cat([anchor, anchor, partner]), names[1]: torch.cat([anchor, partner, anchor])}
    fused = model.fuse({m: features[m][rows[m]] for m in names})
    loss = loss_uni + torch.nn.functional.cross_entropy(fused, labels.repeat(3))
    run.optimizers.zero_grad()
    loss.backward()
    run.optimizers.step()


def build_cases(model: Model, args: argparse.Namespace, methods: list[str]) -> list[Case]:
    if model.modalities:
        data = [f"data.path={write_clips(model, args.root)}", "data.split=official"]
    else:  # the synthetic preset's own dataset, built once under the temporary folder
        data = [f"data.root={args.root / 'data'}"]
    batch = args.batch or model.batch
    cases = []
    for method in methods:
        run = build_run(model, method, data, batch, args)
        run.model.train()
        run.method.on_epoch_start(run.model, 0)
        cases.append(Case(model, method, run, device_batches(run)))
    return cases


# -------------------------------------------------------------------------------------------- measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def cpu_peak_mb(fn: Callable[[], None]) -> float:
    """Growth of the process's anonymous RSS (``RssAnon``: heap and anonymous maps, not the page cache of
    memory-mapped files) while ``fn`` runs, in MB, sampled every millisecond in a thread as
    ``tests/memory_probe.py`` does (``VmHWM`` after a ``clear_refs`` reset gave inconsistent figures from
    one identical step to the next in a trial)."""
    gc.collect()
    start = _status_kb("RssAnon")
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb("RssAnon"))
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (max(peak[0], _status_kb("RssAnon")) - start) / 1024


def measure(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm-up, then the timed passes, the cases taking turns pass by pass."""
    for case in cases:
        case.steps(args.warmup)
    sync(args.device)
    for _ in range(args.repeats):
        for case in cases:
            steps = args.steps or case.model.steps
            gc.collect()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            case.steps(steps)
            sync(args.device)
            case.times_ms.append((time.perf_counter() - start) * 1000 / steps)
            if args.device == "cuda":
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                case.peak_mb = max(case.peak_mb or 0.0, peak)


def tensor_peak_mb(fn: Callable[[], None]) -> float | None:
    """Peak of the tensor memory allocated while ``fn`` runs and not yet freed, in MB, from the allocation
    events ``torch.profiler`` records (``profile_memory``); None where this torch build does not expose
    them (``experimental_event_tree`` is a private API)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocations: list[tuple[int, int]] = []
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            if node.tag == _EventType.Allocation:
                allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
            pending.extend(node.children)
    except (AttributeError, ImportError, RuntimeError):
        return None
    allocations.sort()
    total = peak = 0
    for _, size in allocations:  # frees are negative sizes; frees of older blocks are not recorded
        total += size
        peak = max(peak, total)
    return peak / 2**20


GLIBC_RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory_child(args: argparse.Namespace) -> int:
    """The child's side: per case, warm-up, then the RSS and the tensor peak of ``--memory-steps``
    steps; one JSON line per case on stdout."""
    for key in args.models.split(","):
        for case in build_cases(MODELS[key], args, MODELS[key].methods()):
            case.steps(args.warmup)
            rss = cpu_peak_mb(lambda case=case: case.steps(args.memory_steps))
            tensors = tensor_peak_mb(lambda case=case: case.steps(args.memory_steps))
            print(json.dumps({"model": key, "method": case.method, "rss_mb": rss, "tensor_mb": tensors}))
    return 0


def measure_cpu_memory(cases: list[Case], args: argparse.Namespace) -> None:
    """Run the memory child on the same models and settings; fill each case's figures."""
    command = [sys.executable, __file__, "--memory-child", "--models", args.models]
    command += ["--threads", str(args.threads), "--warmup", str(max(args.warmup, 1))]
    command += ["--memory-steps", str(args.memory_steps)]
    if args.batch:
        command += ["--batch", str(args.batch)]
    if args.tmp is not None:
        command += ["--tmp", str(args.tmp)]
    env = {**os.environ, **GLIBC_RETURN_FREED}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    figures = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            figures[row["model"], row["method"]] = row
    for case in cases:
        row = figures.get((case.model.key, case.method), {})
        case.peak_mb, case.rss_mb = row.get("tensor_mb"), row.get("rss_mb")


# --------------------------------------------------------------------------------------------- the table
def median(case: Case) -> float:
    return statistics.median(case.times_ms)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def print_table(cases: list[Case], args: argparse.Namespace, memory_note: str) -> bool:
    title = (
        f"cost of MIDAS per training step ({args.device}, {torch.get_num_threads()} threads, "
        f"{args.repeats} passes; peak memory: {memory_note})"
    )
    table = Table(title=title)
    header = ["model", "method", "batch", "ms/step median (min, max)", "peak MB"]
    if args.device == "cpu":
        header.append("peak RSS MB")
    header += ["x joint", "x feature", "goal"]
    for column in header:
        table.add_column(column, justify="left" if column in ("model", "method", "goal") else "right")
    ok = True
    by_key = {(c.model.key, c.method): c for c in cases}
    for case in cases:
        key = case.model.key
        joint, feature = by_key.get((key, "joint")), by_key.get((key, "midas feature"))
        vs_joint = median(case) / median(joint) if joint else None
        vs_feature = median(case) / median(feature) if feature and case.method == "midas input" else None
        goal = ""
        if case.method == "midas feature" and vs_joint is not None:
            met = vs_joint <= FEATURE_GOAL[key]
            ok &= met
            goal = f"<= {FEATURE_GOAL[key]:.2f}x joint " + ("ok" if met else "MISSED")
        elif case.method == "midas input" and vs_feature is not None:
            if key == "resnet18":
                met = vs_feature >= INPUT_GOAL
                ok &= met
                goal = f">= {INPUT_GOAL}x feature " + ("ok" if met else "MISSED")
            else:
                goal = "(for information)"
        elif case.method == FLOOR:
            goal = "(reference: no soft labels, α, weights)"
        times = case.times_ms
        row = [
            case.model.title if case.method == "joint" else "",
            case.method,
            str(len(case.batches[0])),
            f"{median(case):,.1f} ({min(times):,.1f}, {max(times):,.1f})",
            _mb(case.peak_mb),
        ]
        if args.device == "cpu":
            row.append(_mb(case.rss_mb))
        table.add_row(
            *row,
            f"{vs_joint:.2f}x" if vs_joint is not None else "",
            f"{vs_feature:.2f}x" if vs_feature is not None else "",
            goal,
        )
    Console(width=170).print(table)
    return ok


# ---------------------------------------------------------------------------------------------- profile
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
DEVICE_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


def _frames(event: Any) -> tuple[str, str]:
    """Where an op was called from: the innermost Python frame of the project above it in the profiler's
    tree (its function and the line that function starts at, e.g. ``methods/midas.py(532): training_step``)
    and the outermost op below that frame (the one the project's code called)."""
    op, parent = event.name, event.cpu_parent
    while parent is not None:
        name = parent.name
        if ".py(" in name:
            if any(part in name for part in ("methods/", "harness/", "datasets/")):
                for anchor in ("midasbench/", "/work/main/"):
                    name = name.split(anchor, 1)[-1]
                return name, op
        elif name.startswith("aten::") or name.startswith("autograd::"):
            op = name
        parent = parent.cpu_parent
    return "?", op


def _source(event: Any) -> str:
    return " · ".join(_frames(event))


def _cpu_by_function(events: list[Any]) -> list[tuple[str, int, float]]:
    """(project function, aten ops, self CPU ms) over ``events``, most CPU first."""
    ops: Counter[str] = Counter()
    cpu_us: Counter[str] = Counter()
    for e in events:
        if e.name.startswith("aten::"):
            function = _frames(e)[0]
            ops[function] += 1
            cpu_us[function] += e.self_cpu_time_total
    return [(f, ops[f], cpu_us[f] / 1000) for f, _ in cpu_us.most_common()]


def _d2h_copies(events: list[Any]) -> int:
    """Device to host copies, from the profiler's memcpy activities (CUDA only)."""
    return sum(1 for e in events if "memcpy dtoh" in e.name.lower())


def profile(args: argparse.Namespace) -> int:
    """Profile joint and feature-level MIDAS on the mlp heads; print the top ops and the syncs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = MODELS["mlp"]
    cases = build_cases(model, args, ["joint", "midas feature"])
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = args.profile_steps
    console = Console(width=170)
    summary = Table(
        title=f"host-device syncs per step, {model.title} ({args.device}, {steps} profiled steps; "
        "on cpu: the ops that sync on a GPU)"
    )
    header = (
        "method",
        "_local_scalar_dense",
        "nonzero",
        "DtoH copies",
        "cuda*Synchronize",
        "aten ops",
        "ms/step",
    )
    for column in header:
        summary.add_column(column, justify="left" if column == "method" else "right")
    sites: dict[str, Counter[str]] = {}
    for case in cases:
        case.steps(args.warmup)
        sync(args.device)
        with torch_profile(activities=activities, with_stack=True) as prof:
            start = time.perf_counter()
            case.steps(steps)
            sync(args.device)
            elapsed = (time.perf_counter() - start) * 1000 / steps
        events = list(prof.events())
        counts = Counter(e.name for e in events)
        sites[case.method] = Counter(_source(e) for e in events if e.name in SYNC_OPS)
        if cuda:  # the real waits, the blocking device-to-host copies (``.cpu()``) among them
            sites[f"{case.method}, cuda*Synchronize"] = Counter(
                _source(e) for e in events if e.name in DEVICE_SYNC_CALLS
            )
        if case.method == "midas feature":
            console.print(f"[bold]top 15 ops by self CPU time, midas feature level, {steps} steps[/bold]")
            console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            where = Table(
                title="midas feature level: aten ops and their self CPU time by project function, per step"
            )
            for column in ("innermost project function (its first line)", "aten ops", "self CPU ms"):
                where.add_column(column, justify="left" if column.startswith("innermost") else "right")
            for function, n, ms in _cpu_by_function(events)[:12]:
                where.add_row(function, f"{n / steps:.0f}", f"{ms / steps:.2f}")
            console.print(where)
        summary.add_row(
            case.method,
            f"{counts['aten::_local_scalar_dense'] / steps:.1f}",
            f"{counts['aten::nonzero'] / steps:.1f}",
            f"{_d2h_copies(events) / steps:.1f}" if cuda else "n/a on cpu",
            f"{sum(counts[c] for c in DEVICE_SYNC_CALLS) / steps:.1f}" if cuda else "n/a on cpu",
            f"{sum(n for name, n in counts.items() if name.startswith('aten::')) / steps:.0f}",
            f"{elapsed:.2f} (profiled)",
        )
    console.print(summary)
    for method, site in sites.items():
        if not site:
            continue
        lines = Table(title=f"where the syncs of '{method}' come from, per step")
        lines.add_column("innermost project function (its first line) · op")
        lines.add_column("calls / step", justify="right")
        for location, n in site.most_common():
            lines.add_row(location, f"{n / steps:.1f}")
        console.print(lines)
    return 0


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per pass (default: resnet18 3, mlp heads 40)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per case (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case first (default 3)")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size (default: resnet18 16, mlp heads 64, the preset's)",
    )
    parser.add_argument(
        "--models", default="resnet18,mlp", help="comma-separated subset of: " + ", ".join(MODELS)
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="CPU: steps of the memory pass (default 2)"
    )
    parser.add_argument(
        "--tmp", type=Path, default=None, help="folder for the datasets (default: system temp)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile MIDAS on the mlp heads instead of the benchmark"
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under the profiler (default 10)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    args.root = Path(tempfile.mkdtemp(prefix="midasbench-midas-cost-", dir=args.tmp))
    try:
        if args.profile:
            return profile(args)
        if args.memory_child:
            return memory_child(args)
        cases: list[Case] = []
        for key in args.models.split(","):
            model_cases = build_cases(MODELS[key], args, MODELS[key].methods())
            measure(model_cases, args)
            cases += model_cases
        if args.device == "cpu":
            measure_cpu_memory(cases, args)
            note = f"tensors and RSS growth over {args.memory_steps} steps, in a child process"
        else:
            note = "max_memory_allocated over the timed steps"
        ok = print_table(cases, args, note)
    finally:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
