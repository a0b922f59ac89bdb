"""The README's "Adding a method" example runs as written: it trains, keeps its coefficient identical on
every rank through the runtime, and its requirement refuses a non-decomposable head."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from midasbench.harness.errors import ConfigError
from midasbench.harness.training.trainer import train
from midasbench.methods import METHODS, base

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README's 'Adding a method' section has no python example"
    return code.group(1).replace("from .base import", "from midasbench.methods.base import")


@pytest.fixture
def example_method(monkeypatch):
    def register_only_here(name):
        def decorator(cls):
            cls.name = name
            return cls

        return decorator

    monkeypatch.setattr(base, "register_method", register_only_here)
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    cls = namespace["GradientScaling"]
    with METHODS.temporarily(cls.name, cls):
        yield cls


def test_the_readme_example_method_trains_and_refuses_film(example_method, tiny_config):
    result = train(tiny_config(f"method.name={example_method.name}", "train.epochs=2"))
    assert result.best_epoch >= 0 and 0 < result.test["acc"] <= 1
    with pytest.raises(ConfigError, match="needs a decomposable fusion head"):
        tiny_config(f"method.name={example_method.name}", "model.fusion.name=film")
