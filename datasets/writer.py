"""Streaming writes of the canonical format: samples go to disk as they arrive, in record batches of
bounded bytes, so a build's memory stays a few batches whatever the dataset's size (issue 9).

A ``DatasetWriter`` writes under a hidden temporary sibling directory; each split is an Arrow IPC file
of record batches of at most ``max_batch_bytes`` (and never more than 2³¹−1 tensor elements, Arrow's
limit per batch); ``finish`` hashes every split back from its memory-mapped file, writes
``manifest.json`` last and renames the directory into place. A crash or an error at any point leaves
the old dataset or nothing, as ``write_dataset`` always did::

    with DatasetWriter(path, name="x", version="1", classes=names, modalities=specs) as writer:
        for split in ("train", "val", "test"):
            with writer.split(split) as out:
                for rows in source(split):        # any number of rows at a time
                    out.append(rows)              # a SplitArrays
        manifest = writer.finish(split_protocol="official", split_seed=None)
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

from .format import (
    MANIFEST_NAME,
    SPLIT_NAMES,
    DatasetFormatError,
    Manifest,
    ModalitySpec,
    SplitArrays,
    SplitData,
    SplitInfo,
    _fsync,
    _record_batch,
    _replace_directory,
    _schema,
    concat_splits,
    hash_split,
    read_manifest,
)

DEFAULT_MAX_BATCH_BYTES = 64 * 2**20
ARROW_MAX_ELEMENTS = 2**31 - 1  # elements of one tensor column in one record batch


class SplitWriter:
    """Appends rows to one split's Arrow file, cutting record batches at ``max_rows`` rows."""

    def __init__(self, path: Path, writer: DatasetWriter, name: str) -> None:
        self.path = path
        self.name = name
        self._owner = writer
        self._sink = pa.OSFile(str(path), "wb")
        self._ipc = pa.ipc.new_file(self._sink, writer.schema)
        self._pending: list[SplitArrays] = []
        self._pending_rows = 0
        self.rows = 0
        self.ids_digest = hashlib.sha256()

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._abort()

    def append(self, rows: SplitArrays) -> None:
        """Add rows (checked against the writer's modalities, classes and subsets first)."""
        self._owner.check(rows, self.name)
        for sample_id in rows.ids:
            self.ids_digest.update(str(sample_id).encode())
            self.ids_digest.update(b"\n")
        self._pending.append(rows)
        self._pending_rows += len(rows.ids)
        self.rows += len(rows.ids)
        while self._pending_rows >= self._owner.max_rows:
            self._flush(self._owner.max_rows)

    def _flush(self, count: int) -> None:
        """Write the first ``count`` pending rows as one record batch."""
        merged = concat_splits(self._pending)
        if count == len(merged.ids):  # the usual case (pieces of a batch's size): no copy
            head, tail = merged, merged.take(np.arange(0))
        else:
            head, tail = merged.take(np.arange(count)), merged.take(np.arange(count, len(merged.ids)))
        self._ipc.write_batch(_record_batch(head, self._owner.schema, self._owner.modality_order))
        self._pending = [tail] if len(tail.ids) else []
        self._pending_rows = len(tail.ids)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._ipc.close()
        self._sink.close()
        _fsync(self.path)
        self._owner._closed(self)

    def _abort(self) -> None:
        self._ipc.close()
        self._sink.close()


