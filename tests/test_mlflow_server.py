"""Tracking through a real `mlflow server` (the multi-node set-up, stack.md §3, §7.2): a run and a sweep log
over HTTP, and everything the sqlite tests check can be read back from the server, artifacts included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from midasbench.harness.config import build_config
from midasbench.harness.tracking.server import free_port, healthy, stop_process_group

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 60


class Server:
    """`mlflow server` on a loopback port, proxied artifacts in ``root``, a sqlite store there unless
    ``backend`` names another; can be stopped (or killed) and started again on the same port and store,
    as a supervisor would."""

    def __init__(self, root: Path, backend: str | None = None) -> None:
        self.root, self.port = root, free_port()
        self.backend = backend or f"sqlite:///{root / 'srv.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: only the tracking API
        with (self.root / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(MLFLOW),
                    "server",
                    "--backend-store-uri",
                    self.backend,
                    "--artifacts-destination",
                    str(self.artifacts),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so teardown reaches the uvicorn worker too
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(self.url):
            if self.process.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {self.process.returncode}:\n{_tail(self.root / 'server.log')}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{_tail(self.root / 'server.log')}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, grace_s)
            self.process = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` on a free loopback port, sqlite backend and proxied artifacts in a temporary folder.
    Yields ``(url, artifacts_folder)``."""
    server = Server(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server.url, server.artifacts
    finally:
        server.stop()


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


WRITER = """
import sys, time
from pathlib import Path
from midasbench.harness.tracking import MlflowTracker
uri, folder, name, epochs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
tracker = MlflowTracker(uri, "restarts", folder, "fp", flush_timeout_s=120)
tracker.start(name, {f"p{i}": str(i) for i in range(60)}, {"writer": name}, None)
for epoch in range(epochs):
    tracker.log_metrics({f"m{k}": epoch + k / 100 for k in range(40)}, epoch)
    time.sleep(0.2)
tracker.end("FINISHED")
print(tracker.run_id)
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> str:
    """The server's backend store: sqlite (the local default) or PostgreSQL (the cluster's)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'srv.db'}"
    postgres = request.getfixturevalue("postgres")
    database = f"restarts_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**6}"
    postgres.create_database(database)
    return postgres.url(database)


@pytest.mark.slow
def test_writers_lose_nothing_when_the_server_is_killed_and_restarted(tmp_path, backend):
    # issue 14: concurrent trials log through the project's tracker while their server dies mid-run and
    # comes back (as its supervisor restarts it): the records wait in the journals, nothing is lost or
    # stored twice, every run ends FINISHED, no writer fails; on sqlite and on PostgreSQL
    server = Server(tmp_path, backend)
    server.start()
    epochs, names = 25, ["w0", "w1", "w2"]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, server.url, str(tmp_path / name), name, str(epochs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        time.sleep(4)  # the writers have started their runs and logged a few epochs
        os.killpg(server.process.pid, signal.SIGKILL)  # the server dies without a goodbye
        server.process.wait()
        server.process = None
        time.sleep(3)
        server.start()  # restarted on the same port and store
        outputs = [w.communicate(timeout=240) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    for writer, (_, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err[-2000:]
    client = MlflowClient(tracking_uri=server.url)
    try:
        experiment = client.get_experiment_by_name("restarts")
        runs = client.search_runs([experiment.experiment_id])
        assert sorted(r.data.tags["writer"] for r in runs) == names  # one run per writer, no duplicate
        for run in runs:
            assert run.info.status == "FINISHED" and len(run.data.params) == 60
            assert len(run.data.metrics) == 40
            for key in ("m0", "m39"):
                assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(
                    range(epochs)
                )
    finally:
        server.stop()
