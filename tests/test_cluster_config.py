"""The cluster-launcher configs are what `ray up` accepts: cluster.yaml (AWS, GPU workers) and
examples/cluster-onprem.yaml (local provider). Each is checked against the schema Ray ships, then prepared
and validated as `ray up` does (`prepare_config` merges the provider's defaults and, for `local`, builds
the node type; `validate_config` checks the result); both run offline. Their shell commands must parse."""

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "examples/cluster-onprem.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _commands(config: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [cmd for key in keys for cmd in config.get(key, [])]


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_is_what_ray_up_accepts(name):
    config = _load(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    for command in _commands(config):
        assert isinstance(command, str), f"{name}: a command became YAML structure: {command!r}"
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {command!r}: {check.stderr}"


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_installs_midasbench_and_starts_the_mlflow_server(name):
    config = _load(name)
    (synced,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    synced = synced.replace("/home/ubuntu", "~")
    install = [c for c in config["setup_commands"] if "pip install" in c and "-e " in c]
    assert install, "setup_commands install midasbench"
    assert f"-c {synced}/constraints.txt" in install[0] and f"-e {synced}" in install[0]
    assert "ray[default]" in install[0]  # the autoscaler and the job server run on the nodes
    (server,) = [c for c in config["head_start_ray_commands"] if "midasbench tracking-server" in c]
    assert "--port 5000" in server and "--backend-store-uri postgresql://" in server
    sizes = {k: int(v) for k, v in re.findall(r"(MIDASBENCH_\w+|MLFLOW_SQLALCHEMYSTORE_\w+)=(\d+)", server)}
    pools = sizes["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] + sizes["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]
    # issue 14: the server's pools together stay under the database's connections, which setup raises to
    assert sizes["MIDASBENCH_MLFLOW_WORKERS"] * pools < sizes["MIDASBENCH_DB_MAX_CONNECTIONS"]
    head_setup = " ".join(config["head_setup_commands"])
    assert "install -y -q postgresql" in head_setup and "psycopg[binary]" in head_setup
    assert f"max_connections = {sizes['MIDASBENCH_DB_MAX_CONNECTIONS']}" in head_setup
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_aws_cluster_has_a_cpu_head_with_trial_slots_and_autoscaled_gpu_workers():
    config = prepare_config(_load("cluster.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("trial_slot", 0) >= 1 and not head["resources"].get("GPU")
    gpu_types = [
        t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")
    ]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)
    assert sum(t["min_workers"] for t in gpu_types) >= 1  # a sweep checks its trials fit what is up


def test_onprem_cluster_starts_one_worker_per_address_and_a_head_with_trial_slots():
    raw = _load("examples/cluster-onprem.yaml")
    config = prepare_config(copy.deepcopy(raw))
    (node_type,) = config["available_node_types"].values()  # Ray's single local node type
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])
    (start,) = [c for c in raw["head_start_ray_commands"] if "ray start --head" in c]
    (resources,) = re.findall(r"--resources=(\S+)", start)
    assert json.loads(shlex.split(resources)[0])["trial_slot"] >= 1
