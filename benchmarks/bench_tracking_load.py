"""Tracking under load (issue 14): K concurrent writer processes log through the project's tracker to one
``mlflow server``, as a cluster sweep's trials do; stored against sent rows, errors, wall time.

Each writer is a process that starts a run with 60 params, then logs ``--epochs`` epochs of 40 metrics
(one ``log_metrics`` call per epoch, ``--interval`` seconds apart) through ``MlflowTracker`` (journal in
its own folder) and ends the run. The server is ``midasbench tracking-server``'s command on a loopback
port (``--workers``, ``--pool-size`` and ``--max-overflow`` as on the cluster), started fresh for each K,
on a fresh sqlite file or (``--backend postgresql``) a fresh database of a PostgreSQL of the benchmark's
own (``harness/tracking/postgres.py``, ``max_connections`` 300 as on the cluster's head). ``--restart``
kills the server once, a third of the way in, and starts it again after two seconds. Afterwards every
run is read back: a writer that exited non-zero is an error, a run not FINISHED or missing rows is a loss.

Goal: nothing lost, no writer failed, for every K.

    .venv/bin/python benchmarks/bench_tracking_load.py [--writers 8,32,64] [--epochs 70] [--interval 0.05]
        [--workers 2] [--pool-size 5] [--max-overflow 10] [--restart] [--backend sqlite|postgresql]

The cluster's configuration: ``--backend postgresql --workers 4 --pool-size 20 --max-overflow 20``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench_support import Row, finish, print_table

MAX_CONNECTIONS = 300  # PostgreSQL's on the cluster's head (cluster.yaml); the sizing is checked against it

WRITER = """
import sys, time
from pathlib import Path
from midasbench.harness.tracking import MlflowTracker
uri, folder, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
epochs, interval = int(sys.argv[4]), float(sys.argv[5])
tracker = MlflowTracker(uri, "load", folder, "fp", flush_timeout_s=600)
tracker.start(name, {f"param{i}": str(i) for i in range(60)}, {"writer": name}, None)
for epoch in range(epochs):
    tracker.log_metrics({f"metric{k}": epoch + k / 100 for k in range(40)}, epoch)
    time.sleep(interval)
tracker.end("FINISHED")
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", default="8,32,64", help="comma-separated K (default 8,32,64)")
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between a writer's epochs")
    parser.add_argument("--workers", type=int, default=2, help="server workers (default 2)")
    parser.add_argument("--pool-size", type=int, default=5, help="SQLAlchemy pool per worker (default 5)")
    parser.add_argument("--max-overflow", type=int, default=10, help="overflow per worker (default 10)")
    parser.add_argument("--restart", action="store_true", help="kill and restart the server mid-run")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    return parser.parse_args(argv)


def start_server(root: Path, backend: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    from midasbench.harness.tracking.server import ServerSizing, server_command, wait_healthy

    sizing = ServerSizing(args.workers, args.pool_size, args.max_overflow, max_connections=MAX_CONNECTIONS)
    sizing.check()
    command = server_command(backend, str(root / "artifacts"), "127.0.0.1", port, args.workers)
    env = {**os.environ, **sizing.environment(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (root / "server.log").open("ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    if not wait_healthy(f"http://127.0.0.1:{port}", timeout_s=120):
        raise SystemExit(f"mlflow server did not come up; see {root / 'server.log'}")
    return process


def kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def one_load(k: int, args: argparse.Namespace, postgres: Any) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from midasbench.harness.tracking.server import free_port

    root = Path(tempfile.mkdtemp(prefix=f"bench-tracking-{k}-"))
    if postgres is None:
        backend = f"sqlite:///{root / 'srv.db'}"
    else:
        postgres.create_database(f"load_{k}_{root.name[-8:]}")
        backend = postgres.url(f"load_{k}_{root.name[-8:]}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(root, backend, port, args)
    start = time.perf_counter()
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                url,
                str(root / f"w{i}"),
                f"w{i}",
                str(args.epochs),
                str(args.interval),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(k)
    ]
    if args.restart:
        time.sleep(max(5.0, args.epochs * args.interval / 3))
        kill(server)
        time.sleep(2.0)
        server = start_server(root, backend, port, args)
    errors = sum(w.wait() != 0 for w in writers)
    seconds = time.perf_counter() - start
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id], max_results=10_000)
    stored = sum(len(client.get_metric_history(r.info.run_id, f"metric{j}")) for r in runs for j in range(40))
    params = sum(len(r.data.params) for r in runs)
    unfinished = sum(r.info.status != "FINISHED" for r in runs)
    kill(server)
    return {
        "sent": k * args.epochs * 40,
        "stored": stored,
        "params": params,
        "runs": len(runs),
        "unfinished": unfinished,
        "errors": errors,
        "seconds": seconds,
    }


def local_postgres() -> Any:
    """A PostgreSQL of the benchmark's own in a temporary folder the server's user may enter."""
    from midasbench.harness.tracking.postgres import LocalPostgres
    from midasbench.harness.tracking.server import free_port

    root = Path(tempfile.mkdtemp(prefix="bench-tracking-pg-"))
    root.chmod(0o755)
    postgres = LocalPostgres(root / "data", port=free_port(), max_connections=MAX_CONNECTIONS)
    postgres.ensure_running("postgres")
    return postgres


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    postgres = local_postgres() if args.backend == "postgresql" else None
    rows = []
    try:
        for k in (int(x) for x in args.writers.split(",")):
            rows.append(one_row(k, args, postgres))
    finally:
        if postgres is not None:
            postgres.stop()
    restart = ", server killed and restarted mid-run" if args.restart else ""
    print_table(
        f"tracking load: {args.epochs} epochs x 40 metrics per writer; server --workers {args.workers}, "
        f"pool {args.pool_size} + {args.max_overflow}, {args.backend}{restart}",
        rows,
    )
    return finish(rows)


def one_row(k: int, args: argparse.Namespace, postgres: Any) -> Row:
    r = one_load(k, args, postgres)
    print(f"K = {k}: {r}", flush=True)
    lost = r["sent"] - r["stored"]
    ok = lost == 0 and r["errors"] == 0 and r["unfinished"] == 0 and r["runs"] == k and r["params"] == 60 * k
    return Row(
        f"K = {k}: rows stored / sent, params, runs not FINISHED, writers failed, wall",
        value=f"{r['stored']:,} / {r['sent']:,}, {r['params']:,}, {r['unfinished']}, {r['errors']}, "
        f"{r['seconds']:.0f} s",
        goal="nothing lost, no failure",
        ok=ok,
    )


if __name__ == "__main__":
    sys.exit(main())
