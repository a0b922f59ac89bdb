"""Tracking through a real `mlflow server` (the multi-node set-up, stack.md §3, §7.2): a run and a sweep log
over HTTP, and everything the sqlite tests check can be read back from the server, artifacts included."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from midasbench.harness.config import build_config

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (server, uvicorn worker), then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; its children may still be closing
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` on a free loopback port, sqlite backend and proxied artifacts in a temporary folder.
    Yields ``(url, artifacts_folder)``."""
    root = tmp_path_factory.mktemp("mlflow_server")
    artifacts = root / "artifacts"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: only the tracking API
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'srv.db'}",
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown reaches the uvicorn worker too
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{_tail(root / 'server.log')}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{_tail(root / 'server.log')}"
                )
            time.sleep(0.5)
        yield url, artifacts
    finally:
        _stop_group(process)
        log.close()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_a_run_logs_everything_to_the_server(mlflow_server, tiny_config, tmp_path):
    from midasbench.harness.training.trainer import train

    url, artifacts = mlflow_server
    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={url}", "tracking.experiment=server-run")
    result = train(cfg)

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3" and run.data.params["method.name"] == "joint"
    assert run.data.tags["method.label"] == "joint" and run.data.tags["seed"] == "0"
    assert len(run.data.tags["dataset.content_sha256"]) == 64
    assert run.data.tags["config.fingerprint"] == cfg.fingerprint()
    history = client.get_metric_history(result.run_id, "val/acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([h["val/acc"] for h in result.history])
    assert run.data.metrics["test/acc"] == pytest.approx(result.test["acc"])

    # artifacts go through the server's proxy into its --artifacts-destination, not to a client-side path
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {"config.yaml", "split_manifest.json", "dataset_manifest.json"} <= {
        a.path for a in client.list_artifacts(result.run_id)
    }
    local = client.download_artifacts(result.run_id, "config.yaml", str(tmp_path))
    assert build_config(yaml.safe_load(Path(local).read_text())) == cfg
    assert list(artifacts.rglob("config.yaml")), "the artifact is stored in the server's destination"


@pytest.mark.ray
def test_a_sweep_logs_child_runs_under_one_parent_to_the_server(
    mlflow_server, ray_session, data_root, tiny_options, tmp_path
):
    from midasbench.harness.sweeps.sweep import SWEEP_TAG, TRIAL_TAG, SweepSpec, expand, run_sweep

    url, _ = mlflow_server
    spec = SweepSpec(
        name="server-sweep",
        base="synthetic",
        overrides=[
            f"data.root={data_root}",
            f"data.options={json.dumps(tiny_options)}",
            "model.default_encoder.params={hidden: [16], out_dim: 8}",
            "train.epochs=2",
            "train.batch_size=32",
            "train.num_threads=1",
        ],
        grid={"train.seed": [0, 1]},
        resources={"cpus_per_trial": 1},
        storage=str(tmp_path / "sweeps"),
    )
    plan = expand(spec)
    outcome = run_sweep(plan, tracking_uri=url, echo=False)
    assert outcome.failed == [] and outcome.ran == 2 and outcome.tracking_uri == url

    client = MlflowClient(tracking_uri=url)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[SWEEP_TAG] == "server-sweep"
    assert "sweep.yaml" in {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    experiment = client.get_experiment_by_name("server-sweep")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    assert len(children) == 2
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags[TRIAL_TAG] for r in children} == {t.key for t in plan.trials}
    assert sorted(r.data.params["train.seed"] for r in children) == ["0", "1"]
    assert all("test/acc" in r.data.metrics and r.data.tags.get("ray.node_id") for r in children)
