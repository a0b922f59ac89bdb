"""Read midasbench runs back from MLflow into a flat table (one row per run), and metric histories."""

from __future__ import annotations

from collections.abc import Iterable

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

PAGE_SIZE = 1000


def load_runs(
    experiment: str, tracking_uri: str | None = None, filter_string: str = "", finished_only: bool = True
) -> pd.DataFrame:
    """Finished runs of ``experiment`` with identifying columns and every ``metrics.*``, ``params.*`` and
    ``tags.*`` column (the shape of ``mlflow.search_runs``).

    Everything goes through a client bound to ``tracking_uri``: ``mlflow.search_runs`` would read the
    process-wide tracking URI instead, i.e. another store whenever the two differ.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} in {uri}")
    clauses = [c for c in (filter_string, "attributes.status = 'FINISHED'" if finished_only else "") if c]
    rows, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id], " and ".join(clauses), max_results=PAGE_SIZE, page_token=token
        )
        rows += [_flat(run) for run in page]
        token = page.token
        if not token:
            break
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    return runs.rename(columns=TAG_COLUMNS)


def _flat(run) -> dict:
    info, data = run.info, run.data
    row = {
        "run_id": info.run_id,
        "experiment_id": info.experiment_id,
        "status": info.status,
        "artifact_uri": info.artifact_uri,
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"tags.{k}": v for k, v in data.tags.items()})
    return row


def metric_histories(client, run_ids: Iterable[str], key: str) -> pd.DataFrame:
    """Per-step values of ``key``: one column per run, indexed by step (epoch); missing steps are NaN."""
    series = {}
    for run_id in run_ids:
        points = client.get_metric_history(run_id, key)
        if points:
            by_step = {}
            for p in sorted(points, key=lambda p: (p.step, p.timestamp)):
                by_step[p.step] = p.value  # a resumed epoch logged twice: the later value wins
            series[run_id] = pd.Series(by_step, dtype=float)
    if not series:
        return pd.DataFrame()
    return pd.DataFrame(series).sort_index()
