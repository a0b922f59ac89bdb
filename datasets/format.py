"""The canonical on-disk dataset format: ``manifest.json`` plus one Arrow IPC file per split.

Layout of a dataset directory::

    <dir>/manifest.json      name, version, modalities (dtype, shape), classes, split protocol and seed,
                             per-split row counts and id hashes, subsets, content hash
    <dir>/train.arrow        columns: sample_id (string), label (int64), one fixed-shape tensor column per
    <dir>/val.arrow          modality, and optional boolean ``subset:<name>`` columns (ground-truth masks)
    <dir>/test.arrow        each ``variable_length`` modality (sequences padded to ``shape[0]``) has an int32
                             ``length:<name>`` column: each row's valid length along the first axis

Arrow IPC files are written uncompressed so that reading is a memory map with zero-copy views into torch
(stack.md §4: 3-6 GB/s warm, against 1.2 GB/s for Parquet decode). Writes are atomic: everything goes to a
hidden temporary sibling directory, ``manifest.json`` is written last, and the directory is renamed into
place; a crash leaves no directory that reads as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLIT_NAMES = ("train", "val", "test")
SUBSET_PREFIX = "subset:"
LENGTH_PREFIX = "length:"
ID_COLUMN = "sample_id"
LABEL_COLUMN = "label"
# build_options key of a dataset of extracted encoder features (``midasbench data extract``)
FROZEN_FEATURES_KEY = "frozen_features"


class DatasetFormatError(ValueError):
    """A dataset directory or its input is malformed; the message names the file and field."""


class ModalitySpec(BaseModel):
    """One modality's per-sample tensor: dtype (numpy name) and shape, plus a free-form kind.

    ``variable_length``: each row is a sequence along its first axis, padded to ``shape[0]``, whose
    valid length is stored per row (``SplitArrays.lengths``, column ``length:<name>``); batches are
    trimmed to their longest row and encoders get the lengths, so no padding heuristic is needed."""

    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: tuple[int, ...]
    kind: str = "tensor"
    variable_length: bool = False


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    rows: int
    ids_sha256: str


class Manifest(BaseModel):
    """Everything needed to know what a dataset directory holds, and to detect if it changed."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str
    version: str
    description: str = ""
    modalities: dict[str, ModalitySpec]
    classes: list[str]
    split_protocol: str
    split_seed: int | None
    splits: dict[str, SplitInfo]
    subsets: list[str] = []
    build_options: dict[str, Any] = {}
    content_sha256: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def modality_names(self) -> list[str]:
        return list(self.modalities)


@dataclass
class SplitArrays:
    """One split held in memory, ready to be written: row ``i`` of every array is sample ``ids[i]``.
    ``lengths`` holds, for each variable-length modality, every row's valid length along its first
    axis (the rest of the row is padding)."""

    ids: np.ndarray
    labels: np.ndarray
    modalities: dict[str, np.ndarray]
    subsets: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids).astype(str)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.ids)
        if self.labels.shape != (n,):
            raise DatasetFormatError(
                f"labels have shape {self.labels.shape}, expected ({n},) to match the ids"
            )
        # a scalar per sample is stored as a shape-(1,) tensor
        self.modalities = {k: (v[:, None] if v.ndim == 1 else v) for k, v in self.modalities.items()}
        for name, arr in self.modalities.items():
            if arr.dtype == np.bool_ or arr.dtype.kind not in "biuf":
                raise DatasetFormatError(
                    f"modality {name!r} has dtype {arr.dtype}; store numbers (bool as uint8)"
                )
            if arr.shape[0] != n:
                raise DatasetFormatError(f"modality {name!r} has {arr.shape[0]} rows, expected {n}")
        for name, arr in self.subsets.items():
            if np.asarray(arr).shape != (n,):
                raise DatasetFormatError(f"subset {name!r} has shape {np.shape(arr)}, expected ({n},)")
        self.lengths = {k: np.asarray(v, dtype=np.int64) for k, v in self.lengths.items()}
        for name, lengths in self.lengths.items():
            _check_lengths(name, lengths, self.modalities.get(name), n)

    def take(self, index: np.ndarray) -> SplitArrays:
        return SplitArrays(
            ids=self.ids[index],
            labels=self.labels[index],
            modalities={k: v[index] for k, v in self.modalities.items()},
            subsets={k: np.asarray(v)[index] for k, v in self.subsets.items()},
            lengths={k: v[index] for k, v in self.lengths.items()},
        )


