"""cluster.yaml is a valid Ray cluster-launcher config (checked against the schema Ray ships)."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema_and_installs_midasbench():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert any(t["resources"].get("GPU") for t in config["available_node_types"].values())
    assert any("midasbench" in cmd for cmd in config["setup_commands"])
