"""Datasets: the canonical Arrow format, split protocols, offline builders and the dataset import."""

from . import avdigits as _avdigits  # noqa: F401  (registers the builder)
from . import synthetic as _synthetic  # noqa: F401  (registers the builder)
from .builders import DATASETS, build_dataset, default_data_root, resolve_dataset
from .format import ArrowDataset, DatasetFormatError, Manifest, SplitArrays, write_dataset

__all__ = [
    "DATASETS",
    "ArrowDataset",
    "DatasetFormatError",
    "Manifest",
    "SplitArrays",
    "build_dataset",
    "default_data_root",
    "resolve_dataset",
    "write_dataset",
]
