"""The example sweep files expand into valid trials, and the baselines sweep holds every registered method."""

from pathlib import Path

import pytest

from midasbench.harness.sweeps.sweep import expand, load_sweep
from midasbench.methods import METHODS

EXAMPLES = Path(__file__).parents[1] / "examples"
# registry names that are variants of a method the sweep already runs (same file, other defaults)
VARIANTS = {"midas-code", "midas-paper"}


@pytest.mark.parametrize("name", ["sweep_synthetic.yaml", "sweep_baselines.yaml", "sweep_frozen_heads.yaml"])
def test_example_sweeps_expand(name):
    assert expand(load_sweep(EXAMPLES / name), name).trials


def test_the_baselines_sweep_runs_every_method_on_both_offline_datasets_with_three_seeds():
    plan = expand(load_sweep(EXAMPLES / "sweep_baselines.yaml"))
    methods = {t.config["method"]["name"] for t in plan.trials}
    assert methods == set(METHODS.names()) - VARIANTS
    for dataset in ("synthetic", "avdigits"):
        for method in methods:
            seeds = [
                t.config["train"]["seed"]
                for t in plan.trials
                if t.config["data"]["name"] == dataset and t.config["method"]["name"] == method
            ]
            assert sorted(set(seeds)) == [0, 1, 2], (dataset, method)
