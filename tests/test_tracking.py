"""Every run is an MLflow run with the params, metrics, tags and artifacts a reader needs."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from midasbench.harness.config import build_config
from midasbench.harness.tracking import flatten, resolve_tracking_uri
from midasbench.harness.training.trainer import train


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "{}"}


def test_a_run_logs_params_metrics_tags_and_artifacts(tiny_config, mlflow_uri, tmp_path):
    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={mlflow_uri}", "tracking.experiment=t")
    result = train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "3" and params["method.name"] == "joint"
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert params["method.params.unimodal_weight"] == "0.0"
    tags = run.data.tags
    for key in (
        "midasbench.git_commit",
        "version.torch",
        "version.mlflow",
        "dataset.content_sha256",
        "split.train.ids_sha256",
        "method.fidelity",
        "config.fingerprint",
    ):
        assert tags.get(key), key
    assert tags["method.label"] == "joint" and tags["seed"] == "0"
    assert tags["train.world_size"] == "1" and tags["train.batch_size_per_rank"] == str(cfg.train.batch_size)
    assert len(tags["dataset.content_sha256"]) == 64
    history = client.get_metric_history(result.run_id, "val/acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == [h["val/acc"] for h in result.history]
    for key in ("train/loss", "val/macro_f1", "val/loss", "lr", "val/acc_only_weak"):
        assert len(client.get_metric_history(result.run_id, key)) == 3, key
    metrics = run.data.metrics
    assert metrics["test/acc"] == pytest.approx(result.test["acc"])
    assert metrics["test/macro_f1"] == pytest.approx(result.test["macro_f1"])
    assert metrics["best_epoch"] == result.best_epoch
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "split_manifest.json", "dataset_manifest.json"} <= artifacts
    local = client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))
    assert build_config(yaml.safe_load(Path(local).read_text())) == cfg  # enough to reproduce the run
    split_path = client.download_artifacts(result.run_id, "split_manifest.json", str(tmp_path))
    split = json.loads(Path(split_path).read_text())
    assert split["splits"]["train"]["ids_sha256"] == tags["split.train.ids_sha256"]
    assert len(split["splits"]["test"]["ids"]) == split["splits"]["test"]["rows"] == 160


def test_a_crashed_and_resumed_run_is_one_complete_mlflow_run(tiny_config, mlflow_uri):
    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={mlflow_uri}", "tracking.experiment=r")

    def crash(epoch, metrics, checkpoint_dir):
        if epoch == 1:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        train(cfg, callbacks=[crash])
    client = MlflowClient(tracking_uri=mlflow_uri)
    (failed,) = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert failed.info.status == "FAILED"
    result = train(cfg)
    runs = client.search_runs([client.get_experiment_by_name("r").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id] == [failed.info.run_id]
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val/acc")] == [0, 1, 2]
    assert "test/acc" in runs[0].data.metrics
