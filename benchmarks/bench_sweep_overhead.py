"""Sweep overhead: N short trials through ``midasbench sweep`` against the same trainings in a plain loop.

Both sides are timed as whole processes (start to exit), ``--repeats`` times each, on the same prebuilt
synthetic dataset (tiny sizes, as ``tests/conftest.py``'s ``TINY_SYNTHETIC``; ``--epochs`` per trial, one
thread per trial, seeds 0..N-1):

* **sweep**: ``midasbench sweep`` on a sweep file with a ``train.seed`` grid, ``resources:
  {cpus_per_trial: 1}`` and ``max_concurrent_trials: --parallel``, in a fresh temporary folder each run
  (its own MLflow sqlite store and storage);
* **plain loop**: a Python process whose ``--parallel`` spawned workers each validate and ``train`` their
  share of the same configs (``harness.training.trainer.train``), tracking off (``--plain-tracking`` logs to
  a temporary sqlite store instead), checkpoints in a temporary folder.

Goals (issue 13): sweep / plain ≤ 1.3× for 12 trials of 3 epochs; fixed cost of a local sweep ≤ 3 s over
the plain loop and amortised per-trial overhead < 0.3 s, both from the overhead (sweep − plain medians)
at N and at ``--small`` trials (a straight line through the two points). Also the import time of config
validation alone (``python -X importtime``, the sum of its self times) and which heavy packages it pulls;
goal: none of the model, audio and split libraries (torchvision, scipy, sklearn, transformers); mlflow and
ray are listed for information. Exit status 1 when a goal is missed.

    .venv/bin/python benchmarks/bench_sweep_overhead.py [--trials 12] [--small 1] [--epochs 3]
        [--parallel 2] [--repeats 3] [--plain-tracking] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _bench_support import (
    Row,
    Stat,
    build_data,
    finish,
    median,
    print_table,
    run_command,
    run_sweep_command,
    synthetic_overrides,
)

RATIO_GOAL, FIXED_GOAL, PER_TRIAL_GOAL = 1.3, 3.0, 0.3
HEAVY = ("torchvision", "scipy", "sklearn", "transformers")  # must not be imported by config validation
LISTED = ("torch", "mlflow", "ray", "pandas")  # reported only
VALIDATE = "from midasbench.harness.config import load_config; load_config('synthetic')"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials of the large case (default 12)")
    parser.add_argument(
        "--small", type=int, default=1, help="trials of the small case, for the fixed cost (default 1)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    parser.add_argument("--parallel", type=int, default=2, help="concurrent trials on both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument(
        "--plain-tracking", action="store_true", help="the plain loop logs to a temporary MLflow store"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder under DIR")
    parser.add_argument("--plain-loop", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------- the plain loop side


def _train_share(job: tuple[list[list[str]], str | None]) -> int:
    """One plain-loop worker: validate and train its configs one after the other."""
    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import train

    configs, uri = job
    for overrides in configs:
        tracking = ["tracking.enabled=true", f"tracking.uri={uri}"] if uri else ["tracking.enabled=false"]
        train(load_config("synthetic", [*overrides, *tracking, "tracking.experiment=plain"]))
    return len(configs)


def plain_loop(job_file: Path) -> int:
    """The plain loop's process: the configs of ``job_file`` split over ``parallel`` spawned workers."""
    import multiprocessing

    job = json.loads(job_file.read_text())
    configs, parallel, uri = job["configs"], job["parallel"], job["uri"]
    if uri:
        from midasbench.harness.tracking import ensure_experiment

        ensure_experiment(uri, "plain")  # once, before the workers (concurrent sqlite schema creation)
    shares = [(configs[i::parallel], uri) for i in range(min(parallel, len(configs)))]
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        done = sum(pool.map(_train_share, shares))
    print(f"plain loop: {done} trainings")
    return 0


# ---------------------------------------------------------------------------------------- the bench


def trial_overrides(base: list[str], seed: int, checkpoints: Path) -> list[str]:
    return [*base, f"train.seed={seed}", "train.progress=false", f"train.checkpoint_dir={checkpoints}"]


