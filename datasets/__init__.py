"""Datasets: the canonical Arrow format, split protocols, offline builders and the dataset import.

The builders (``synthetic``, ``avdigits`` and the paper's seven) register themselves when ``DATASETS`` is
first read (``builders.BUILDER_MODULES``), not when this package is imported: reading a config or a
dataset's manifest does not import their decoders (scipy, PyAV, ...)."""

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
