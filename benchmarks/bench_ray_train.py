"""Ray Train path: start-up before the first step and per-epoch cost of a ``workers: 2`` trial against the
same trial single-worker, each as a one-trial ``midasbench sweep`` (whole command, fresh temporary folder
with its own MLflow sqlite store and storage, ``--repeats`` runs each, the two alternating).

The ``workers: 2`` trial is Ray Train DDP on CPU (gloo, ``cpus_per_worker: 1``); the single-worker one
trains inside its Tune trial process (``cpus_per_trial: 1``). Both train the ``synthetic`` preset's data and
model (``--tiny``: the tests' tiny sizes) for ``--epochs`` epochs, one thread per rank. The split is read
from the trial's MLflow run, whose clock is the benchmark's own:

* **start-up**: from the command's start to the creation of the trial's MLflow run (rank 0, once its
  ``TrainingRun`` is built, just before epoch 0's first step);
* **epoch**: the median interval between consecutive epochs' metric timestamps (train, validate,
  checkpoint, per-epoch report);
* **teardown**: from the end of the trial's run to the command's exit;
* **report**: the seconds spent inside each per-epoch ``ray.train.report`` (rank 0) or ``tune.report``
  (single-worker) call, timed in the trial's processes by a probe that wraps those functions (a generated
  ``sitecustomize.py`` on ``PYTHONPATH``; see ``_bench_support.install_report_probe``). The final report
  (after the test evaluation) is left out.

Goals (issue 13): start-up of ``workers: 2`` ≤ 10 s over single-worker; rank 0's per-epoch report ≤ 5 % of
an epoch of the ``workers: 2`` trial (no blocking wait on a health-check tick). Exit status 1 when missed.

    .venv/bin/python benchmarks/bench_ray_train.py [--epochs 6] [--repeats 3] [--tiny] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _bench_support import (
    Row,
    Stat,
    SweepRun,
    build_data,
    finish,
    median,
    print_table,
    run_sweep_command,
    synthetic_overrides,
)

STARTUP_GOAL, REPORT_GOAL = 10.0, 0.05
SIDES = {
    "single-worker": {"cpus_per_trial": 1},
    "workers: 2": {"workers": 2, "cpus_per_worker": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the trial (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny data and encoders")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder under DIR")
    return parser.parse_args(argv)


def split_times(run: SweepRun, side: str) -> dict[str, float]:
    """Start-up, median epoch, teardown, whole command, and rank 0's median per-epoch report."""
    if len(run.trials) != 1 or len(run.trials[0].epochs) < 2:
        raise SystemExit(f"{side}: expected one trial with at least 2 epochs, got {run.trials}")
    trial = run.trials[0]
    kind = "train.report" if side == "workers: 2" else "tune.report"
    reports = [
        r["seconds"] for r in run.reports if r["kind"] == kind and not r["final"] and r["rank"] in (0, None)
    ]
    if not reports:
        raise SystemExit(f"{side}: the report probe recorded no {kind} call (is PYTHONPATH passed to Ray?)")
    return {
        "command": run.timed.seconds,
        "startup": trial.start - run.timed.start,
        "epoch": median(trial.intervals),
        "teardown": run.timed.end - trial.end,
        "report": median(reports),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.epochs < 3:
        raise SystemExit("--epochs must be at least 3 (per-epoch reports are all but the last)")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.keep))
    results: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    try:
        base = synthetic_overrides(data, epochs=args.epochs, tiny=args.tiny)
        build_data(base)
        for repeat in range(args.repeats):
            for side, resources in SIDES.items():
                sweep = {"base": "synthetic", "overrides": base, "resources": resources}
                times = split_times(run_sweep_command("ray-train", sweep, probe=True, keep=args.keep), side)
                for key, value in times.items():
                    results[side].setdefault(key, []).append(value)
                print(
                    f"run {repeat + 1}/{args.repeats}: {side}: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
                )
    finally:
        if args.keep is None:
            shutil.rmtree(data, ignore_errors=True)

    one, two = results["single-worker"], results["workers: 2"]
    rows = []
    for key, label in (
        ("command", "whole command"),
        ("startup", "start-up before the first step"),
        ("epoch", "epoch"),
        ("report", "per-epoch report (rank 0)"),
        ("teardown", "teardown after the run"),
    ):
        for side in SIDES:
            rows.append(Row(f"{label}, {side}", Stat(results[side][key])))
    extra = median(two["startup"]) - median(one["startup"])
    share = median(two["report"]) / median(two["epoch"])
    share_one = median(one["report"]) / median(one["epoch"])
    rows += [
        Row(
            "start-up overhead of workers: 2",
            value=f"{extra:.2f} s",
            goal=f"<= {STARTUP_GOAL:.0f} s",
            ok=extra <= STARTUP_GOAL,
        ),
        Row(
            "per-epoch report / epoch, workers: 2",
            value=f"{share:.1%}",
            goal=f"<= {REPORT_GOAL:.0%}",
            ok=share <= REPORT_GOAL,
        ),
        Row("per-epoch report / epoch, single-worker", value=f"{share_one:.1%}"),
    ]
    interval = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2 (init_ray's default)")
    title = (
        f"Ray Train workers: 2 vs single-worker, one trial of {args.epochs} epochs "
        f"({'tiny' if args.tiny else 'preset'} synthetic), {args.repeats} runs; "
        f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={interval}; {os.cpu_count()} CPUs"
    )
    print_table(title, rows)
    return finish(rows)


if __name__ == "__main__":
    sys.exit(main())
