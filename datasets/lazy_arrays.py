"""Arrays read on demand, so that an import holds a few record batches in memory, not the dataset.

``SplitArrays`` and ``write_pool`` only ask a modality's array for ``dtype``, ``shape``, ``ndim`` and
rows by fancy index (``array[rows]``); these classes answer that without loading the whole thing:

* ``CastArray``: a memory-mapped ``.npy`` whose stored dtype differs (float64 → float32, bool → uint8),
  cast batch by batch instead of copying the whole array up front;
* ``FileRowsArray``: a folder of ``<id>.npy`` files, one row each, read when their rows are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class CastArray:
    """``source`` (e.g. a memmap) seen as ``dtype``; rows are cast when taken."""

    def __init__(self, source: np.ndarray, dtype: np.dtype) -> None:
        self.source = source if source.ndim > 1 else source.reshape(len(source), 1)
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def ndim(self) -> int:
        return self.source.ndim

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The rows, cast piece by piece (about 8 MB of source at a time) into one output array."""
        index = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(index), *self.source.shape[1:]), dtype=self.dtype)
        row_bytes = max(1, self.source.itemsize * int(np.prod(self.source.shape[1:])))
        step = max(1, 8 * 2**20 // row_bytes)
        for start in range(0, len(index), step):
            out[start : start + step] = self.source[index[start : start + step]]
        return out


class FileRowsArray:
    """Row ``i`` is the array in ``paths[i]`` (all of ``row_shape`` and ``source_dtype``, checked up
    front from their headers), stored as ``dtype``. With ``lengths`` (a variable-length modality), file
    ``i`` holds ``lengths[i]`` steps along the first axis and is zero-padded to ``row_shape[0]``."""

    def __init__(
        self,
        paths: Sequence[Path],
        row_shape: tuple[int, ...],
        source_dtype: np.dtype,
        dtype: np.dtype,
        lengths: np.ndarray | None = None,
    ) -> None:
        self.paths = list(paths)
        self.row_shape = tuple(row_shape) if row_shape else (1,)
        self.source_dtype = np.dtype(source_dtype)
        self.dtype = np.dtype(dtype)
        self.lengths = lengths

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        index = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if self.lengths is None:
            out = np.empty((len(index), *self.row_shape), dtype=self.dtype)
            for k, row in enumerate(index):
                out[k] = np.load(self.paths[row], allow_pickle=False).reshape(self.row_shape)
            return out
        out = np.zeros((len(index), *self.row_shape), dtype=self.dtype)
        for k, row in enumerate(index):
            out[k, : self.lengths[row]] = np.load(self.paths[row], allow_pickle=False)
        return out
