"""Bring your own data: turn a plain folder of labels and arrays into a canonical midasbench dataset.

Input folder layout
-------------------
::

    my_data/
        labels.csv          required: one row per sample
        classes.txt         optional: class names, one per line, in class-index order
        audio.npy           a modality as one array, one row per labels.csv row (same order)
        clinical.csv        a modality as a feature table (header, one row of numbers per sample)
        text.parquet        a modality as a Parquet table with columns ``id`` and ``value``
        image/              a modality as one ``<id>.npy`` file per sample
            a001.npy
            a002.npy
            ...

``labels.csv``
    A header row, then one row per sample. Columns (others are ignored):

    - ``id`` (optional): the sample id, unique, non-empty (surrounding spaces are stripped). Without it
      the ids are ``row0``, ``row1``, ... and every modality is matched by row order (so only the
      ``.npy`` and ``.csv`` forms can be used).
    - ``label`` (required): either an integer class index (every label is a non-negative integer) or a
      class name (any other text). Integer labels name the classes of ``classes.txt`` if it exists, else
      ``"0"`` .. ``"K-1"`` with ``K = max label + 1``. Class-name labels take the class order of
      ``classes.txt`` if it exists (every label must then be listed in it), else the sorted unique names.
    - ``split`` (optional): ``train``, ``val`` or ``test``. Required for ``split="official"``, where it
      is used as is (each of the three must occur); ignored (but still checked) for ``midas70``.

``classes.txt``
    Optional. One class name per line; blank lines are skipped; names must be unique. Another file can be
    given with ``classes_file=``.

Modalities
    Every other entry of the folder is one modality, named after the file or folder (without extension);
    ``labels.csv``, ``classes.txt`` and names starting with ``.`` are skipped. At least one is required,
    and the name must not be ``sample_id``, ``label`` or start with ``subset:``. Three forms:

    - ``<modality>.npy``: an array of shape ``(N, ...)`` with row ``i`` belonging to row ``i`` of
      ``labels.csv``.
    - ``<modality>.parquet``: columns ``id`` (string or integer) and ``value`` (a list, fixed-size list or
      fixed-shape tensor column of numbers). Rows are matched to ``labels.csv`` on ``id``; every label id
      must be present, rows with other ids are ignored. Every value holds the same number of elements.
      List values are reshaped to the per-sample shape given as a JSON list under the key ``shape`` of
      the Parquet schema metadata (e.g. ``{"shape": "[3, 32, 32]"}``), else kept 1-D; a fixed-shape
      tensor column carries its own shape.
    - ``<modality>/``: a folder of ``<id>.npy`` files, one per sample id (extra files are ignored). All
      must have the same dtype and the same shape — or the same shape but for the first axis: then the
      modality is **variable-length** (sequences of frames or tokens): rows are zero-padded to the
      longest, each row's length is stored, and encoders mask the padding (``format.ModalitySpec``).
      Ids holding a path separator cannot use this form.
    - ``<modality>.csv``: a header row, then one row of numbers per sample; every column but ``id`` is
      a feature. With an ``id`` column (and ids in labels.csv) rows are matched on it, else row ``i`` is
      labels.csv's row ``i``. Empty cells are NaN, which the import refuses.

    Modalities are ordered by file name: that order is the one of ``modality: 0/1`` positions and of the
    diagnostics (``--dry-run`` prints it).

    A scalar per sample is stored with shape ``(1,)``.

Stored dtypes
    ``float64`` is cast to ``float32`` (half the size; training runs in float32 anyway). ``bool`` is
    stored as ``uint8`` (the reader hands out zero-copy views, which Arrow's bit-packed booleans cannot
    give). Other integer and float dtypes are kept as they are; anything else (complex, strings,
    objects, dates) is refused. ``store_dtypes`` (``--store-dtype audio=float16``) narrows a modality
    further — spectrograms to float16, pixel values to uint8 — once every value is checked to fit; the
    device casts them back to float32 after the copy (``datasets/device_feed.py``).

Output
    The canonical directory (``format.py``) at ``out`` if given, else ``<root>/<name>`` with ``root``
    defaulting to ``$MIDASBENCH_DATA`` or ``~/.cache/midasbench/data`` -- where ``data.name: <name>``
    finds it. The split protocol (``midas70`` by default, or ``official``) is applied on import. An
    existing dataset at the target is replaced atomically; a directory there that is not a dataset is
    never touched.

Every problem with the input raises ``DatasetFormatError`` naming the file and the offending field, row
or value, and is found before anything is written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .builders import DATASETS, Pool, default_data_root, write_pool
from .format import (
    ID_COLUMN,
    LABEL_COLUMN,
    MANIFEST_NAME,
    SPLIT_NAMES,
    SUBSET_PREFIX,
    DatasetFormatError,
    SplitArrays,
)
from .lazy_arrays import CastArray, FileRowsArray
from .splits import SPLIT_PROTOCOLS, split_indices

LABELS_FILE = "labels.csv"
CLASSES_FILE = "classes.txt"
IMPORT_VERSION = "imported-1"
MIDAS70_MIN = 5  # splits.midas70_indices needs one sample per class in each of its three parts
_INT_RE = re.compile(r"^[+-]?\d+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class LabelTable:
    """``labels.csv`` parsed: ids, class indices, class names and the optional official split."""

    path: Path
    ids: list[str]
    lines: list[int]
    labels: np.ndarray
    classes: list[str]
    label_kind: str
    official_split: np.ndarray | None
    classes_file: str | None
    ids_from_order: bool = False  # labels.csv has no id column: ids are "row<k>", rows match by order

    def where(self, row: int) -> str:
        return f"{self.path} line {self.lines[row]}"


@dataclass
class LoadedModality:
    """One modality's array in labels.csv row order, and where it came from (for build_options)."""

    values: np.ndarray
    source: str
    form: str
    source_dtype: str
    lengths: np.ndarray | None = None  # a variable-length modality's row lengths