def time_plain(base: list[str], trials: int, args: argparse.Namespace) -> float:
    work = Path(tempfile.mkdtemp(prefix="bench-plain-", dir=args.keep))
    try:
        uri = f"sqlite:///{work / 'mlflow.db'}" if args.plain_tracking else None
        configs = [trial_overrides(base, s, work / "checkpoints" / f"t{s}") for s in range(trials)]
        job = work / "job.json"
        job.write_text(json.dumps({"configs": configs, "parallel": args.parallel, "uri": uri}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-loop", str(job)]
        return run_command(cmd, cwd=work).seconds
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def time_sweep(base: list[str], trials: int, args: argparse.Namespace) -> float:
    sweep = {
        "base": "synthetic",
        "overrides": base,
        "grid": {"train.seed": list(range(trials))},
        "resources": {"cpus_per_trial": 1},
        "max_concurrent_trials": args.parallel,
    }
    run = run_sweep_command(f"overhead-{trials}", sweep, keep=args.keep)
    finished = [t for t in run.trials if t.epochs]
    if len(finished) != trials:
        raise SystemExit(f"sweep of {trials} trials logged {len(finished)} trials with epochs")
    return run.timed.seconds


def config_imports(repeats: int) -> tuple[Stat, dict[str, float]]:
    """Total import seconds of config validation alone, and the cumulative seconds of each listed
    package it imports (the median over ``repeats`` fresh processes)."""
    totals, found = [], {}
    for _ in range(repeats):
        done = run_command(
            [sys.executable, "-X", "importtime", "-c", VALIDATE], cwd=Path(tempfile.gettempdir())
        )
        total, cumulative = 0, {}
        for line in done.output.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = line[len("import time:") :].split("|")
            total += int(self_us)
            name = name.strip()
            if name in HEAVY + LISTED:
                cumulative[name] = int(cum_us) / 1e6
        totals.append(total / 1e6)
        for name, seconds in cumulative.items():
            found.setdefault(name, []).append(seconds)
    return Stat(totals), {name: median(values) for name, values in found.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plain_loop is not None:
        return plain_loop(args.plain_loop)
    if args.small >= args.trials:
        raise SystemExit("--small must be below --trials")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.keep))
    try:
        base = synthetic_overrides(data, epochs=args.epochs, tiny=True)
        build_data(base)
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.repeats):
            for trials in (args.trials, args.small):  # sides alternate: a noisy moment hits both alike
                for side, fn in (("sweep", time_sweep), ("plain loop", time_plain)):
                    seconds = fn(base, trials, args)
                    times.setdefault((side, trials), []).append(seconds)
                    print(f"run {repeat + 1}/{args.repeats}: {side}, {trials} trials: {seconds:.1f} s")
        imports, packages = config_imports(args.repeats)
    finally:
        if args.keep is None:
            shutil.rmtree(data, ignore_errors=True)

    n, k = args.trials, args.small
    sweep_n, plain_n = Stat(times[("sweep", n)]), Stat(times[("plain loop", n)])
    sweep_k, plain_k = Stat(times[("sweep", k)]), Stat(times[("plain loop", k)])
    ratio = sweep_n.median / plain_n.median
    over_n, over_k = sweep_n.median - plain_n.median, sweep_k.median - plain_k.median
    per_trial = (over_n - over_k) / (n - k)
    fixed = over_k - per_trial * k
    heavy = [p for p in HEAVY if p in packages]
    listed = ", ".join(f"{p} {packages[p]:.2f} s" for p in (*HEAVY, *LISTED) if p in packages) or "none"
    rows = [
        Row(f"sweep, {n} trials", sweep_n),
        Row(f"plain loop, {n} trials", plain_n),
        Row(f"sweep, {k} trial{'s' if k > 1 else ''}", sweep_k),
        Row(f"plain loop, {k} trial{'s' if k > 1 else ''}", plain_k),
        Row(
            f"sweep / plain loop, {n} trials",
            value=f"{ratio:.2f}x",
            goal=f"<= {RATIO_GOAL}x",
            ok=ratio <= RATIO_GOAL,
        ),
        Row(
            "fixed cost over the plain loop",
            value=f"{fixed:.2f} s",
            goal=f"<= {FIXED_GOAL} s",
            ok=fixed <= FIXED_GOAL,
        ),
        Row(
            "amortised overhead per trial",
            value=f"{per_trial:.2f} s",
            goal=f"< {PER_TRIAL_GOAL} s",
            ok=per_trial < PER_TRIAL_GOAL,
        ),
        Row("config validation: import time", imports),
        Row(
            "config validation: heavy imports",
            value=", ".join(heavy) or "none",
            goal="none of " + ", ".join(HEAVY),
            ok=not heavy,
        ),
        Row("config validation: cumulative import of", value=listed),
    ]
    title = (
        f"sweep overhead: {n} (and {k}) trials x {args.epochs} epochs, tiny synthetic, {args.parallel} at a "
        f"time, whole-process seconds over {args.repeats} runs; plain loop tracking "
        f"{'to sqlite' if args.plain_tracking else 'off'}; {os.cpu_count()} CPUs"
    )
    print_table(title, rows)
    return finish(rows)


if __name__ == "__main__":
    sys.exit(main())
