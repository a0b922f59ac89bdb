"""Read midasbench runs back from MLflow into a flat table (one row per run)."""

from __future__ import annotations

import pandas as pd

from midasbench.harness.tracking import resolve_tracking_uri

#: MLflow tags that identify what a run measured; they become plain columns.
TAG_COLUMNS = {
    "tags.dataset.name": "dataset",
    "tags.method.label": "method",
    "tags.method.fidelity": "fidelity",
    "tags.split.protocol": "split_protocol",
    "tags.split.seed": "split_seed",
    "tags.seed": "seed",
}


def load_runs(
    experiment: str, tracking_uri: str | None = None, filter_string: str = "", finished_only: bool = True
) -> pd.DataFrame:
    """Finished runs of ``experiment`` with identifying columns and every ``metrics.*`` column."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} in {uri}")
    clauses = [c for c in (filter_string, "attributes.status = 'FINISHED'" if finished_only else "") if c]
    runs = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string=" and ".join(clauses),
        output_format="pandas",
        max_results=100_000,
    )
    if runs.empty:
        return runs
    runs = runs.rename(columns=TAG_COLUMNS)
    return runs
