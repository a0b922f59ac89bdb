"""The distribution installs one top-level package, ``midasbench``, so nothing shadows Hugging Face's
``datasets`` (our ``datasets/`` folder installs as ``midasbench.datasets``)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("midasbench-*.whl")
    return path


def test_wheel_holds_only_the_midasbench_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"midasbench", next(t for t in top if t.endswith(".dist-info"))}
    for sub in ("harness", "methods", "datasets", "analysis"):
        assert f"midasbench/{sub}/__init__.py" in names
    assert "midasbench/harness/presets/synthetic.yaml" in names  # presets ship as package data
    assert not any(n.startswith("midasbench/tests") for n in names)


def test_hugging_face_datasets_name_is_not_taken():
    import midasbench.datasets

    assert "datasets" not in sys.modules or not sys.modules["datasets"].__file__.startswith(str(ROOT))
    assert midasbench.datasets.__name__ == "midasbench.datasets"
