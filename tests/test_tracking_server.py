"""Issue 14: ``midasbench tracking-server`` sizes the MLflow server for the database and restarts it when
it dies."""

import io
import os
import re
import signal
import socket
import sys
import threading

import pytest
from mlflow.tracking import MlflowClient

from midasbench.harness.cli import EXIT_USAGE, main
from midasbench.harness.errors import ConfigError
from midasbench.harness.tracking.server import ServerSizing, server_command, supervise, wait_healthy


def test_sizing_keeps_the_pools_under_the_database_connections(monkeypatch):
    ServerSizing(workers=4, pool_size=20, max_overflow=20, max_connections=300).check()  # 160 < 300
    with pytest.raises(ConfigError, match=r"8 workers × \(pool 20 \+ overflow 20\) = 320 connections"):
        ServerSizing(workers=8, pool_size=20, max_overflow=20, max_connections=300).check()
    monkeypatch.setenv("MIDASBENCH_MLFLOW_WORKERS", "2")
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "5")
    sizing = ServerSizing.from_environment(max_overflow=3)
    assert (sizing.workers, sizing.pool_size, sizing.max_overflow, sizing.max_connections) == (2, 5, 3, 300)
    assert sizing.environment() == {
        "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5",
        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "3",
    }


def test_the_cli_refuses_an_oversized_server(capsys):
    store = ["--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", "a"]
    code = main(["tracking-server", *store, "--workers", "8", "--max-connections", "100"])
    assert code == EXIT_USAGE and "not under the database's max_connections 100" in capsys.readouterr().err


def test_a_server_that_exits_is_started_again_until_stopped():
    log = io.StringIO()
    starts = supervise([sys.executable, "-c", "pass"], {}, restart_delay_s=0.01, max_starts=3, log=log)
    assert starts == 3 and log.getvalue().count("exited with 0; restart in") == 3
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    long_running = [sys.executable, "-c", "import time; time.sleep(60)"]
    assert supervise(long_running, {}, stop=stop, log=io.StringIO()) == 1  # stopped: its child is ended


@pytest.mark.slow
def test_a_killed_mlflow_server_comes_back_with_its_store(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = server_command(
        f"sqlite:///{tmp_path / 'srv.db'}", str(tmp_path / "artifacts"), "127.0.0.1", port, 1
    )
    log, stop = io.StringIO(), threading.Event()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    thread = threading.Thread(
        target=supervise, args=(command, env), kwargs={"stop": stop, "log": log, "restart_delay_s": 0.5}
    )
    thread.start()
    try:
        assert wait_healthy(url), log.getvalue()
        experiment = MlflowClient(url).create_experiment("kept")
        (pid,) = re.findall(r"pid (\d+)", log.getvalue())
        os.killpg(int(pid), signal.SIGKILL)
        assert wait_healthy(url, timeout_s=90), log.getvalue()
        assert len(re.findall(r"pid (\d+)", log.getvalue())) == 2  # started again
        assert MlflowClient(url).get_experiment(experiment).name == "kept"
    finally:
        stop.set()
        thread.join(timeout=30)
