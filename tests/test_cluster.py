"""A sweep on a real two-node Ray cluster: two `ray start` nodes on this machine (1 CPU each, own temp
dirs), shared storage in a temporary folder, the sweep driver in its own process (`midasbench sweep
--address`), as on a cluster. The trials must run on both nodes and log one MLflow child run each.

Ray clusters started with `ray start` outlive their driver and ignore SIGTERM for a while (stack.md §8.8),
and `ray stop` would kill every Ray process on the machine: each node here is started with `--block` in its
own session, and teardown SIGKILLs every process of those two sessions (Ray's workers get their own process
groups, but stay in the session). Each node has its own `--temp-dir`, so the cluster address is written
there and not to /tmp/ray/ray_current_cluster, which would take over later `ray.init()` calls (§8.2)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from midasbench.harness.sweeps.sweep import SWEEP_TAG, TRIAL_TAG
from midasbench.harness.tracking.server import free_port

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the node processes in /proc"),
]

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60
SWEEP_TIMEOUT_S = 240
STARTED = "Ray runtime started"


def _session_pids(sid: int) -> list[int]:
    """Every live process whose session id is ``sid`` (read from /proc/<pid>/stat)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _kill_session(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pids = _session_pids(process.pid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.poll()  # reap the leader
        time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--block"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while STARTED not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_session(process)
            pytest.fail(
                f"ray start {' '.join(args)} did not start:\n{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.2)
    return process


def _forget_address(port: int) -> None:
    """Remove a `ray_current_cluster` file only if it names this test's cluster (stack.md §8.2)."""
    default = Path(os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
    for path in {default, Path("/tmp/ray/ray_current_cluster")}:
        try:
            if path.read_text().strip().endswith(f":{port}"):
                path.unlink()
        except OSError:
            pass


def _alive_node_ids(address: str, env: dict[str, str], expect: int) -> list[str]:
    """The cluster's alive node ids, read by a separate driver (this process may hold another Ray)."""
    script = (
        "import json, time, ray\n"
        f"ray.init(address={address!r}, log_to_driver=False, logging_level='error')\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    ids = sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])\n"
        f"    if len(ids) >= {expect} or time.monotonic() > deadline:\n"
        "        break\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps(ids))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, f"could not connect to {address}:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head (1 CPU, 2 trial_slot) and a worker node (1 CPU). Yields ``(address, node_ids, env, root)``."""
    root = tmp_path_factory.mktemp("cluster")
    # Ray's unix sockets live under --temp-dir and must fit in 107 bytes: keep it short
    ray_tmp = Path(tempfile.mkdtemp(prefix="mbray-", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(
        RAY_AUTH_MODE="disabled",  # stack.md §8.1: clients connect by explicit address
        RAY_USAGE_STATS_ENABLED="0",
        MIDASBENCH_DATA=str(root / "data"),  # the driver's data root, and the trials' (from their node)
    )
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 2**20)]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            _start_node(
                [
                    "--head",
                    "--port",
                    str(port),
                    "--resources",
                    json.dumps({"trial_slot": 2}),
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    "--temp-dir",
                    str(ray_tmp / "head"),
                    *common,
                ],
                root / "head.log",
                env,
            )
        )
        nodes.append(
            _start_node(
                [
                    "--address",
                    address,
                    "--dashboard-agent-listen-port",
                    str(free_port()),
                    "--temp-dir",
                    str(ray_tmp / "worker"),
                    *common,
                ],
                root / "worker.log",
                env,
            )
        )
        node_ids = _alive_node_ids(address, env, expect=2)
        assert len(node_ids) == 2, f"the cluster has nodes {node_ids}, expected 2"
        yield address, node_ids, env, root
    finally:
        for process in reversed(nodes):
            _kill_session(process)
        _forget_address(port)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_sweep_runs_its_trials_on_both_nodes_of_a_cluster(two_node_cluster, tiny_options):
    address, node_ids, env, root = two_node_cluster

    uri = f"sqlite:///{root / 'mlflow.db'}"
    sweep_file = root / "two_nodes.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "two-nodes",
                "base": "synthetic",
                "overrides": [
                    f"data.options={json.dumps(tiny_options)}",
                    "model.default_encoder.params={hidden: [16], out_dim: 8}",
                    "train.epochs=2",
                    "train.batch_size=32",
                    "train.num_threads=1",
                ],
                "grid": {"train.seed": [0, 1, 2, 3]},
                "resources": {"cpus_per_trial": 1},  # one trial at a time on each 1-CPU node
                "storage": str(root / "shared"),  # the shared folder every node sees
            }
        )
    )
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "midasbench"), "sweep", str(sweep_file), "--address", address, "--tracking-uri", uri],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=SWEEP_TIMEOUT_S,
    )
    output = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "| Method | synthetic Acc" in result.stdout, output  # the sweep prints its table
    print(f"sweep on two nodes: {time.monotonic() - started:.1f} s")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("two-nodes")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`midasbench.sweep_parent` = 'true'")
    assert parent.data.tags[SWEEP_TAG] == "two-nodes" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children), output
    assert len({r.data.tags[TRIAL_TAG] for r in children}) == 4
    used = {r.data.tags["ray.node_id"] for r in children}
    assert used == set(node_ids), f"trials ran on {used}, the cluster's nodes are {node_ids}"
    assert list((root / "data").iterdir()), "the data is built under $MIDASBENCH_DATA, not in ~/.cache"
    assert (root / "shared" / "two-nodes" / "checkpoints").is_dir()
