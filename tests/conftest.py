"""Shared fixtures: small synthetic data, a temporary MLflow store, one Ray instance per session."""

from __future__ import annotations

import os

# Before anything imports ray (stack.md §9): fast Train health checks, no auth for local clusters.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest

from midasbench.harness.config import RunConfig, load_config

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


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite MLflow store with its schema made once a session: migrating a new store takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, empty_mlflow_store: Path) -> str:
    """A test's own sqlite MLflow store, empty: a copy of the session's migrated one."""
    import shutil

    shutil.copyfile(empty_mlflow_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tiny_config(data_root: Path, tmp_path: Path):
    """A factory for a seconds-long synthetic run config with extra ``key=value`` overrides."""

    def make(*overrides: str) -> RunConfig:
        import json

        return load_config(
            "synthetic",
            [
                f"data.root={data_root}",
                f"data.options={json.dumps(TINY_SYNTHETIC)}",
                "model.default_encoder.params={hidden: [32], out_dim: 16}",
                "train.epochs=3",
                "train.batch_size=32",
                "train.progress=false",
                "train.num_threads=1",
                f"train.checkpoint_dir={tmp_path / 'ckpt'}",
                "tracking.enabled=false",
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        resources={"trial_slot": 2},  # Ray Train trials' drivers (harness/sweeps/sweep.py)
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 2**20,
        logging_level="warning",
    )
    yield
    ray.shutdown()


@pytest.fixture
def tiny_options() -> dict[str, Any]:
    return dict(TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def postgres_folder():
    """A factory of data folders for PostgreSQL servers of the tests' own (issue 14): a folder that the
    user PostgreSQL runs as may enter (pytest's own are private to root); skipped, with the reason, where
    PostgreSQL or its Python driver is not installed."""
    import shutil
    import tempfile

    from midasbench.harness.tracking.postgres import LocalPostgres, PostgresUnavailable, require_driver

    try:
        require_driver()
        LocalPostgres(Path("/nonexistent"))  # finds the binaries and a user to run them as, or says why not
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    root = Path(tempfile.mkdtemp(prefix="midasbench-test-pg-"))
    root.chmod(0o755)

    def make(name: str) -> Path:
        return root / name

    yield make
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(postgres_folder):
    """One PostgreSQL server for the session, on a free loopback port; ``postgres.url(db)`` after
    ``postgres.create_database(db)``."""
    from midasbench.harness.tracking.postgres import LocalPostgres
    from midasbench.harness.tracking.server import free_port

    server = LocalPostgres(postgres_folder("session"), port=free_port())
    server.ensure_running("postgres")
    yield server
    server.stop("immediate")
