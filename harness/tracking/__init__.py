"""MLflow tracking of one run: params, per-epoch metrics, final metrics, tags, artifacts.

Everything goes through an explicit ``MlflowClient`` and run id (no ``mlflow.start_run`` globals and no
``set_experiment``, which exports ``MLFLOW_EXPERIMENT_ID`` and silently redirects other loggers; stack.md
§3 gotcha 2), so concurrent runs in one process or many never share state. A resumed run re-opens its
MLflow run by id, so a crash and resume still give exactly one run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
IDENTITY_TAG = "midasbench.trial"  # a sweep trial's key: with its parent run, identifies its one MLflow run
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute, so Ray
    workers running elsewhere write to the same store)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    match = re.fullmatch(r"sqlite:///(.+)", uri)
    if match and not match.group(1).startswith("/"):
        uri = f"sqlite:///{Path(match.group(1)).resolve()}"
    return uri


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists become JSON; over-long values are cut with a mark."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[: MAX_PARAM_LENGTH - 20] + "…(see config.yaml)"
            out[name] = text
    return out


@functools.lru_cache(maxsize=8)
def git_commit(cwd: Path | None = None) -> str:
    """The commit of the checkout midasbench runs from (its source folder), or 'unknown'. Asked once a
    process: the code a process runs is the code it imported (two git subprocesses a run otherwise)."""
    where = cwd or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return result.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("midasbench", "torch", "torchvision", "ray", "mlflow", "pyarrow", "transformers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class Tracker(Protocol):
    run_id: str | None

    def start(
        self, run_name: str, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None
    ) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def end(self, status: str) -> None: ...


class NullTracker:
    """Used when tracking is disabled and on non-zero ranks."""

    run_id: str | None = None

    def start(
        self, run_name: str, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None
    ) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store and experiment if needed (call once in a driver before parallel runs start:
    concurrent first-time sqlite schema creation races; stack.md §3 gotcha 1). Returns the id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    match = re.fullmatch(r"sqlite:///(.+)", uri)
    if match:  # keep artifacts beside the database, not in whatever cwd a worker has
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        artifact_location = (Path(match.group(1)).parent / "mlartifacts" / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        experiment = client.get_experiment_by_name(name)  # created concurrently by another process
        if experiment is None:
            raise
        return experiment.experiment_id


class MlflowTracker:
    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None

    def start(
        self, run_name: str, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None
    ) -> None:
        from mlflow.entities import Param

        if resume_run_id is not None:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self.set_tags({"midasbench.resumed": "true"})
            return
        experiment_id = ensure_experiment(self.uri, self.experiment)
        adopted = self._unfinished_run_with_identity(experiment_id, tags)
        if adopted is not None:  # a sweep trial that died before its first checkpoint: same run again
            self.run_id = adopted
            self.client.update_run(adopted, status="RUNNING")
            self.set_tags({"midasbench.resumed": "true"})
            return
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 90):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 90])

    def _unfinished_run_with_identity(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        """An earlier, unfinished run of the same sweep trial (same parent run and trial key), if any."""
        parent, trial = tags.get("mlflow.parentRunId"), tags.get(IDENTITY_TAG)
        if not parent or not trial:
            return None
        runs = self.client.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{parent}' and tags.`{IDENTITY_TAG}` = '{trial}' "
            "and attributes.status != 'FINISHED'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        for start in range(0, len(items), 900):
            self.client.log_batch(self.run_id, metrics=items[start : start + 900])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
