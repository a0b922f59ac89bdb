"""``food101``: UPMC Food-101, an image and the text of its recipe page, 101 classes (datasets.md §2.4).

Two raw layouts are read (``layout``; ``auto`` takes the one present, jsonl first):

* ``jsonl``, the MIDAS code's input (§1.1): ``train.jsonl`` and ``test.jsonl``, one JSON object a line
  with ``id``, ``img``, ``text`` and ``label``; the image is ``images/<split>/<img>``. Sample ids are the
  rows' ``id``.
* ``csv``, BalanceBenchmark's: ``texts/{train,test}_titles.csv`` with columns ``Image_path``, ``text``,
  ``label`` (a header row with these names is skipped if present); the image is
  ``images/<split>/<class>/<Image_path>`` (or ``images/<split>/<Image_path>`` when it already holds a
  folder). Sample ids are the image file names without their extension.

Labels: an integer is the class index; a string is a class name. Class names come from ``classes_file``
(one a line, line ``i`` = class ``i``) when given; else, for the csv layout, from the sorted folder names
under ``images/train/`` (BalanceBenchmark's class index), for jsonl from the sorted label names, or
``"0"`` .. ``"K-1"`` for integer labels.

Text clean-up as both code bases (§2.4): a leading "RT" dropped, URLs dropped, '#' dropped; then the
ELECTRA-small tokenizer with ``max_length`` 512, as the MIDAS code (padding is trimmed per batch here).

Splits: ``midas70`` pools train and test (the MIDAS code, §1.1). ``official`` has no validation list in
either layout: ``val_count`` rows are cut from train, stratified by label and seeded by ``val_seed``, as
MMBT's formatter cuts its 5,000-row dev set from train (it sets no seed, so its cut cannot be
reproduced; ours is fixed by the seed).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from .builders import DatasetBuilder, register_dataset
from .image_text import (
    ImageTextItem,
    ImageTextOptions,
    image_text_source,
    read_lines,
)
from .raw.layout import RawDataError, require, require_dir
from .sharded_build import DEFAULT_SHARD_SIZE, ShardedSource

SHARD_SIZE = DEFAULT_SHARD_SIZE
RAW_SPLITS = ("train", "test")

LAYOUT = """\
jsonl (the MIDAS code):
  <raw>/train.jsonl, <raw>/test.jsonl    one JSON object a line: id, img, text, label
  <raw>/images/train/<img>, <raw>/images/test/<img>
csv (BalanceBenchmark):
  <raw>/texts/train_titles.csv, <raw>/texts/test_titles.csv    columns Image_path, text, label
  <raw>/images/train/<class>/<Image_path>, <raw>/images/test/<class>/<Image_path>"""

CSV_HEADER = ["image_path", "text", "label"]
_URL = re.compile(r"(?:https?://|www\.)\S+")
_LEADING_RT = re.compile(r"^\s*RT(?:\s+|$)")


class Food101Options(ImageTextOptions):
    """Build settings of ``food101``; any change gives a separate cached directory."""

    max_length: int = Field(
        default=512,
        ge=4,
        le=4096,
        description="token ids kept per text, special tokens included (512: the MIDAS code)",
    )
    layout: Literal["auto", "jsonl", "csv"] = Field(
        default="auto",
        description="raw layout: jsonl (MIDAS), csv (BalanceBenchmark), auto (the one present)",
    )
    classes_file: str | None = Field(
        default=None, description="class names, one a line (line i = label i); default: see the docs"
    )
    val_count: int = Field(
        default=5000, ge=1, description="official split: rows cut from train for validation (stratified)"
    )
    val_seed: int = Field(default=0, ge=0, description="official split: seed of the validation cut")


@register_dataset("food101")
class Food101Builder(DatasetBuilder):
    version = "1"
    description = (
        "UPMC Food-101: a food photo and the text of its recipe page, 101 classes (MIDAS jsonl or "
        "BalanceBenchmark csv layout); ELECTRA-small token ids."
    )
    Options = Food101Options

    def sources(self, options: Food101Options) -> ShardedSource:
        """Parse both split files, resolve the classes and labels, check every image exists, then one
        ``ImageTextItem`` per row (train rows first, in file order, then test)."""
        raw = require_dir(Path(options.raw), LAYOUT)
        layout = resolve_layout(raw, options.layout)
        rows = [row for split in RAW_SPLITS for row in read_split(raw, layout, split)]
        classes = class_names(rows, raw, layout, options.classes_file)
        labels = [label_index(row, classes) for row in rows]
        items = [
            ImageTextItem(
                sample_id=row.sample_id,
                label=label,
                image=str(image_path(raw, layout, row, classes[label])),
                text=clean_text(row.text),
                source=row.source,
            )
            for row, label in zip(rows, labels, strict=True)
        ]
        splits = [row.split for row in rows]
        for index in val_cut(np.asarray(labels), splits, options.val_count, options.val_seed):
            splits[index] = "val"
        return image_text_source(
            items,
            splits,
            classes,
            options,
            layout=LAYOUT,
            shard_size=SHARD_SIZE,
            extra_info={"layout_read": layout},
        )


@dataclass(frozen=True)
class RawRow:
    """One row of a split file before its label is resolved: ``label`` is an index (int) or a class
    name (str); ``image`` is the file named by the row (``img`` or ``Image_path``)."""

    sample_id: str
    label: int | str
    image: str
    text: str
    source: str
    split: str


def resolve_layout(raw: Path, layout: str) -> str:
    """The layout to read: the one asked for, or for ``auto`` the jsonl files if present, else the csv."""
    if layout != "auto":
        return layout
    if (raw / "train.jsonl").is_file():
        return "jsonl"
    if (raw / "texts" / "train_titles.csv").is_file():
        return "csv"
    raise RawDataError(
        f"{raw}: holds neither train.jsonl nor texts/train_titles.csv; expected layout:\n{LAYOUT}"
    )


def read_split(raw: Path, layout: str, split: str) -> list[RawRow]:
    if layout == "jsonl":
        return read_jsonl(require(raw / f"{split}.jsonl", LAYOUT), split)
    return read_csv(require(raw / "texts" / f"{split}_titles.csv", LAYOUT), split)


def read_jsonl(path: Path, split: str) -> list[RawRow]:
    """The rows of a MIDAS/MMBT jsonl file (blank lines skipped); a bad line is named ``file:line``."""
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RawDataError(f"{where}: not a JSON object ({exc})") from exc
        if not isinstance(record, dict):
            raise RawDataError(f"{where}: not a JSON object")
        missing = [key for key in ("id", "img", "text", "label") if key not in record]
        if missing:
            raise RawDataError(f"{where}: missing field(s) {missing}; expected id, img, text, label")
        label, text, img = record["label"], record["text"], record["img"]
        if isinstance(label, bool) or not isinstance(label, int | str):
            raise RawDataError(f"{where}: label {label!r} is neither a class index nor a class name")
        if not isinstance(text, str) or not isinstance(img, str):
            raise RawDataError(f"{where}: text and img must be strings")
        rows.append(RawRow(str(record["id"]), label, img, text, where, split))
    return rows


def read_csv(path: Path, split: str) -> list[RawRow]:
    """The rows of a BalanceBenchmark titles CSV (``Image_path,text,label``; a header row with these
    names is skipped). A label of digits is a class index, any other a class name."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            records = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RawDataError(f"{path}: unreadable as CSV ({exc})") from exc
    rows = []
    for number, record in enumerate(records, start=1):
        if not record:
            continue
        if number == 1 and [field.strip().lower() for field in record] == CSV_HEADER:
            continue
        where = f"{path}:{number}"
        if len(record) != 3:
            raise RawDataError(f"{where}: {len(record)} fields, expected 3 (Image_path, text, label)")
        image, text, label = (field.strip() for field in record)
        stem = Path(image).stem
        if not stem:
            raise RawDataError(f"{where}: empty Image_path")
        rows.append(RawRow(stem, int(label) if label.isdigit() else label, image, text, where, split))
    return rows