class DatasetWriter:
    """Writes a dataset directory split by split, atomically, in bounded memory (module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        name: str,
        version: str,
        classes: Sequence[str],
        modalities: Mapping[str, ModalitySpec],
        subsets: Sequence[str] = (),
        description: str = "",
        build_options: Mapping[str, Any] | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_rows: int | None = None,
        replace_existing: bool = True,
    ) -> None:
        self.target = Path(directory)
        self.name, self.version, self.description = name, version, description
        self.classes = list(classes)
        self.specs = dict(modalities)
        self.modality_order = list(self.specs)
        self.subset_names = sorted(subsets)
        self.build_options = dict(build_options or {})
        self.replace_existing = replace_existing
        self.schema = _schema(self.specs, self.subset_names)
        self.max_rows = _rows_per_batch(self.specs, max_batch_bytes, max_batch_rows)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.infos: dict[str, SplitInfo] = {}
        self._open: SplitWriter | None = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.tmp.exists():  # not finished (an error, or finish never called): leave nothing behind
            shutil.rmtree(self.tmp, ignore_errors=True)

    def split(self, name: str) -> SplitWriter:
        """The writer of split ``name`` (one at a time; each split once)."""
        if name not in SPLIT_NAMES:
            raise DatasetFormatError(
                f"dataset {self.name!r}: unknown split {name!r}; splits are {SPLIT_NAMES}"
            )
        if name in self.infos or self._open is not None:
            raise DatasetFormatError(
                f"dataset {self.name!r}: split {name!r} is written twice or while another is open"
            )
        self._open = SplitWriter(self.tmp / f"{name}.arrow", self, name)
        return self._open

    def check(self, rows: SplitArrays, split: str) -> None:
        """Rows must match the declared modalities (dtype, shape), subsets and classes."""
        got = {m: (a.dtype.name, tuple(a.shape[1:])) for m, a in rows.modalities.items()}
        want = {m: (s.dtype, tuple(s.shape)) for m, s in self.specs.items()}
        if got != want:
            raise DatasetFormatError(
                f"dataset {self.name!r}: split {split!r} has modalities {got}, expected {want}"
            )
        variable = sorted(m for m, s in self.specs.items() if s.variable_length)
        if sorted(rows.lengths) != variable:
            raise DatasetFormatError(
                f"dataset {self.name!r}: split {split!r} has lengths for {sorted(rows.lengths)}, "
                f"expected them for the variable-length modalities {variable}"
            )
        if sorted(rows.subsets) != self.subset_names:
            raise DatasetFormatError(
                f"dataset {self.name!r}: split {split!r} has subsets {sorted(rows.subsets)}, "
                f"expected {self.subset_names}"
            )
        if len(rows.labels) and (rows.labels.min() < 0 or rows.labels.max() >= len(self.classes)):
            raise DatasetFormatError(
                f"dataset {self.name!r}: split {split!r} has labels outside 0..{len(self.classes) - 1}"
            )

    def _closed(self, split: SplitWriter) -> None:
        self.infos[split.name] = SplitInfo(
            file=split.path.name, rows=split.rows, ids_sha256=split.ids_digest.hexdigest()
        )
        self._open = None

    def finish(self, *, split_protocol: str, split_seed: int | None) -> Manifest:
        """Hash the splits from their files, write the manifest last, rename into place."""
        missing = [s for s in SPLIT_NAMES if s not in self.infos]
        if missing:
            raise DatasetFormatError(
                f"dataset {self.name!r}: splits {missing} are missing; need {list(SPLIT_NAMES)}"
            )
        manifest = Manifest(
            name=self.name,
            version=self.version,
            description=self.description,
            modalities=self.specs,
            classes=self.classes,
            split_protocol=split_protocol,
            split_seed=split_seed,
            splits=self.infos,
            subsets=self.subset_names,
            build_options=self.build_options,
            content_sha256="",
        )
        digest = hashlib.sha256()
        for split_name in SPLIT_NAMES:  # from the memory-mapped files: views of the page cache
            hash_split(digest, SplitData(self.tmp / self.infos[split_name].file, manifest, split_name))
        manifest = manifest.model_copy(update={"content_sha256": digest.hexdigest()})
        path = self.tmp / MANIFEST_NAME
        path.write_text(manifest.model_dump_json(indent=2))
        _fsync(path)
        if not self.replace_existing and (self.target / MANIFEST_NAME).is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)
            return read_manifest(self.target)
        _replace_directory(self.tmp, self.target)
        return manifest


def _rows_per_batch(specs: Mapping[str, ModalitySpec], max_bytes: int, max_rows: int | None) -> int:
    """Rows per record batch: within ``max_bytes`` and Arrow's element limit for every column."""
    row_bytes = sum(np.dtype(s.dtype).itemsize * int(np.prod(s.shape)) for s in specs.values()) + 16
    row_elements = max([int(np.prod(s.shape)) for s in specs.values()] or [1])
    rows = max(1, min(max_bytes // max(row_bytes, 1), ARROW_MAX_ELEMENTS // max(row_elements, 1)))
    return min(rows, max_rows) if max_rows is not None else rows