def import_folder(
    folder: str | os.PathLike[str],
    *,
    name: str,
    root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    split: str = "midas70",
    split_seed: int = 2,
    classes_file: str | os.PathLike[str] | None = None,
    standardize: bool = False,
    store_dtypes: Mapping[str, str] | None = None,
) -> Path:
    """Validate ``folder`` (layout in the module docstring), write the canonical dataset, return its path.

    Everything is read and checked before the (atomic) write, so a bad input leaves nothing behind.
    ``standardize`` rescales float modalities with training-split statistics (``train_statistics``);
    ``store_dtypes`` stores modalities in a narrower dtype (``{"audio": "float16"}``: half the bytes
    read and sent per batch), after checking every value fits.
    """
    folder = Path(folder)
    if not _NAME_RE.match(name):
        raise DatasetFormatError(
            f"dataset name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if split not in SPLIT_PROTOCOLS:
        raise DatasetFormatError(f"unknown split protocol {split!r}; allowed {list(SPLIT_PROTOCOLS)}")
    if out is not None:
        directory = Path(out)
    else:
        if name in DATASETS:
            raise DatasetFormatError(
                f"dataset name {name!r} is a registered builder, which data.name would pick instead of "
                "the imported data; choose another name"
            )
        directory = (Path(root) if root is not None else default_data_root()) / name
    _check_target(directory, folder)

    pool, options, indices = _checked_split(folder, split, split_seed, classes_file, store_dtypes)
    stats = {
        m: train_statistics(v, indices["train"], pool.arrays.lengths.get(m))
        for m, v in pool.arrays.modalities.items()
        if v.dtype.kind == "f"
    }
    transform = None
    if standardize:
        options["standardize"] = {
            m: {"mean": st.mean.tolist(), "std": st.std.tolist()} for m, st in stats.items()
        }
        transform = partial(_standardized, stats=stats)
    else:
        _warn_unscaled(stats, folder)
    write_pool(
        pool,
        directory,
        name=name,
        version=IMPORT_VERSION,
        description=f"imported from {folder}",
        split=split,
        split_seed=split_seed,
        build_options={"source": str(folder.resolve()), **options},
        transform=transform,
    )
    return directory


@dataclass
class Statistics:
    """A float modality's training-split mean and std: per element for vectors, one pair otherwise."""

    mean: np.ndarray
    std: np.ndarray
    max_abs: float


def train_statistics(values: Any, rows: np.ndarray, lengths: np.ndarray | None = None) -> Statistics:
    """Mean and std (population, float64 sums) over the training rows, read in pieces; a zero std is 1
    so a constant feature maps to 0 instead of NaN. A variable-length modality's padding is left out."""
    vector = values.ndim == 2 and lengths is None
    total, squares, count, max_abs = 0.0, 0.0, 0, 0.0
    for start in range(0, len(rows), 4096):
        picked = np.sort(rows[start : start + 4096])
        chunk = np.asarray(values[picked], dtype=np.float64)
        if lengths is not None:  # the valid steps of each row only
            chunk = np.concatenate([c[:n] for c, n in zip(chunk, lengths[picked], strict=True)])
        chunk = chunk if vector else chunk.reshape(len(chunk), -1).reshape(-1, 1)
        total = total + chunk.sum(axis=0)
        squares = squares + np.square(chunk).sum(axis=0)
        count += len(chunk)
        max_abs = max(max_abs, float(np.abs(chunk).max(initial=0.0)))
    mean = np.asarray(total / max(count, 1))
    std = np.sqrt(np.maximum(np.asarray(squares / max(count, 1)) - np.square(mean), 0.0))
    std = np.where(std > 0, std, 1.0)
    return Statistics(mean=np.atleast_1d(mean), std=np.atleast_1d(std), max_abs=max_abs)


def _standardized(rows: SplitArrays, stats: dict[str, Statistics]) -> SplitArrays:
    modalities = dict(rows.modalities)
    for m, st in stats.items():
        x = modalities[m]
        mean, std = (st.mean, st.std) if x.ndim == 2 else (st.mean[0], st.std[0])
        modalities[m] = ((x - mean) / std).astype(x.dtype)
    return SplitArrays(
        ids=rows.ids, labels=rows.labels, modalities=modalities, subsets=rows.subsets, lengths=rows.lengths
    )


UNSCALED_ABS = 100.0  # beyond this, an unstandardised float input commonly trains an MLP to chance


def _warn_unscaled(stats: dict[str, Statistics], folder: Path) -> None:
    for m, st in stats.items():
        if st.max_abs > UNSCALED_ABS:
            warnings.warn(
                f"{folder}: modality {m!r} has training values up to {st.max_abs:.3g} in magnitude; "
                "unstandardised inputs of that scale often train to chance: import with --standardize "
                "(training-split statistics, stored in the manifest) or scale them yourself",
                stacklevel=3,
            )


def describe_import(
    folder: str | os.PathLike[str],
    *,
    split: str = "midas70",
    split_seed: int = 2,
    classes_file: str | os.PathLike[str] | None = None,
    store_dtypes: Mapping[str, str] | None = None,
) -> str:
    """What ``import_folder`` would write, checked as it would check it, without writing anything (the
    CLI's ``--dry-run``): each modality's stored dtype and shape with its source, the modality order, the
    rows of each split and the class counts per split."""
    folder = Path(folder)
    pool, options, indices = _checked_split(folder, split, split_seed, classes_file, store_dtypes)
    lines = [
        f"would import {len(pool.arrays.ids)} samples from {folder} (split {split}"
        + (f", split_seed {split_seed})" if split == "midas70" else ")")
    ]
    for position, (name, values) in enumerate(pool.arrays.modalities.items()):
        source = options["modalities"][name]
        lines.append(
            f"  modality {position} {name}: {values.dtype.name}{list(values.shape[1:])} from "
            f"{source['file']} ({source['form']}, stored from {source['source_dtype']})"
        )
    lines.append("  rows     " + ", ".join(f"{s} {len(indices[s])}" for s in SPLIT_NAMES))
    for k, name in enumerate(pool.classes):
        counts = ", ".join(f"{s} {int(np.sum(pool.arrays.labels[indices[s]] == k))}" for s in SPLIT_NAMES)
        lines.append(f"  class {k} {name!r}: {counts}")
    return "\n".join(lines)


def _checked_split(
    folder: Path,
    split: str,
    split_seed: int,
    classes_file: str | os.PathLike[str] | None,
    store_dtypes: Mapping[str, str] | None = None,
) -> tuple[Pool, dict[str, Any], dict[str, np.ndarray]]:
    """The folder read and checked, and its rows of each split (what an import and its dry run share)."""
    pool, options = load_folder(folder, classes_file=classes_file, require_split=split == "official")
    for modality, dtype in (store_dtypes or {}).items():
        pool.arrays.modalities[modality] = _narrowed(pool.arrays.modalities, modality, dtype, folder)
        options["modalities"][modality]["stored_as"] = dtype
    if split == "midas70":
        _check_midas70(folder / LABELS_FILE, pool)
    indices = split_indices(split, pool.arrays.labels, pool.official_split, split_seed, str(folder))
    return pool, options, indices


def _check_target(directory: Path, folder: Path) -> None:
    """Refuse targets whose replacement would destroy something other than an older dataset."""
    target = directory.resolve()
    source = folder.resolve()
    if target == source or source.is_relative_to(target):
        raise DatasetFormatError(f"output {directory} would replace the input folder {folder}")
    if directory.exists() and not (directory / MANIFEST_NAME).is_file():
        raise DatasetFormatError(
            f"output {directory} exists and is not a midasbench dataset (no {MANIFEST_NAME}); "
            "refusing to replace it"
        )


def _check_midas70(path: Path, pool: Pool) -> None:
    """``midas70`` cuts each class three ways; say which class is too small, by name, before writing."""
    counts = np.bincount(pool.arrays.labels, minlength=len(pool.classes))
    small = [(name, int(c)) for name, c in zip(pool.classes, counts, strict=True) if 0 < c < MIDAS70_MIN]
    if small:
        listed = ", ".join(f"{name!r} has {count}" for name, count in small)
        raise DatasetFormatError(
            f"{path}: split 'midas70' needs at least {MIDAS70_MIN} samples per class; {listed} "
            "(add samples, or give a 'split' column and use split='official')"
        )


def load_folder(
    folder: str | os.PathLike[str],
    *,
    classes_file: str | os.PathLike[str] | None = None,
    require_split: bool = False,
) -> tuple[Pool, dict[str, Any]]:
    """Read and validate an input folder into a ``Pool``; also return a JSON description of its files.

    Separate from the write so that a CLI can offer a dry run, and so every check runs before writing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"{folder}: not a folder")
    table = read_labels(folder, classes_file=classes_file, require_split=require_split)
    reserved = {LABELS_FILE, CLASSES_FILE}
    if classes_file is not None and Path(classes_file).resolve().parent == folder.resolve():
        reserved.add(Path(classes_file).name)
    modalities: dict[str, LoadedModality] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or (entry.name in reserved and entry.is_file()):
            continue
        modality, loaded = _load_modality(entry, table)
        if modality in modalities:
            raise DatasetFormatError(
                f"{entry}: modality {modality!r} is also given by {modalities[modality].source}; keep one"
            )
        _check_finite(modality, loaded, folder / entry.name, table)
        modalities[modality] = loaded
    if not modalities:
        raise DatasetFormatError(
            f"{folder}: no modality found; add <modality>.npy, <modality>.parquet or a <modality>/ folder "
            f"next to {LABELS_FILE}"
        )
    arrays = SplitArrays(
        ids=np.asarray(table.ids, dtype=str),
        labels=table.labels,
        modalities={k: v.values for k, v in modalities.items()},
        lengths={k: v.lengths for k, v in modalities.items() if v.lengths is not None},
    )
    options: dict[str, Any] = {
        "labels": {"kind": table.label_kind, "classes_file": table.classes_file},
        "modalities": {
            name: {"file": m.source, "form": m.form, "source_dtype": m.source_dtype}
            for name, m in modalities.items()
        },
    }
    return Pool(classes=table.classes, arrays=arrays, official_split=table.official_split), options


def read_labels(
    folder: Path, *, classes_file: str | os.PathLike[str] | None = None, require_split: bool = False
) -> LabelTable:
    """Parse ``labels.csv`` (and the class list) with row-level error messages."""
    path = folder / LABELS_FILE
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: not found; an input folder needs {LABELS_FILE} (columns id, label)"
        )
    ids: list[str] = []
    raw_labels: list[str] = []
    splits: list[str] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DatasetFormatError(f"{path}: empty file; expected a header row with columns id, label")
        columns = [c.strip() for c in header]
        if "label" not in columns:
            raise DatasetFormatError(f"{path}: column 'label' is missing; header has {columns}")
        id_col, label_col = (columns.index("id") if "id" in columns else None), columns.index("label")
        split_col = columns.index("split") if "split" in columns else None
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue  # blank line
            line = reader.line_num
            if len(record) < len(columns):
                raise DatasetFormatError(
                    f"{path} line {line}: has {len(record)} fields, the header has {len(columns)}"
                )
            sample_id = record[id_col].strip() if id_col is not None else f"row{len(ids)}"
            label = record[label_col].strip()
            if not sample_id:
                raise DatasetFormatError(f"{path} line {line}: field 'id' is empty")
            if not label:
                raise DatasetFormatError(f"{path} line {line}: field 'label' is empty (id {sample_id!r})")
            if sample_id in seen:
                raise DatasetFormatError(
                    f"{path} line {line}: duplicate id {sample_id!r} (first on line {seen[sample_id]})"
                )
            seen[sample_id] = line
            if split_col is not None:
                split_name = record[split_col].strip()
                if split_name not in SPLIT_NAMES:
                    raise DatasetFormatError(
                        f"{path} line {line}: field 'split' is {split_name!r}; allowed {list(SPLIT_NAMES)}"
                    )
                splits.append(split_name)
            ids.append(sample_id)
            raw_labels.append(label)
            lines.append(line)
    if not ids:
        raise DatasetFormatError(f"{path}: no data rows after the header")
    if require_split:
        if split_col is None:
            raise DatasetFormatError(
                f"{path}: split 'official' needs a column 'split' (train/val/test); header has {columns}"
            )
        empty = [s for s in SPLIT_NAMES if s not in set(splits)]
        if empty:
            raise DatasetFormatError(
                f"{path}: split 'official' needs rows of every split; column 'split' has no {empty} rows"
            )

    classes_path = Path(classes_file) if classes_file is not None else folder / CLASSES_FILE
    if classes_file is not None and not classes_path.is_file():
        raise DatasetFormatError(f"{classes_path}: not found (given as classes_file)")
    names = _read_classes(classes_path) if classes_path.is_file() else None
    table = LabelTable(
        path=path,
        ids=ids,
        lines=lines,
        labels=np.empty(0, dtype=np.int64),
        classes=[],
        label_kind="int" if all(_INT_RE.match(v) for v in raw_labels) else "str",
        official_split=np.asarray(splits, dtype=str) if split_col is not None else None,
        classes_file=str(classes_path) if names is not None else None,
        ids_from_order=id_col is None,
    )
    if table.label_kind == "int":
        table.labels = np.asarray([int(v) for v in raw_labels], dtype=np.int64)
        negative = np.nonzero(table.labels < 0)[0]
        if len(negative):
            row = int(negative[0])
            raise DatasetFormatError(
                f"{table.where(row)}: label {raw_labels[row]!r} is negative; class indices start at 0"
            )
        if names is not None:
            outside = np.nonzero(table.labels >= len(names))[0]
            if len(outside):
                row = int(outside[0])
                raise DatasetFormatError(
                    f"{table.where(row)}: label {raw_labels[row]!r} is not a class index of {classes_path} "
                    f"({len(names)} classes, 0..{len(names) - 1})"
                )
            table.classes = names
        else:
            table.classes = [str(i) for i in range(int(table.labels.max()) + 1)]
    else:
        if names is not None:
            index = {n: i for i, n in enumerate(names)}
            for row, value in enumerate(raw_labels):
                if value not in index:
                    raise DatasetFormatError(
                        f"{table.where(row)}: label {value!r} is not listed in {classes_path}"
                    )
            table.classes = names
        else:
            table.classes = sorted(set(raw_labels))
            index = {n: i for i, n in enumerate(table.classes)}
        table.labels = np.asarray([index[v] for v in raw_labels], dtype=np.int64)
    return table


def _read_classes(path: Path) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        class_name = raw.strip()
        if not class_name:
            continue
        if class_name in seen:
            raise DatasetFormatError(
                f"{path} line {number}: duplicate class {class_name!r} (first on line {seen[class_name]})"
            )
        seen[class_name] = number
        names.append(class_name)
    if not names:
        raise DatasetFormatError(f"{path}: lists no class names")
    return names


def _load_modality(entry: Path, table: LabelTable) -> tuple[str, LoadedModality]:
    if entry.is_dir():
        modality, form = entry.name, "folder"
        values, source_dtype = _load_folder(entry, _with_ids(table, entry))
    elif entry.suffix == ".npy":
        modality, form = entry.stem, "npy"
        values, source_dtype = _load_npy(entry, table)
    elif entry.suffix == ".parquet":
        modality, form = entry.stem, "parquet"
        values, source_dtype = _load_parquet(entry, _with_ids(table, entry))
    elif entry.suffix == ".csv":
        modality, form = entry.stem, "csv"
        values, source_dtype = _load_csv(entry, table)
    else:
        raise DatasetFormatError(
            f"{entry}: not a modality; expected <modality>.npy, <modality>.parquet or a <modality>/ folder "
            f"(only {LABELS_FILE}, {CLASSES_FILE} and hidden files may sit beside them)"
        )
    if modality in (ID_COLUMN, LABEL_COLUMN) or modality.startswith(SUBSET_PREFIX) or not modality:
        raise DatasetFormatError(f"{entry}: modality name {modality!r} is reserved; rename the file")
    lengths = values.lengths if isinstance(values, FileRowsArray) else None
    return modality, LoadedModality(
        values=_stored_dtype(values, entry),
        source=entry.name,
        form="folder (variable length)" if lengths is not None else form,
        source_dtype=source_dtype,
        lengths=lengths,
    )


def _check_finite(name: str, loaded: LoadedModality, path: Path, table: LabelTable) -> None:
    """Refuse NaN and ±Inf in a float modality before anything is written, naming the file, the row and
    the element: they would otherwise surface epochs later as a NaN loss that names no data."""
    values = loaded.values
    if values.dtype.kind != "f":
        return
    step = max(1, 16 * 2**20 // max(1, values.dtype.itemsize * int(np.prod(values.shape[1:]))))
    for start in range(0, len(values), step):
        chunk = np.asarray(values[np.arange(start, min(start + step, len(values)))])
        bad = ~np.isfinite(chunk.reshape(len(chunk), -1))
        if bad.any():
            row, element = (int(i) for i in np.argwhere(bad)[0])
            value = chunk.reshape(len(chunk), -1)[row, element]
            position = np.unravel_index(element, chunk.shape[1:]) if chunk.ndim > 1 else ()
            raise DatasetFormatError(
                f"{path}: modality {name!r} holds {value} at element {tuple(int(i) for i in position)} of "
                f"sample {table.ids[start + row]!r} ({table.where(start + row)}); NaN and Inf cannot be "
                "trained on: fill or drop them before importing"
            )


def _with_ids(table: LabelTable, entry: Path) -> LabelTable:
    """Forms matched on sample ids need an ``id`` column in labels.csv."""
    if table.ids_from_order:
        raise DatasetFormatError(
            f"{entry}: rows of this form are matched on sample ids, but {table.path.name} has no 'id' "
            "column (its rows are matched by order); add an id column, or use <modality>.npy / .csv"
        )
    return table


def _load_csv(path: Path, table: LabelTable) -> tuple[np.ndarray, str]:
    """A feature table: a header row, then one row of numbers per sample. With an ``id`` column rows are
    matched on it (when labels.csv has ids), else row i is labels.csv's row i; every other column is a
    feature. Empty cells are read as NaN (and then refused, naming the sample)."""
    import pyarrow.csv as pcsv

    try:
        frame = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"{path}: not a readable CSV file ({exc})") from exc
    names = [n for n in frame.column_names if n != "id"]
    if not names:
        raise DatasetFormatError(f"{path}: no feature columns besides 'id'")
    for name in names:
        kind = frame.schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
            raise DatasetFormatError(f"{path}: column {name!r} holds {kind}, not numbers")
    values = np.column_stack(
        [frame.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in names]
    )
    if "id" in frame.column_names and not table.ids_from_order:
        position = {str(v): i for i, v in enumerate(frame.column("id").to_pylist())}
        missing = [i for i in table.ids if i not in position]
        if missing:
            raise DatasetFormatError(
                f"{path}: id {missing[0]!r} of {table.path.name} has no row ({len(missing)} missing)"
            )
        values = values[[position[i] for i in table.ids]]
    elif len(values) != len(table.ids):
        raise DatasetFormatError(
            f"{path}: has {len(values)} rows but {table.path.name} has {len(table.ids)}; row i must be "
            f"row i of {table.path.name} (or add an 'id' column to both)"
        )
    return values, "float64"


def _stored_dtype(values: np.ndarray | FileRowsArray, path: Path) -> np.ndarray | CastArray | FileRowsArray:
    """Apply the dtype policy: float64 → float32, bool → uint8, other ints/floats unchanged. A cast is
    lazy (``CastArray``): rows are cast as they are written, never the whole array at once."""
    target = stored_dtype(values.dtype, path)
    if target == values.dtype:
        return values
    if isinstance(values, FileRowsArray):  # its rows are read (and cast) as they are written anyway
        return FileRowsArray(values.paths, values.row_shape, values.source_dtype, target, values.lengths)
    return CastArray(values, target)


NARROW_DTYPES = ("float16", "float32", "uint8", "int8", "uint16", "int16", "int32")


def _narrowed(modalities: Mapping[str, Any], modality: str, dtype: str, folder: Path) -> CastArray:
    """A modality stored as ``dtype`` (``--store-dtype``): floats to float16/float32, integers to any
    of ``NARROW_DTYPES``; every value must fit (checked here, piece by piece), and a float is never
    stored as an integer (that needs a scale: keep it float and normalise with a transform)."""
    if modality not in modalities:
        raise DatasetFormatError(
            f"--store-dtype {modality}={dtype}: {folder} has no modality {modality!r} "
            f"(it has {sorted(modalities)})"
        )
    if dtype not in NARROW_DTYPES:
        raise DatasetFormatError(
            f"--store-dtype {modality}={dtype}: allowed dtypes are {list(NARROW_DTYPES)}"
        )
    values, target = modalities[modality], np.dtype(dtype)
    if target.kind in "iu" and values.dtype.kind == "f":
        raise DatasetFormatError(
            f"--store-dtype {modality}={dtype}: {modality!r} holds {values.dtype} values; floats are not "
            "stored as integers (keep a float dtype, e.g. float16)"
        )
    info = np.finfo(target) if target.kind == "f" else np.iinfo(target)
    step = max(1, 16 * 2**20 // max(1, values.dtype.itemsize * int(np.prod(values.shape[1:]))))
    for start in range(0, len(values), step):
        chunk = np.asarray(values[np.arange(start, min(start + step, len(values)))])
        low, high = chunk.min(), chunk.max()
        if low < info.min or high > info.max:
            raise DatasetFormatError(
                f"--store-dtype {modality}={dtype}: {modality!r} holds values in [{low}, {high}] among rows "
                f"{start}..{start + len(chunk) - 1}, outside {dtype}'s [{info.min}, {info.max}]"
            )
    return CastArray(values, target)


def stored_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    """The dtype a source dtype is stored as (module docstring, "Stored dtypes")."""
    if dtype == np.float64:
        return np.dtype(np.float32)
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind in "iuf":
        return dtype
    raise DatasetFormatError(f"{path}: dtype {dtype} is not supported; store integers, floats or bools")


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: not a readable .npy array ({exc})") from exc


def _load_npy(path: Path, table: LabelTable) -> tuple[np.ndarray, str]:
    values = _load_array(path, mmap=True)
    if values.ndim == 0 or values.shape[0] != len(table.ids):
        rows = "a 0-d array" if values.ndim == 0 else f"{values.shape[0]} rows"
        raise DatasetFormatError(
            f"{path}: has {rows} but {table.path.name} has {len(table.ids)} rows; row i of the array "
            f"must be row i of {table.path.name}"
        )
    return values, values.dtype.name


def _load_folder(folder: Path, table: LabelTable) -> tuple[FileRowsArray, str]:
    """Check every ``<id>.npy`` from its header (shape, dtype) now; read the rows when they are written.
    Files that differ only in their first axis make a variable-length modality."""
    paths: list[Path] = []
    shapes: list[tuple[int, ...]] = []
    first: np.ndarray | None = None
    for row, sample_id in enumerate(table.ids):
        if sample_id in (".", "..") or "/" in sample_id or os.sep in sample_id:
            raise DatasetFormatError(
                f"{table.where(row)}: id {sample_id!r} cannot name a file in {folder}; use "
                f"{folder.name}.npy or {folder.name}.parquet for this modality"
            )
        path = folder / f"{sample_id}.npy"
        if not path.is_file():
            raise DatasetFormatError(
                f"{path}: not found ({table.where(row)}); {folder.name}/ needs one <id>.npy per id"
            )
        value = _load_array(path, mmap=True)  # the header only
        if first is None:
            first = value
        elif value.dtype != first.dtype or value.shape[1:] != first.shape[1:] or value.ndim == 0:
            raise DatasetFormatError(
                f"{path}: has shape {value.shape} and dtype {value.dtype}, but {paths[0].name} has shape "
                f"{first.shape} and dtype {first.dtype}; every file in {folder.name}/ must match (only "
                "the first axis may differ, for sequences)"
            )
        if value.ndim and value.shape[0] == 0:
            raise DatasetFormatError(f"{path}: an empty sequence (shape {value.shape}); a row needs a step")
        paths.append(path)
        shapes.append(value.shape)
    assert first is not None  # labels.csv has at least one row
    if all(shape == first.shape for shape in shapes):
        return FileRowsArray(paths, first.shape, first.dtype, first.dtype), first.dtype.name
    lengths = np.array([shape[0] for shape in shapes], dtype=np.int64)
    row_shape = (int(lengths.max()), *first.shape[1:])
    return FileRowsArray(paths, row_shape, first.dtype, first.dtype, lengths), first.dtype.name


def _load_parquet(path: Path, table: LabelTable) -> tuple[np.ndarray, str]:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    for column in ("id", "value"):
        if column not in schema.names:
            raise DatasetFormatError(f"{path}: column {column!r} is missing; columns are {schema.names}")
    shape = _metadata_shape(path, schema.metadata or {})
    try:
        data = pq.read_table(path, columns=["id", "value"])
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    id_column = data.column("id")
    if not (pa.types.is_string(id_column.type) or pa.types.is_large_string(id_column.type)) and not (
        pa.types.is_integer(id_column.type)
    ):
        raise DatasetFormatError(f"{path}: column 'id' has type {id_column.type}; use strings or integers")
    ids = [None if v is None else str(v) for v in pc.cast(id_column, pa.string()).to_pylist()]
    values = _parquet_values(path, data.column("value"), ids, shape)

    position: dict[str, int] = {}
    for row, sample_id in enumerate(ids):
        if sample_id is None:
            raise DatasetFormatError(f"{path}: column 'id' is null in row {row}")
        if sample_id in position:
            raise DatasetFormatError(
                f"{path}: duplicate id {sample_id!r} (rows {position[sample_id]} and {row})"
            )
        position[sample_id] = row
    index = np.empty(len(table.ids), dtype=np.int64)
    for row, sample_id in enumerate(table.ids):
        found = position.get(sample_id)
        if found is None:
            missing = sum(1 for i in table.ids if i not in position)
            raise DatasetFormatError(
                f"{path}: id {sample_id!r} ({table.where(row)}) has no row; {missing} label id(s) missing"
            )
        index[row] = found
    return values[index], values.dtype.name


def _metadata_shape(path: Path, metadata: dict[bytes, bytes]) -> tuple[int, ...] | None:
    raw = metadata.get(b"shape")
    if raw is None:
        return None
    try:
        shape = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: schema metadata 'shape' is not JSON: {raw!r}") from exc
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise DatasetFormatError(
            f"{path}: schema metadata 'shape' must be a JSON list of positive integers, got {raw.decode()!r}"
        )
    return tuple(shape)


def _parquet_values(
    path: Path, column: pa.ChunkedArray, ids: list[str | None], shape: tuple[int, ...] | None
) -> np.ndarray:
    """Decode the ``value`` column into an ``(rows, *shape)`` array, checking nulls and element counts."""
    kind = column.type
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count:
        row = int(np.nonzero(array.is_null().to_numpy(zero_copy_only=False))[0][0])
        raise DatasetFormatError(f"{path}: column 'value' is null for id {ids[row]!r}")
    if isinstance(kind, pa.FixedShapeTensorType):
        tensor_shape = tuple(int(s) for s in kind.shape)
        if shape is not None and shape != tensor_shape:
            raise DatasetFormatError(
                f"{path}: schema metadata 'shape' {list(shape)} disagrees with column 'value' "
                f"shape {list(tensor_shape)}"
            )
        if array.storage.flatten().null_count:
            raise DatasetFormatError(f"{path}: column 'value' holds null elements")
        return array.to_numpy_ndarray()
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise DatasetFormatError(
            f"{path}: column 'value' has type {kind}; use a list, fixed-size list or fixed-shape tensor"
        )
    element = kind.value_type
    if not (pa.types.is_integer(element) or pa.types.is_floating(element) or pa.types.is_boolean(element)):
        raise DatasetFormatError(
            f"{path}: column 'value' holds {element}; use numbers (flatten nested lists and give the "
            "per-sample shape as schema metadata 'shape')"
        )
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    expected = math.prod(shape) if shape is not None else (int(lengths[0]) if len(lengths) else 0)
    bad = np.nonzero(lengths != expected)[0]
    if len(bad):
        row = int(bad[0])
        reason = f"schema metadata 'shape' {list(shape)}" if shape is not None else f"as for id {ids[0]!r}"
        raise DatasetFormatError(
            f"{path}: column 'value' has {lengths[row]} elements for id {ids[row]!r}; expected {expected} "
            f"({reason})"
        )
    flat = array.flatten()
    if flat.null_count:
        raise DatasetFormatError(f"{path}: column 'value' holds null elements")
    return flat.to_numpy(zero_copy_only=False).reshape(
        len(array), *(shape if shape is not None else (expected,))
    )
