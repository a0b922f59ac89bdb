"""Shared helpers of the sweep benchmarks (``bench_sweep_overhead.py``, ``bench_ray_train.py``,
``bench_parallel_trials.py``): tiny synthetic overrides, a prebuilt dataset, sweep files, whole-command
timing of ``midasbench sweep`` in a fresh temporary folder (its own MLflow sqlite store and storage), the
per-trial epoch timestamps read back from that store, an optional probe that times every
``ray.train.report`` / ``ray.tune.report`` call inside Ray's worker processes, and the result table.

Only the standard library is imported at the top: the probe imports this module in every Python process
that Ray starts (through a generated ``sitecustomize.py`` on ``PYTHONPATH``), so it must cost nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BIN = Path(sys.executable).parent
MIDASBENCH = str(BIN / "midasbench") if (BIN / "midasbench").is_file() else "midasbench"
PROBE_ENV = "MIDASBENCH_BENCH_REPORT_PROBE"

# The same tiny synthetic dataset as tests/conftest.py (a run takes about a second on one core).
TINY_SYNTHETIC: dict[str, Any] = {
    "num_classes": 4,
    "train_size": 240,
    "val_size": 80,
    "test_size": 160,
    "modalities": [
        {"name": "strong", "dim": 24, "separation": 5.0, "drop": 0.25},
        {"name": "weak", "dim": 8, "separation": 2.5, "flip": 0.1, "nonlinear": True},
    ],
}


def synthetic_overrides(data_root: Path, *, epochs: int, tiny: bool) -> list[str]:
    """Overrides of the ``synthetic`` preset shared by the sweep and the plain-loop side: the data root,
    the epochs, one thread per trial and, with ``tiny``, the tests' tiny data and encoders."""
    out = [f"data.root={data_root}", f"train.epochs={epochs}", "train.num_threads=1"]
    if tiny:
        out += [
            f"data.options={json.dumps(TINY_SYNTHETIC)}",
            "model.default_encoder.params={hidden: [32], out_dim: 16}",
            "train.batch_size=32",
        ]
    return out


def build_data(overrides: list[str]) -> None:
    """Build the run's synthetic dataset once, before anything is timed (every timed side reuses it)."""
    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import dataset_path

    dataset_path(load_config("synthetic", [*overrides, "tracking.enabled=false"]))


def write_sweep(path: Path, **fields: Any) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- timing


@dataclass
class Timed:
    seconds: float
    start: float  # time.time() just before the process started
    end: float
    output: str


def run_command(argv: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None) -> Timed:
    """Run a whole command, timed from before its process starts to after it exited; fail loudly."""
    start_wall, start = time.time(), time.perf_counter()
    done = subprocess.run(
        list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-40:])
        raise SystemExit(f"command failed (exit {done.returncode}): {' '.join(argv)}\n{tail}")
    return Timed(seconds, start_wall, start_wall + seconds, done.stdout)


@dataclass
class TrialTimes:
    """One child run of a sweep, from its MLflow record (epoch seconds, same clock as ``time.time``)."""

    name: str
    start: float  # the run's creation: TrainingRun built, tracking started, epoch 0 about to begin
    end: float
    epochs: list[float]  # when each epoch's metrics were logged (after its validation)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.epochs, self.epochs[1:], strict=False)]


def trial_times(uri: str, experiment: str, metric: str = "train/loss") -> list[TrialTimes]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in {uri}")
    out = []
    for run in client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId != ''", max_results=10000):
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        out.append(
            TrialTimes(
                name=run.info.run_name,
                start=run.info.start_time / 1e3,
                end=(run.info.end_time or run.info.start_time) / 1e3,
                epochs=[m.timestamp / 1e3 for m in history],
                tags=dict(run.data.tags),
            )
        )
    return sorted(out, key=lambda t: t.start)


@dataclass
class SweepRun:
    timed: Timed
    trials: list[TrialTimes]
    reports: list[dict[str, Any]]  # the probe's records, when it was on


def run_sweep_command(
    name: str, sweep: dict[str, Any], *, probe: bool = False, keep: Path | None = None
) -> SweepRun:
    """``midasbench sweep`` as a user runs it, in a fresh temporary folder holding the sweep file, its
    storage and its MLflow sqlite store; returns the whole-command time and the trials' MLflow times."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=keep))
    try:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        path = write_sweep(work / "sweep.yaml", name=name, storage=str(work / "storage"), **sweep)
        env = dict(os.environ)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        probe_file = work / "reports.jsonl"
        if probe:
            site = work / "probe"
            site.mkdir()
            (site / "sitecustomize.py").write_text(
                f"import sys\nsys.path.insert(0, {str(BENCH_DIR)!r})\n"
                "import _bench_support\n_bench_support.install_report_probe()\n"
            )
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
            env[PROBE_ENV] = str(probe_file)
        timed = run_command([MIDASBENCH, "sweep", str(path), "--tracking-uri", uri], cwd=work, env=env)
        trials = trial_times(uri, name)
        reports = []
        if probe_file.is_file():
            reports = [json.loads(line) for line in probe_file.read_text().splitlines() if line.strip()]
        return SweepRun(timed, trials, reports)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


# ------------------------------------------------------------------------------------ report probe


def install_report_probe() -> None:
    """In a process started with ``$MIDASBENCH_BENCH_REPORT_PROBE`` set: once ``ray.train`` or
    ``ray.tune`` is imported, time each call of its ``report`` (what ``harness/sweeps/sweep.py`` calls
    after every epoch) and append one JSON line per call to that file."""
    out = os.environ.get(PROBE_ENV)
    if not out:
        return
    import importlib.abc

    def timed(kind: str, report: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(metrics: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            rank = None
            if kind == "train.report":
                import ray.train

                rank = ray.train.get_context().get_world_rank()
            start = time.time()
            try:
                return report(metrics, *args, **kwargs)
            finally:
                record = {
                    "kind": kind,
                    "pid": os.getpid(),
                    "rank": rank,
                    "epoch": metrics.get("epoch"),
                    "final": any(str(k).startswith("test/") for k in metrics),
                    "start": start,
                    "seconds": time.time() - start,
                }
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")

        return wrapper

    patches = {"ray.train": "train.report", "ray.tune": "tune.report"}

    class PatchAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name not in patches:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            exec_module = loader.exec_module

            def exec_and_patch(module: Any) -> None:
                exec_module(module)
                module.report = timed(patches[name], module.report)

            loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, PatchAfterImport())


# ------------------------------------------------------------------------------------------- table


@dataclass
class Stat:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """A table line: a measured quantity (``stat``, repeated runs) or a derived one (``value``), with
    its goal and whether the goal is met (None: no goal)."""

    label: str
    stat: Stat | None = None
    value: str | None = None
    goal: str = ""
    ok: bool | None = None
    unit: str = "s"


def print_table(title: str, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(("measure", "median", "min", "max", "goal", "")):
        table.add_column(column, justify="left" if i in (0, 4) else "right")
    for r in rows:
        if r.stat is not None:
            cells = [f"{v:.2f} {r.unit}".strip() for v in (r.stat.median, r.stat.low, r.stat.high)]
        else:
            cells = [r.value or "", "", ""]
        verdict = "" if r.ok is None else ("ok" if r.ok else "MISSED")
        table.add_row(r.label, *cells, r.goal, verdict)
    Console(width=160).print(table)


def finish(rows: list[Row]) -> int:
    missed = [r.label for r in rows if r.ok is False]
    if missed:
        print(f"FAIL: goal missed: {'; '.join(missed)}", file=sys.stderr)
        return 1
    print("OK: every goal met")
    return 0
