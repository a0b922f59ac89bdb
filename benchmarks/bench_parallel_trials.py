"""Parallel trials: 2 concurrent single-thread trials against 1 at a time, through ``midasbench sweep``.

The same sweep (``--trials`` trials, seeds 0..N-1, of the ``synthetic`` preset's data and model for
``--epochs`` epochs, one thread per trial; ``--tiny``: the tests' tiny sizes) runs with ``resources:
{cpus_per_trial: 1}`` and ``max_concurrent_trials: 2`` (concurrent) and with ``max_concurrent_trials: 1``
(one at a time), each as a whole command in a fresh temporary folder (its own MLflow sqlite store and
storage), ``--repeats`` runs each, alternating. Two speed-ups are reported:

* **steady state**: per-epoch throughput, from the trials' MLflow epoch timestamps: 2 / (median epoch
  interval, concurrent) against 1 / (median epoch interval, one at a time);
* **whole command**: the one-at-a-time command's seconds over the concurrent one's (medians).

Goals (issue 13), on 2 cores: ≥ 1.7× in steady state and ≥ 1.5× for the whole command. Exit status 1 when
a goal is missed.

    .venv/bin/python benchmarks/bench_parallel_trials.py [--trials 4] [--epochs 8] [--repeats 3] [--tiny]
        [--keep DIR]
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
    build_data,
    finish,
    median,
    print_table,
    run_sweep_command,
    synthetic_overrides,
)

STEADY_GOAL, COMMAND_GOAL = 1.7, 1.5
CONCURRENT = 2
SIDES = {"2 concurrent": CONCURRENT, "1 at a time": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials of the sweep (default 4)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny data and encoders")
    parser.add_argument("--keep", type=Path, default=None, help="keep every run's folder under DIR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trials < CONCURRENT or args.epochs < 2:
        raise SystemExit(f"give at least {CONCURRENT} trials of at least 2 epochs")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.keep))
    commands: dict[str, list[float]] = {side: [] for side in SIDES}
    epochs: dict[str, list[float]] = {side: [] for side in SIDES}
    try:
        base = synthetic_overrides(data, epochs=args.epochs, tiny=args.tiny)
        build_data(base)
        for repeat in range(args.repeats):
            for side, concurrent in SIDES.items():
                sweep = {
                    "base": "synthetic",
                    "overrides": base,
                    "grid": {"train.seed": list(range(args.trials))},
                    "resources": {"cpus_per_trial": 1},
                    "max_concurrent_trials": concurrent,
                }
                run = run_sweep_command(f"parallel-{concurrent}", sweep, keep=args.keep)
                if len(run.trials) != args.trials or any(len(t.epochs) != args.epochs for t in run.trials):
                    raise SystemExit(f"{side}: expected {args.trials} trials of {args.epochs} epochs")
                interval = median([i for t in run.trials for i in t.intervals])
                commands[side].append(run.timed.seconds)
                epochs[side].append(interval)
                print(
                    f"run {repeat + 1}/{args.repeats}: {side}: command {run.timed.seconds:.1f} s, "
                    f"epoch {interval:.3f} s"
                )
    finally:
        if args.keep is None:
            shutil.rmtree(data, ignore_errors=True)

    together, alone = "2 concurrent", "1 at a time"
    steady = CONCURRENT * median(epochs[alone]) / median(epochs[together])
    whole = median(commands[alone]) / median(commands[together])
    rows = [Row(f"whole command, {side}", Stat(commands[side])) for side in SIDES]
    rows += [Row(f"epoch of one trial, {side}", Stat(epochs[side])) for side in SIDES]
    rows += [
        Row(
            "steady-state speed-up (epochs/s)",
            value=f"{steady:.2f}x",
            goal=f">= {STEADY_GOAL}x",
            ok=steady >= STEADY_GOAL,
        ),
        Row(
            "whole-command speed-up",
            value=f"{whole:.2f}x",
            goal=f">= {COMMAND_GOAL}x",
            ok=whole >= COMMAND_GOAL,
        ),
    ]
    title = (
        f"parallel trials: {args.trials} single-thread trials x {args.epochs} epochs "
        f"({'tiny' if args.tiny else 'preset'} synthetic), {CONCURRENT} concurrent vs 1 at a time, "
        f"{args.repeats} runs; {os.cpu_count()} CPUs"
    )
    print_table(title, rows)
    return finish(rows)


if __name__ == "__main__":
    sys.exit(main())
