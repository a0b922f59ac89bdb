"""MLflow tracking of one run: params, per-epoch metrics, final metrics, tags, artifacts.

``MlflowTracker`` (``mlflow_tracker.py``) journals every record before it is sent and sends in the
background (``journal.py``, ``retry.py``); this module holds what the rest of the harness shares: the
store's URI, experiments, the flattened params, the run's provenance. Everything goes through an explicit
``MlflowClient`` and run id (no ``mlflow.start_run`` globals and no ``set_experiment``, which exports
``MLFLOW_EXPERIMENT_ID`` and silently redirects other loggers; stack.md §3 gotcha 2), so concurrent runs
in one process or many never share state. A resumed run re-opens its MLflow run by id, so a crash and
resume still give exactly one run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

# MLflow's telemetry thread can remove an environment variable while a request reads os.environ (a
# KeyError no retry catches, issue 14); off before mlflow is first imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from .mlflow_tracker import IDENTITY_TAG, RUN_KEY_TAG, MlflowTracker

__all__ = ["IDENTITY_TAG", "RUN_KEY_TAG", "MlflowTracker", "NullTracker", "Tracker", "ensure_experiment"]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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
