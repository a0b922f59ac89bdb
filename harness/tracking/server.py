"""``midasbench tracking-server``: a cluster's MLflow server, sized for its trials and restarted if it dies.

Sizing (issue 14). Each server worker keeps its own SQLAlchemy pool of ``pool_size`` connections plus up
to ``max_overflow`` more, and a ``log_batch`` holds two at once; when the pool is exhausted for 30 s the
client gets HTTP 400 (``QueuePool limit ... reached``), which MLflow's client does not retry. Trials'
trackers retry it, but a server sized for the cluster rarely says it: as many workers as the head has
cores to spare, and ``workers × (pool_size + max_overflow)`` below the database's ``max_connections``
(PostgreSQL's default is 100; the cluster configs raise it to 300). The defaults come from the
environment, so a cluster config sets them once: ``MIDASBENCH_MLFLOW_WORKERS`` (4),
``MLFLOW_SQLALCHEMYSTORE_POOL_SIZE`` (20), ``MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW`` (20) and
``MIDASBENCH_DB_MAX_CONNECTIONS`` (300).

Supervision. The server runs as a child in its own process group; when it exits for any reason it is
started again after ``restart_delay_s`` (a restart costs trials only delay: their records wait in their
journals). SIGTERM or SIGINT stop the child and the supervisor. With ``--postgres-dir`` the supervisor also
runs the store's own PostgreSQL (``postgres.py``) and starts it again when it is found down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from midasbench.harness.errors import ConfigError


@dataclass(frozen=True)
class ServerSizing:
    workers: int
    pool_size: int
    max_overflow: int
    max_connections: int

    @classmethod
    def from_environment(cls, **given: int | None) -> ServerSizing:
        env = os.environ
        defaults = {
            "workers": int(env.get("MIDASBENCH_MLFLOW_WORKERS", 4)),
            "pool_size": int(env.get("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", 20)),
            "max_overflow": int(env.get("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", 20)),
            "max_connections": int(env.get("MIDASBENCH_DB_MAX_CONNECTIONS", 300)),
        }
        return cls(**{k: given[k] if given.get(k) is not None else v for k, v in defaults.items()})

    def check(self) -> None:
        """Refuse a server whose pools together could open more connections than the database takes."""
        for name in ("workers", "pool_size", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tracking-server: {name} must be at least 1, got {getattr(self, name)}")
        total = self.workers * (self.pool_size + self.max_overflow)
        if total >= self.max_connections:
            raise ConfigError(
                f"tracking-server: {self.workers} workers × (pool {self.pool_size} + overflow "
                f"{self.max_overflow}) = {total} connections, not under the database's max_connections "
                f"{self.max_connections}; lower --workers, --pool-size or --max-overflow, or raise "
                "max_connections in the database (and --max-connections here)"
            )

    def environment(self) -> dict[str, str]:
        return {
            "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(self.pool_size),
            "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(self.max_overflow),
        }


def server_command(
    backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int
) -> list[str]:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return [
        *([mlflow] if Path(mlflow).exists() else [sys.executable, "-m", "mlflow"]),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def supervise(
    command: Sequence[str],
    env: dict[str, str],
    *,
    restart_delay_s: float = 2.0,
    max_starts: int | None = None,
    stop: threading.Event | None = None,
    log: TextIO = sys.stderr,
    keep_up: Callable[[], None] | None = None,
    keep_up_every_s: float = 5.0,
) -> int:
    """Run ``command``, starting it again whenever it exits, until ``stop`` is set, a signal arrives or
    it was started ``max_starts`` times; returns the number of starts. ``keep_up`` (e.g. start the
    server's database if it is down) is called before each start and every ``keep_up_every_s``."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    def keep_it_up() -> None:
        if keep_up is None:
            return
        try:
            keep_up()
        except Exception as exc:  # tried again at the next check: the supervisor itself must not die
            print(f"tracking-server: could not keep the store up: {exc}", file=log, flush=True)

    starts = 0
    while not stop.is_set() and (max_starts is None or starts < max_starts):
        keep_it_up()
        process = subprocess.Popen(list(command), env={**os.environ, **env}, start_new_session=True)
        starts += 1
        print(
            f"tracking-server: started {command[0]} (pid {process.pid}, start {starts})", file=log, flush=True
        )
        checked = time.monotonic()
        while process.poll() is None and not stop.wait(0.5):
            if time.monotonic() - checked >= keep_up_every_s:
                keep_it_up()
                checked = time.monotonic()
        if process.poll() is None:  # asked to stop
            stop_process_group(process)
            break
        code = process.returncode
        print(f"tracking-server: the server exited with {code}; restart in {restart_delay_s:g} s", file=log)
        stop.wait(restart_delay_s)
    return starts


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (server, uvicorn workers), then SIGKILL what is left, and wait
    until the group's last process is gone (its port is free again)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait_s  # the leader is gone; its children may still be closing
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def healthy(url: str) -> bool:
    """True when ``url``/health answers 200 now."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, timeout_s: float = 60.0) -> bool:
    """True once ``url``/health answers 200 (for scripts and tests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(url):
            return True
        time.sleep(0.5)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a server the tests and benchmarks start)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
