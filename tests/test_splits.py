import numpy as np
import pytest

from midasbench.datasets.format import DatasetFormatError
from midasbench.datasets.splits import midas70_indices, official_indices, split_indices


def labels_of(counts):
    return np.repeat(np.arange(len(counts)), counts)


def test_midas70_is_a_stratified_70_10_20_partition():
    labels = labels_of([100, 50, 30])
    parts = midas70_indices(labels, split_seed=2)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 126, "val": 18, "test": 36}  # 180 → 70 % / 1/3 of 30 % / 2/3 of 30 %
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(180))
    for name, idx in parts.items():  # each class keeps its share in every split (±1 sample)
        share = np.bincount(labels[idx], minlength=3) / len(idx)
        assert np.allclose(share, [100 / 180, 50 / 180, 30 / 180], atol=1.5 / len(idx)), name


def test_midas70_depends_on_split_seed_only():
    labels = labels_of([40, 40])
    a = midas70_indices(labels, 2)
    b = midas70_indices(labels, 2)
    c = midas70_indices(labels, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])


def test_midas70_needs_five_samples_per_class():
    with pytest.raises(DatasetFormatError, match="at least 5 samples per class; class 1 has 3"):
        midas70_indices(labels_of([20, 3]), 0)


def test_official_uses_the_datasets_own_lists():
    parts = official_indices(np.array(["train", "test", "val", "train"]), "toy")
    assert {k: v.tolist() for k, v in parts.items()} == {"train": [0, 3], "val": [2], "test": [1]}
    with pytest.raises(
        DatasetFormatError, match=r"has no official train/val/test split; use data\.split=midas70"
    ):
        official_indices(None, "toy")
    with pytest.raises(DatasetFormatError, match=r"no \['val'\] rows"):
        official_indices(np.array(["train", "test"]), "toy")
    with pytest.raises(DatasetFormatError, match="unknown split protocol 'kfold'"):
        split_indices("kfold", np.zeros(3), None, 0, "toy")


def test_midas70_needs_room_for_every_class_in_validation():
    with pytest.raises(DatasetFormatError, match=r"10 classes need 100\); the dataset has 80"):
        midas70_indices(labels_of([8] * 10), 0)
