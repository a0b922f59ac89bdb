"""``midasbench demo``: the main job on embedded defaults, small enough for a 2-core laptop.

A real sweep (``harness/sweeps/sweep.py``) on a local Ray instance: Joint training, MIDAS and one unimodal
baseline per modality, over several init seeds, on an offline dataset; one MLflow child run per trial under
one parent, in the working directory's ``mlflow.db``. Single-worker trials run inside their Ray Tune trial
processes; a final check trains one trial with two DDP workers through Ray Train, so both execution paths
run. The tables are read back from MLflow.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midasbench.harness.config import load_config
from midasbench.harness.sweeps.sweep import SweepSpec, expand, run_sweep
from midasbench.harness.tracking import resolve_tracking_uri
from midasbench.harness.training.trainer import dataset_path

DEMO_METHODS = ("joint", "midas")


@dataclass
class DemoResult:
    experiment: str
    tracking_uri: str
    parent_run_id: str
    table: str
    runs: int
    seconds: float
    ddp_check: str | None = None
    report: Path | None = None
    figures: int = 0


def demo_spec(
    preset: str, modalities: list[str], seeds: int, experiment: str, overrides: list[str], name: str
) -> SweepSpec:
    """Joint training, MIDAS and one unimodal baseline per modality, for every seed."""
    methods: list[dict[str, Any]] = [{"name": m} for m in DEMO_METHODS]
    methods += [{"name": "unimodal", "params": {"modality": m}} for m in modalities]
    return SweepSpec.model_validate(
        {
            "name": name,
            "base": preset,
            "overrides": overrides,
            "grid": {"method": methods, "train.seed": list(range(seeds))},
            "experiment": experiment,
        }
    )


def _ddp_check(preset: str, experiment: str, overrides: list[str], name: str, uri: str) -> str:
    """One joint trial with 2 DDP workers through Ray Train (gloo on CPU)."""
    spec = SweepSpec.model_validate(
        {
            "name": name,
            "base": preset,
            "overrides": [*overrides, "method.name=joint"],
            "grid": {"train.seed": [0]},
            "experiment": experiment,
            "resources": {"workers": 2, "cpus_per_worker": 1},
            "max_failures": 0,
        }
    )
    outcome = run_sweep(expand(spec, "demo DDP check"), tracking_uri=uri, echo=False)
    if outcome.failed:
        return "Ray Train DDP check (2 workers): FAILED"
    from midasbench.analysis import load_runs

    runs = load_runs(experiment, uri, f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    acc = float(runs["metrics.test/acc"].iloc[0])
    return (
        f"Ray Train DDP check: joint, seed 0, 2 workers → test acc {100 * acc:.2f} ({outcome.seconds:.0f} s)"
    )


def run_demo(
    *,
    seeds: int = 3,
    preset: str = "synthetic",
    experiment: str = "midasbench-demo",
    overrides: list[str] | None = None,
    address: str | None = None,
    ddp_check: bool = True,
    report_path: str | Path = "midasbench-report.html",
    echo: bool = True,
) -> DemoResult:
    from midasbench.analysis import load_runs, make_report, markdown_table, summarize
    from midasbench.datasets import ArrowDataset
    from midasbench.harness.sweeps.sweep import init_ray

    start = time.time()
    uri = resolve_tracking_uri(None)
    common = ["train.progress=false", *(overrides or [])]
    base = load_config(preset, common)
    modalities = ArrowDataset(dataset_path(base)).manifest.modality_names  # built here, once
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    spec = demo_spec(preset, modalities, seeds, experiment, common, f"demo-{preset}-{stamp}")
    plan = expand(spec, "demo")
    if echo:
        print(
            f"demo: a sweep of {len(plan.trials)} trials ({' + '.join(DEMO_METHODS)} + {len(modalities)} "
            f"unimodal, × {seeds} seeds) on {base.data.name}; MLflow {uri}, experiment {experiment!r}"
        )
    init_ray(address)
    outcome = run_sweep(plan, tracking_uri=uri, echo=False)
    if outcome.failed:
        raise RuntimeError(f"demo trials failed: {', '.join(outcome.failed)}")
    runs = load_runs(experiment, uri, f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    parent = outcome.parent_run_id
    table = make_report(
        experiment, tracking_uri=uri, parent=parent, table="main", fmt="md", figures=False
    ).text
    evidence = [f"test/{k}" for k in ("mis_top2", *(f"zeroed_acc_{m}" for m in modalities))]
    evidence += [f"test/acc_only_{m}" for m in modalities if f"metrics.test/acc_only_{m}" in runs.columns]
    fused = runs[runs["method"].isin(DEMO_METHODS)]
    table += (
        "\n\nModality use (fused-head methods; 'only m kept': the other modalities' features zeroed):\n\n"
    )
    table += markdown_table(summarize(fused, evidence), evidence)
    html = make_report(experiment, tracking_uri=uri, parent=parent, table="main", out=report_path)
    check = _ddp_check(preset, experiment, common, f"demo-ddp-{stamp}", uri) if ddp_check else None
    return DemoResult(
        experiment=experiment,
        tracking_uri=uri,
        parent_run_id=outcome.parent_run_id,
        table=table,
        runs=len(runs),
        seconds=time.time() - start,
        ddp_check=check,
        report=html.out,
        figures=len(html.figures),
    )