def class_names(rows: list[RawRow], raw: Path, layout: str, classes_file: str | None) -> list[str]:
    """The class list (module docstring): ``classes_file``, else the csv layout's sorted image folders,
    else the sorted label names, else ``"0"`` .. ``"K-1"`` for integer labels."""
    kinds = {type(row.label) for row in rows}
    if len(kinds) > 1:
        first_int = next(row for row in rows if isinstance(row.label, int))
        first_name = next(row for row in rows if isinstance(row.label, str))
        raise RawDataError(
            f"{first_name.source}: label {first_name.label!r} is a class name, but {first_int.source} has "
            f"the class index {first_int.label}: use one or the other throughout"
        )
    if not rows:
        raise RawDataError(f"{raw}: the split files hold no rows; expected layout:\n{LAYOUT}")
    if classes_file is not None:
        return read_classes_file(Path(classes_file))
    if layout == "csv":
        folder = require_dir(raw / "images" / "train", LAYOUT)
        return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if kinds == {str}:
        return sorted({str(row.label) for row in rows})
    return [str(i) for i in range(max(int(row.label) for row in rows) + 1)]


def read_classes_file(path: Path) -> list[str]:
    names = [line.strip() for line in read_lines(require(path, "a text file: one class name a line"))]
    names = [name for name in names if name]
    if not names:
        raise RawDataError(f"{path}: holds no class names")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise RawDataError(f"{path}: class names {duplicated} appear more than once")
    return names


def label_index(row: RawRow, classes: list[str]) -> int:
    """The row's class index, checked against the class list."""
    if isinstance(row.label, int):
        if not 0 <= row.label < len(classes):
            raise RawDataError(f"{row.source}: label {row.label} is outside 0..{len(classes) - 1}")
        return row.label
    if row.label not in classes:
        raise RawDataError(f"{row.source}: label {row.label!r} is not a known class ({len(classes)} classes)")
    return classes.index(row.label)


def image_path(raw: Path, layout: str, row: RawRow, class_name: str) -> Path:
    """``images/<split>/<img>`` (jsonl); ``images/<split>/<class>/<Image_path>`` (csv), or
    ``images/<split>/<Image_path>`` when ``Image_path`` already names a folder."""
    folder = raw / "images" / row.split
    if layout == "jsonl" or "/" in row.image:
        return folder / row.image
    return folder / class_name / row.image


def clean_text(text: str) -> str:
    """The clean-up of the MIDAS and BalanceBenchmark loaders (§2.4): a leading "RT" (retweet marker),
    URLs and '#' dropped; runs of white space become one space."""
    text = _LEADING_RT.sub("", text)
    text = _URL.sub(" ", text).replace("#", "")
    return " ".join(text.split())


def val_cut(labels: np.ndarray, splits: list[str], count: int, seed: int) -> np.ndarray:
    """Indices of the ``count`` train rows that form the official validation split: a stratified,
    seeded cut (there is no validation list in the raw data)."""
    from sklearn.model_selection import train_test_split

    train = np.array([i for i, split in enumerate(splits) if split == "train"])
    try:
        _, val = train_test_split(train, test_size=count, stratify=labels[train], random_state=seed)
    except ValueError as exc:
        raise RawDataError(
            f"data.options.val_count={count}: cannot cut a stratified validation split from the "
            f"{len(train)} train rows ({exc})"
        ) from exc
    return np.sort(val)
