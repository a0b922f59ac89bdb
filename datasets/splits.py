"""Split protocols: ``official`` (the dataset's own lists) and ``midas70`` (the MIDAS paper's re-split).

``midas70`` follows the MIDAS code (datasets.md §1.1): pool every available split, then two stratified
``train_test_split`` calls with ``random_state=split_seed`` -- 70 % train vs 30 %, then the 30 % into 1/3
validation and 2/3 test. Unlike the MIDAS code, the split seed is a separate setting from the init seed,
so that several init seeds can share one split.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .format import SPLIT_NAMES, DatasetFormatError

SplitProtocol = Literal["official", "midas70"]
SPLIT_PROTOCOLS: tuple[str, ...] = ("official", "midas70")


def midas70_indices(labels: np.ndarray, split_seed: int) -> dict[str, np.ndarray]:
    """Stratified 70/10/20 split of ``range(len(labels))``; each split's indices are sorted."""
    labels = np.asarray(labels)
    index = np.arange(len(labels))
    counts = np.bincount(labels) if len(labels) else np.array([])
    if len(counts) and counts[counts > 0].min() < 5:
        # Two stratified cuts need at least one sample of each class in each of 3 parts.
        smallest = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        raise DatasetFormatError(
            f"split 'midas70' needs at least 5 samples per class; "
            f"class {smallest} has {int(counts[smallest])}"
        )
    if len(labels) * 0.1 < len(counts[counts > 0]):
        # the validation part (10 %) must hold at least one sample of every class
        raise DatasetFormatError(
            f"split 'midas70' needs at least 10 samples per class in all ({len(counts[counts > 0])} classes "
            f"need {10 * len(counts[counts > 0])}); the dataset has {len(labels)}"
        )
    from sklearn.model_selection import train_test_split  # only when a split is made, not to read a config

    train, rest = train_test_split(index, test_size=0.3, stratify=labels, random_state=split_seed)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=labels[rest], random_state=split_seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def official_indices(official_split: np.ndarray | None, dataset: str) -> dict[str, np.ndarray]:
    """Indices of the dataset's own train/val/test lists, given a per-sample split name."""
    if official_split is None:
        raise DatasetFormatError(
            f"dataset {dataset!r} has no official train/val/test split; use data.split=midas70"
        )
    official_split = np.asarray(official_split).astype(str)
    unknown = sorted(set(official_split) - set(SPLIT_NAMES))
    if unknown:
        raise DatasetFormatError(
            f"dataset {dataset!r}: unknown split names {unknown}; allowed {list(SPLIT_NAMES)}"
        )
    out = {name: np.nonzero(official_split == name)[0] for name in SPLIT_NAMES}
    empty = [name for name, idx in out.items() if len(idx) == 0]
    if empty:
        raise DatasetFormatError(
            f"dataset {dataset!r}: the official split has no {empty} rows; use data.split=midas70"
        )
    return out


def split_indices(
    protocol: str, labels: np.ndarray, official_split: np.ndarray | None, split_seed: int, dataset: str
) -> dict[str, np.ndarray]:
    if protocol == "midas70":
        return midas70_indices(labels, split_seed)
    if protocol == "official":
        return official_indices(official_split, dataset)
    raise DatasetFormatError(f"unknown split protocol {protocol!r}; allowed {list(SPLIT_PROTOCOLS)}")
