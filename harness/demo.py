"""``midasbench demo``: the main job on embedded defaults, small enough for a 2-core laptop.

Joint training against each unimodal baseline on the offline ``synthetic`` dataset, over several init
seeds, run as parallel tasks on a local Ray instance, each logged as an MLflow run in the working
directory's ``mlflow.db``; then the runs are read back from MLflow and printed as a mean ± std table.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config
from .tracking import ensure_experiment, resolve_tracking_uri
from .trainer import clone_config, dataset_path, train

SESSION_TAG = "midasbench.session"
DEMO_METRICS = ("test/acc", "test/macro_f1")


@dataclass
class DemoResult:
    session: str
    experiment: str
    tracking_uri: str
    table: str
    runs: int
    seconds: float


DEMO_METHODS = ("joint", "midas")


def trial_configs(base: RunConfig, modalities: list[str], seeds: list[int], session: str) -> list[RunConfig]:
    """Joint training, MIDAS and one unimodal baseline per modality, for every seed (the demo's grid)."""
    methods: list[dict[str, Any]] = [{"method.name": name, "method.params": {}} for name in DEMO_METHODS]
    methods += [{"method.name": "unimodal", "method.params": {"modality": m}} for m in modalities]
    return [
        clone_config(
            base,
            {**method, "train.seed": seed, "tracking.tags": {**base.tracking.tags, SESSION_TAG: session}},
        )
        for method in methods
        for seed in seeds
    ]


def _run_trial(config: dict[str, Any]) -> dict[str, Any]:
    from .config import build_config

    result = train(build_config(config, "demo trial"))
    return {"method": result.method, "run_id": result.run_id, "test": result.test}


def run_demo(
    *,
    seeds: int = 3,
    preset: str = "synthetic",
    experiment: str = "midasbench-demo",
    overrides: list[str] | None = None,
    num_cpus: int | None = None,
    use_ray: bool = True,
    echo: bool = True,
) -> DemoResult:
    from midasbench.analysis import load_runs, markdown_table, summarize
    from midasbench.datasets import ArrowDataset

    start = time.time()
    workdir = Path.cwd()
    uri = resolve_tracking_uri(None)
    base = load_config(
        preset,
        [
            f"tracking.experiment={experiment}",
            f"tracking.uri={uri}",
            "train.progress=false",
            "train.checkpoint_dir=null",
            *(overrides or []),
        ],
    )
    # Build the dataset and the MLflow store once, in the driver, before any trial starts.
    data_dir = dataset_path(base)
    base = clone_config(base, {"data.path": str(data_dir.resolve())})
    ensure_experiment(uri, experiment)
    session = uuid.uuid4().hex[:12]
    modalities = ArrowDataset(data_dir).manifest.modality_names
    configs = trial_configs(base, modalities, list(range(seeds)), session)
    for cfg in configs:  # absolute checkpoint paths: Ray workers may run in another directory
        cfg.train.checkpoint_dir = str(workdir / ".midasbench" / "checkpoints" / cfg.fingerprint())
    if echo:
        print(
            f"demo: {len(configs)} runs ({' + '.join(DEMO_METHODS)} + {len(modalities)} unimodal, "
            f"× {seeds} seeds) on "
            f"{base.data.name}; MLflow store {uri}, experiment {experiment!r}"
        )

    payloads = [cfg.to_dict() for cfg in configs]
    if use_ray:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address="local",
                num_cpus=num_cpus or min(2, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
                logging_level="error",
                object_store_memory=256 * 2**20,
            )
        try:
            task = ray.remote(num_cpus=1)(_run_trial)
            results = ray.get([task.remote(p) for p in payloads])
        finally:
            if started_here:
                ray.shutdown()
    else:
        results = [_run_trial(p) for p in payloads]

    runs = load_runs(experiment, uri, filter_string=f"tags.`{SESSION_TAG}` = '{session}'")
    table = markdown_table(summarize(runs, DEMO_METRICS), DEMO_METRICS)
    evidence = [f"test/{k}" for k in ("mis_top2", *(f"zeroed_acc_{m}" for m in modalities))]
    evidence += [f"test/acc_only_{m}" for m in modalities if f"metrics.test/acc_only_{m}" in runs.columns]
    fused = runs[runs["method"].isin(DEMO_METHODS)]
    table += (
        "\n\nModality use (fused-head methods; 'only m kept': the other modalities' features zeroed):\n\n"
    )
    table += markdown_table(summarize(fused, evidence), evidence)
    return DemoResult(
        session=session,
        experiment=experiment,
        tracking_uri=uri,
        table=table,
        runs=len(results),
        seconds=time.time() - start,
    )