def concat_splits(parts: Sequence[SplitArrays]) -> SplitArrays:
    """Row-wise concatenation of pieces with the same columns (the first piece itself if it is alone)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return SplitArrays(
        ids=np.concatenate([p.ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        modalities={m: np.concatenate([p.modalities[m] for p in parts]) for m in first.modalities},
        subsets={s: np.concatenate([np.asarray(p.subsets[s]) for p in parts]) for s in first.subsets},
        lengths={m: np.concatenate([p.lengths[m] for p in parts]) for m in first.lengths},
    )


def _check_lengths(name: str, lengths: np.ndarray, values: np.ndarray | None, n: int) -> None:
    """A variable-length modality's lengths: one a row, each within 1..its padded length."""
    if values is None:
        raise DatasetFormatError(f"lengths are given for {name!r}, which is not a modality")
    if lengths.shape != (n,):
        raise DatasetFormatError(f"lengths of modality {name!r} have shape {lengths.shape}, expected ({n},)")
    if values.ndim < 2:
        raise DatasetFormatError(f"modality {name!r} has lengths but no sequence axis (shape {values.shape})")
    bad = np.nonzero((lengths < 1) | (lengths > values.shape[1]))[0]
    if len(bad):
        raise DatasetFormatError(
            f"modality {name!r}: row {int(bad[0])} has length {int(lengths[bad[0]])}, outside "
            f"1..{values.shape[1]} (the padded length)"
        )


def hash_ids(ids: Sequence[str] | np.ndarray) -> str:
    """sha256 of the newline-joined sample ids: identifies a split's membership and order."""
    digest = hashlib.sha256()
    for sample_id in ids:
        digest.update(str(sample_id).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def hash_split(digest: Any, data: SplitData) -> None:
    """Feed a written split's logical content (independent of Arrow's byte layout and of how the rows
    are cut into record batches) into ``digest``: ``split=<name>;rows=<n>``, the ids' hash, the labels
    as little-endian int64, per modality ``<name>:<dtype>:<shape>`` and its bytes, per subset
    ``subset=<name>`` and its booleans. Read chunk by chunk from the memory-mapped file, so no column is
    held in memory."""
    n = len(data.ids)
    digest.update(f"split={data.split};rows={n}\n".encode())
    digest.update(hash_ids(data.ids).encode())
    digest.update(np.ascontiguousarray(data.labels, dtype="<i8").tobytes())
    for name, column in data.columns.items():
        first = column.chunks[0]
        digest.update(f"{name}:{first.dtype.str}:{(n, *first.shape[1:])}".encode())
        for chunk in column.iter_chunks():
            digest.update(memoryview(np.ascontiguousarray(chunk)).cast("B"))
    for name in sorted(data.subsets):
        digest.update(f"subset={name}".encode())
        digest.update(np.asarray(data.subsets[name], dtype=bool).tobytes())
    for name in sorted(data.lengths):  # only variable-length datasets: older hashes are unchanged
        digest.update(f"length={name}".encode())
        digest.update(np.ascontiguousarray(data.lengths[name], dtype="<i8").tobytes())


def _tensor_array(arr: np.ndarray) -> pa.ExtensionArray:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))


def _schema(specs: Mapping[str, ModalitySpec], subset_names: Sequence[str]) -> pa.Schema:
    fields = [pa.field(ID_COLUMN, pa.string()), pa.field(LABEL_COLUMN, pa.int64())]
    for name, spec in specs.items():
        value_type = pa.from_numpy_dtype(np.dtype(spec.dtype))
        fields.append(pa.field(name, pa.fixed_shape_tensor(value_type, list(spec.shape))))
    fields += [pa.field(SUBSET_PREFIX + name, pa.bool_()) for name in subset_names]
    fields += [pa.field(LENGTH_PREFIX + name, pa.int32()) for name, s in specs.items() if s.variable_length]
    return pa.schema(fields)


