import numpy as np
import pytest

from midasbench.datasets import ArrowDataset, build_dataset
from midasbench.datasets.format import DatasetFormatError
from midasbench.datasets.synthetic import SyntheticOptions, generate_split


def test_generator_is_deterministic_and_seeded():
    opts = SyntheticOptions(train_size=50, val_size=10, test_size=10)
    a, b = generate_split(opts, 0, 50), generate_split(opts, 0, 50)
    np.testing.assert_array_equal(a.modalities["strong"], b.modalities["strong"])
    np.testing.assert_array_equal(a.labels, b.labels)
    c = generate_split(SyntheticOptions(seed=1), 0, 50)
    assert not np.array_equal(a.modalities["strong"], c.modalities["strong"])


def test_mask_fractions_match_drop_and_flip():
    opts = SyntheticOptions()  # strong: drop 0.25; weak: flip 0.1
    split = generate_split(opts, 0, 20000)
    assert abs(1 - split.subsets["informative_strong"].mean() - 0.25) < 0.015
    assert abs(1 - split.subsets["informative_weak"].mean() - 0.10) < 0.01
    only_weak = split.subsets["informative_weak"] & ~split.subsets["informative_strong"]
    np.testing.assert_array_equal(split.subsets["only_weak"], only_weak)
    assert abs(split.subsets["only_weak"].mean() - 0.25 * 0.9) < 0.015  # independent events


def test_dropped_samples_carry_no_class_signal():
    opts = SyntheticOptions(
        modalities=[
            {"name": "a", "dim": 8, "separation": 50.0, "drop": 0.5},
            {"name": "b", "dim": 4, "separation": 1.0},
        ]
    )
    split = generate_split(opts, 0, 4000)
    x, informative = split.modalities["a"], split.subsets["informative_a"]
    # informative samples sit far from the origin (|mean| = 50), dropped ones are unit noise
    norms = np.linalg.norm(x, axis=1)
    assert norms[informative].min() > 30 and norms[~informative].max() < 10


def test_three_modalities_and_option_errors(tmp_path):
    opts = {
        "modalities": [
            {"name": "a", "dim": 4, "separation": 3.0},
            {"name": "b", "dim": 4, "separation": 2.0},
            {"name": "c", "dim": 4, "separation": 1.0, "drop": 0.5},
        ],
        "train_size": 60,
        "val_size": 20,
        "test_size": 20,
        "num_classes": 3,
    }
    ds = ArrowDataset(build_dataset("synthetic", root=tmp_path, split="official", options=opts))
    assert ds.manifest.modality_names == ["a", "b", "c"]
    assert "only_c" in ds.manifest.subsets
    with pytest.raises(DatasetFormatError, match=r"modalities\.0\.drop"):
        build_dataset(
            "synthetic",
            root=tmp_path,
            options={"modalities": [{"name": "a", "dim": 2, "separation": 1, "drop": 2}]},
        )
    with pytest.raises(DatasetFormatError, match="unique"):
        build_dataset(
            "synthetic",
            root=tmp_path,
            options={
                "modalities": [
                    {"name": "a", "dim": 2, "separation": 1},
                    {"name": "a", "dim": 2, "separation": 1},
                ]
            },
        )


def test_builds_are_cached_by_options_and_split(tmp_path):
    p1 = build_dataset("synthetic", root=tmp_path, split="midas70", options={"train_size": 100})
    p2 = build_dataset("synthetic", root=tmp_path, split="midas70", options={"train_size": 100})
    p3 = build_dataset("synthetic", root=tmp_path, split="midas70", split_seed=3, options={"train_size": 100})
    assert p1 == p2 != p3
    m = ArrowDataset(p3).manifest
    assert (m.split_protocol, m.split_seed) == ("midas70", 3)
    assert sum(s.rows for s in m.splits.values()) == 100 + 1000 + 3000
