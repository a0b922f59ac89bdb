"""Issue 14: ``midasbench tracking-server`` sizes the MLflow server for the database and restarts it when
it dies."""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from midasbench.harness.cli import EXIT_USAGE, main
from midasbench.harness.errors import ConfigError
from midasbench.harness.tracking.server import (
    ServerSizing,
    free_port,
    server_command,
    supervise,
    wait_healthy,
)


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


def test_a_store_that_cannot_be_kept_up_does_not_stop_the_supervisor():
    calls, log = [], io.StringIO()

    def keep_up() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("port 5432 is taken")

    quick = [sys.executable, "-c", "pass"]
    assert supervise(quick, {}, restart_delay_s=0.01, max_starts=2, log=log, keep_up=keep_up) == 2
    assert len(calls) == 2 and "could not keep the store up: port 5432 is taken" in log.getvalue()


@pytest.mark.slow
def test_a_killed_mlflow_server_comes_back_with_its_store(tmp_path):
    port = free_port()
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


def test_the_cli_wants_one_store(capsys):
    code = main(["tracking-server", "--artifacts-destination", "a", "--max-connections", "1000"])
    assert code == EXIT_USAGE and "either --backend-store-uri or --postgres-dir" in capsys.readouterr().err


def test_the_store_s_own_postgres_keeps_its_data_and_is_started_again(postgres_folder):
    import psycopg

    from midasbench.harness.tracking.postgres import LocalPostgres

    postgres = LocalPostgres(postgres_folder("crash"), port=free_port(), max_connections=50)
    url = postgres.ensure_running("kept")
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE t (x int)")
        connection.execute("INSERT INTO t VALUES (7)")
    postgres.stop("immediate")  # as if it crashed
    assert not postgres.running()
    stop = threading.Event()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    thread = threading.Thread(
        target=supervise,
        args=(sleeper, {}),
        kwargs={"stop": stop, "log": io.StringIO(), "keep_up": postgres.keep_up, "keep_up_every_s": 0.2},
    )
    thread.start()
    try:
        postgres.stop("immediate")  # down again while the supervisor runs: found down and started
        deadline, rows = time.monotonic() + 60, None
        while rows is None and time.monotonic() < deadline:
            try:
                with psycopg.connect(url) as connection:
                    rows = connection.execute("SELECT x FROM t").fetchall()
            except psycopg.OperationalError:  # down, or still recovering
                time.sleep(0.2)
        assert rows == [(7,)]  # back, and recovered from its write-ahead log
    finally:
        stop.set()
        thread.join(timeout=30)
        postgres.stop()


@pytest.mark.slow
def test_the_tracking_server_on_its_own_postgres(postgres_folder, tmp_path):
    # `midasbench tracking-server --postgres-dir`: the MLflow server on a PostgreSQL of its own, which is
    # started again when it dies and stopped with the server
    from midasbench.harness.tracking.postgres import LocalPostgres

    folder, pg_port, port = postgres_folder("cli"), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *[str(Path(sys.executable).with_name("midasbench")), "tracking-server"],
        *["--postgres-dir", str(folder), "--postgres-port", str(pg_port), "--max-connections", "100"],
        *["--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1"],
        *["--port", str(port), "--workers", "1", "--restart-delay", "0.5"],
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    postgres = LocalPostgres(folder, port=pg_port)
    try:
        assert wait_healthy(url, timeout_s=120), (tmp_path / "server.log").read_text()
        experiment = MlflowClient(url).create_experiment("on-postgres")
        postgres.stop("immediate")
        deadline, name = time.monotonic() + 90, None
        while name is None and time.monotonic() < deadline:
            try:
                name = MlflowClient(url).get_experiment(experiment).name
            except Exception:
                time.sleep(0.5)
        assert name == "on-postgres", (tmp_path / "server.log").read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0 and not postgres.running()  # stopped with the server


def test_postgres_programs_are_found_on_path_or_in_the_newest_version(tmp_path, monkeypatch):
    from midasbench.harness.tracking.postgres import PostgresUnavailable, find_bin_dir

    for version, programs in {
        "9.6": ["pg_ctl", "initdb"],
        "15": ["pg_ctl", "initdb"],
        "16": ["pg_ctl"],
    }.items():
        folder = tmp_path / "lib" / version / "bin"
        folder.mkdir(parents=True)
        for program in programs:
            (folder / program).write_text("#!/bin/sh\n")
            (folder / program).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_bin_dir(tmp_path / "lib") == tmp_path / "lib" / "15" / "bin"  # 16 lacks initdb
    with pytest.raises(PostgresUnavailable, match=r"no pg_ctl and initdb on PATH or in .*nothing/\*/bin"):
        find_bin_dir(tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path / "lib" / "9.6" / "bin"))
    assert find_bin_dir(tmp_path / "lib") == tmp_path / "lib" / "9.6" / "bin"  # PATH first