def _record_batch(arrays: SplitArrays, schema: pa.Schema, modality_order: Sequence[str]) -> pa.RecordBatch:
    columns: list[pa.Array] = [
        pa.array(arrays.ids, type=pa.string()),
        pa.array(arrays.labels, type=pa.int64()),
    ]
    columns += [_tensor_array(arrays.modalities[name]) for name in modality_order]
    columns += [pa.array(np.asarray(arrays.subsets[name], dtype=bool)) for name in sorted(arrays.subsets)]
    columns += [
        pa.array(arrays.lengths[name].astype(np.int32), type=pa.int32())
        for name in modality_order
        if name in arrays.lengths
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _modality_specs(split: SplitArrays, kinds: Mapping[str, str] | None) -> dict[str, ModalitySpec]:
    kinds = kinds or {}
    specs = {}
    for name, arr in split.modalities.items():
        shape = tuple(int(s) for s in arr.shape[1:])
        specs[name] = ModalitySpec(
            dtype=arr.dtype.name,
            shape=shape,
            kind=kinds.get(name, "tensor"),
            variable_length=name in split.lengths,
        )
    return specs


def write_dataset(
    directory: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    classes: Sequence[str],
    splits: Mapping[str, SplitArrays],
    split_protocol: str,
    split_seed: int | None,
    build_options: Mapping[str, Any] | None = None,
    modality_kinds: Mapping[str, str] | None = None,
    description: str = "",
    chunk_rows: int | None = None,
    replace_existing: bool = True,
) -> Manifest:
    """Write a dataset directory atomically and return its manifest.

    ``replace_existing=False`` keeps a complete dataset that another process finished first (concurrent
    builds of the same deterministic dataset), so readers never see the directory swapped under them.

    The directory is first written under a hidden temporary sibling name; ``manifest.json`` is written
    last and the directory is then renamed into place (replacing an older version, if any). A crash at
    any point leaves either the old dataset or nothing under ``directory``.

    Record batches hold at most 64 MiB (``DatasetWriter``; ``chunk_rows`` caps their rows), so no
    column passes Arrow's 2³¹−1 elements per batch; gathers across chunks cost about what one chunk does
    (``TensorColumn``). For data that does not fit in memory, stream it with ``DatasetWriter``.
    """
    from .writer import DatasetWriter

    missing = [s for s in SPLIT_NAMES if s not in splits]
    if missing:
        raise DatasetFormatError(f"dataset {name!r}: splits {missing} are missing; need {list(SPLIT_NAMES)}")
    first = splits["train"]
    with DatasetWriter(
        directory,
        name=name,
        version=version,
        classes=classes,
        modalities=_modality_specs(first, modality_kinds),
        subsets=sorted(first.subsets),
        description=description,
        build_options=build_options,
        max_batch_rows=chunk_rows,
        replace_existing=replace_existing,
    ) as writer:
        for split_name in SPLIT_NAMES:
            with writer.split(split_name) as out:
                out.append(splits[split_name])
        return writer.finish(split_protocol=split_protocol, split_seed=split_seed)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_directory(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    trash = None
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
    os.replace(source, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``manifest.json``; a directory without one is incomplete and is refused."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: not found; {directory} is not a complete midasbench dataset "
            "(was it written by an interrupted build? rebuild it)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: not valid JSON ({exc})") from exc
    if raw.get("format_version") != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: field 'format_version' is {raw.get('format_version')!r}, this midasbench reads "
            f"{FORMAT_VERSION}"
        )
    try:
        return Manifest.model_validate(raw)
    except Exception as exc:
        raise DatasetFormatError(f"{path}: invalid manifest: {exc}") from exc


class TensorColumn:
    """A modality column as zero-copy numpy views over the memory-mapped Arrow chunks.

    ``gather`` copies only the requested rows. A file written in many record batches has one buffer per
    chunk, all inside the same memory map: with ``file_bytes`` (a uint8 view of the whole map) a gather
    is one fancy index over a strided view of the file (row ``p`` = the row starting at unit ``p``),
    whatever the number of chunks, so a many-chunk file reads about as fast as a one-chunk one
    (``benchmarks/bench_arrow_gather.py``).
    """

    def __init__(self, chunks: list[np.ndarray], file_bytes: np.ndarray | None = None) -> None:
        self.chunks = chunks
        sizes = [len(c) for c in chunks]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._rows = _row_windows(chunks, file_bytes) if len(chunks) > 1 else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, index: np.ndarray) -> np.ndarray:
        if len(self.chunks) == 1:
            return np.take(self.chunks[0], index, axis=0)
        first = self.chunks[0]
        if self._rows is not None:  # two numpy calls whatever the chunks: where each row starts, then copy
            windows, row_start = self._rows
            return windows[row_start[index]].view(first.dtype).reshape(len(index), *first.shape[1:])
        index = np.asarray(index, dtype=np.int64)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
        for chunk_id in np.unique(which):
            rows = np.nonzero(which == chunk_id)[0]
            out[rows] = self.chunks[chunk_id][index[rows] - self.offsets[chunk_id]]
        return out

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """The column's chunks in order (zero-copy views): for passes that must not hold it all."""
        return iter(self.chunks)

    def to_numpy(self) -> np.ndarray:
        """The whole column; zero-copy when it is one chunk (read-only memory map)."""
        if len(self.chunks) == 1:
            return self.chunks[0]
        return np.concatenate(self.chunks)


