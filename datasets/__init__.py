"""Datasets: the canonical Arrow format, split protocols, offline builders and the dataset import."""

from . import avdigits as _avdigits  # noqa: F401  (registers the builder)
from . import cremad as _cremad  # noqa: F401  (registers the builder)
from . import food101 as _food101  # noqa: F401  (registers the builder)
from . import kinetics_sounds as _kinetics_sounds  # noqa: F401  (registers the builder)
from . import mosi as _mosi  # noqa: F401  (registers the builder)
from . import sarcasm as _sarcasm  # noqa: F401  (registers the builder)
from . import synthetic as _synthetic  # noqa: F401  (registers the builder)
from . import twitter2015 as _twitter2015  # noqa: F401  (registers the builder)
from . import ucf101 as _ucf101  # noqa: F401  (registers the builder)
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