def _row_windows(
    chunks: list[np.ndarray], file_bytes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """A strided view of the file whose row ``p`` is the ``row_bytes`` bytes starting at unit ``p`` (the
    widest of 8, 4, 2, 1 bytes that divides the row size and every chunk's offset in the file), and
    each dataset row's unit position in it (8 bytes a row); None if a chunk lies outside the map (then
    ``gather`` falls back to a per-chunk loop)."""
    if file_bytes is None or not all(c.flags.c_contiguous for c in chunks):
        return None
    row_bytes = chunks[0].itemsize * int(np.prod(chunks[0].shape[1:]))
    address = file_bytes.ctypes.data
    starts = np.array([c.ctypes.data - address for c in chunks], dtype=np.int64)
    size = len(file_bytes)
    ends = starts + np.array([c.nbytes for c in chunks], dtype=np.int64)
    if row_bytes <= 0 or size < row_bytes or np.any(starts < 0) or np.any(ends > size):
        return None
    unit = next(u for u in (8, 4, 2, 1) if row_bytes % u == 0 and not np.any(starts % u) and address % u == 0)
    units = file_bytes[: size - size % unit].view(np.dtype(f"u{unit}"))
    row_units = row_bytes // unit
    windows = np.lib.stride_tricks.as_strided(
        units, shape=(len(units) - row_units + 1, row_units), strides=(unit, unit), writeable=False
    )
    row_start = np.concatenate(
        [
            start // unit + np.arange(len(c), dtype=np.int64) * row_units
            for start, c in zip(starts, chunks, strict=True)
        ]
    )
    return windows, row_start


class SplitData:
    """One split of a dataset, memory-mapped: ids, labels, per-modality tensor columns, subset masks."""

    def __init__(self, path: Path, manifest: Manifest, split: str) -> None:
        self.path = path
        self.split = split
        source = pa.memory_map(str(path), "r")
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as exc:
            raise DatasetFormatError(f"{path}: not a readable Arrow IPC file ({exc})") from exc
        expected = manifest.splits[split].rows
        if table.num_rows != expected:
            raise DatasetFormatError(
                f"{path}: has {table.num_rows} rows but manifest field splits.{split}.rows says {expected}"
            )
        for column in [ID_COLUMN, LABEL_COLUMN, *manifest.modalities]:
            if column not in table.column_names:
                raise DatasetFormatError(f"{path}: column {column!r} is missing")
        self.ids = np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=str)
        self.labels = table.column(LABEL_COLUMN).to_numpy()
        self.columns: dict[str, TensorColumn] = {}
        source.seek(0)
        file_bytes = np.frombuffer(source.read_buffer(), dtype=np.uint8)  # the whole map, zero-copy
        for name, spec in manifest.modalities.items():
            views = [_chunk_view(chunk, spec, path, name) for chunk in table.column(name).chunks]
            if not views:
                views = [np.empty((0, *spec.shape), dtype=spec.dtype)]
            self.columns[name] = TensorColumn(views, file_bytes)
        self.subsets = {
            name: table.column(SUBSET_PREFIX + name).to_numpy(zero_copy_only=False).astype(bool)
            for name in manifest.subsets
        }
        self.lengths: dict[str, np.ndarray] = {}
        for name, spec in manifest.modalities.items():
            if spec.variable_length:
                if LENGTH_PREFIX + name not in table.column_names:
                    raise DatasetFormatError(f"{path}: column {LENGTH_PREFIX + name!r} is missing")
                column = table.column(LENGTH_PREFIX + name).to_numpy(zero_copy_only=False)
                self.lengths[name] = column.astype(np.int64)
        self._source = source  # keeps the memory map alive as long as the views

    def __len__(self) -> int:
        return len(self.labels)


def _chunk_view(chunk: pa.Array, spec: ModalitySpec, path: Path, name: str) -> np.ndarray:
    storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    values = storage.flatten().to_numpy(zero_copy_only=True)
    if values.dtype != np.dtype(spec.dtype):
        raise DatasetFormatError(f"{path}: column {name!r} holds {values.dtype}, manifest says {spec.dtype}")
    return values.reshape(len(chunk), *spec.shape)


class ArrowDataset:
    """A complete dataset directory: its manifest and its three splits (opened lazily)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self._splits: dict[str, SplitData] = {}

    def split(self, name: str) -> SplitData:
        if name not in self.manifest.splits:
            raise DatasetFormatError(f"{self.directory}: no split {name!r}; has {list(self.manifest.splits)}")
        if name not in self._splits:
            info = self.manifest.splits[name]
            self._splits[name] = SplitData(self.directory / info.file, self.manifest, name)
        return self._splits[name]

    def verify(self) -> None:
        """Recompute the content hash from the files (chunk by chunk) and compare it with the manifest."""
        digest = hashlib.sha256()
        for split_name in SPLIT_NAMES:
            data = self.split(split_name)
            if hash_ids(data.ids) != self.manifest.splits[split_name].ids_sha256:
                raise DatasetFormatError(f"{data.path}: sample ids do not match manifest splits.{split_name}")
            hash_split(digest, data)
        if digest.hexdigest() != self.manifest.content_sha256:
            raise DatasetFormatError(
                f"{self.directory / MANIFEST_NAME}: field 'content_sha256' does not match the data files"
            )


def as_torch(array: np.ndarray) -> Any:
    """``torch.from_numpy`` without the read-only warning: memory-mapped views are never written to."""
    import torch

    if array.flags.writeable:  # gathered batches are private copies
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
