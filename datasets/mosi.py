"""``mosi``: CMU-MOSI binary sentiment from its released feature pickles (datasets.md §1.2, §1.3, §2.5).

CMU-MOSI is distributed to this field as precomputed feature sequences, not media: per opinion segment a
text sequence (GloVe or BERT features), COVAREP audio (5-d) and Facet visual features (20-d). Two
releases are read, chosen by ``format``:

* ``mmsa`` (default, as datasets.md §2.5 recommends): MMSA's ``MOSI/Processed/unaligned_50.pkl`` or
  ``aligned_50.pkl``; splits ``train``/``valid``/``test``, each with ``text``, ``audio``, ``vision``,
  ``regression_labels`` (the continuous score in [-3, 3]) and ``id``, and, where the release has them,
  ``audio_lengths``, ``vision_lengths`` and ``text_bert`` (``N × 3 × L``: ids, mask, segment ids);
* ``mult``: MulT's word-aligned ``mosi_data.pkl`` (the file BalanceBenchmark reads); the same splits
  with ``text``, ``audio``, ``vision``, ``labels`` (``N × 1 × 1``) and ``id``.

Every modality is stored float32 as the pickle pads it, ``(L, D)`` per sample. Its valid length comes
from the pickle and nowhere else (an all-zero frame is data, never taken for padding): ``audio_lengths``
and ``vision_lengths`` for audio and visual, the count of ones in ``text_bert``'s attention mask for
text. Those modalities are variable-length (``SplitArrays.lengths``); one without lengths in its release
(every modality of the MulT pickle) is stored fixed-length, every frame counted. ``use_lengths=false``
stores all three fixed-length.

Labels: binary from the continuous score (classes ``negative``, ``positive``); ``tie`` decides a score
of exactly 0 (below). The subset ``non0`` marks the samples whose score is not 0, so a run reports
MMSA's "Non0" accuracy (``acc_non0``) beside the "Has0" one. The official split is the pickle's own
(``valid`` → ``val``), the 1,284 / 229 / 686 of the MIDAS paper.

**Pickle is a trusted-input format**: unpickling runs code chosen by whoever wrote the file. Only build
from pickles you downloaded yourself from the official releases (docs/datasets/mosi.md).

The pickle is read once, in ``sources``; each item carries its sample's arrays, so ``decode`` only
converts and checks them (the sharded build's fingerprint then covers the data itself, and a worker gets
just its shard's rows).
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .builders import BuilderOptions, DatasetBuilder, register_dataset
from .format import SplitArrays
from .raw.layout import RawDataError, require
from .sharded_build import DecodedShard, ShardedSource, decode_items

CLASSES = ["negative", "positive"]
PICKLE_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # pickle key -> our split name
MODALITY_FIELDS = {"text": "text", "audio": "audio", "visual": "vision"}  # our modality -> pickle field
LENGTH_FIELDS = {"audio": "audio_lengths", "visual": "vision_lengths"}  # MMSA only
LABEL_FIELDS = {"mmsa": "regression_labels", "mult": "labels"}
TEXT_BERT_FIELD = "text_bert"
MASK_ROW = 1  # text_bert rows: token ids, attention mask, segment ids
DEFAULT_FILES = {"mmsa": "MOSI/Processed/unaligned_50.pkl", "mult": "mosi_data.pkl"}
NON0_SUBSET = "non0"
SHARD_SIZE = 256  # samples per decoded shard: decoding is a copy, so few large shards (2,199 samples: 9)

LAYOUTS = {
    "mmsa": """<raw>/
  MOSI/Processed/unaligned_50.pkl   MMSA release (or aligned_50.pkl: file=MOSI/Processed/aligned_50.pkl)
    dict with keys train, valid, test; each a dict with
      text (N, L, D), audio (N, La, 5), vision (N, Lv, 20), regression_labels (N,), id (N,)
      and optionally audio_lengths (N,), vision_lengths (N,), text_bert (N, 3, L)""",
    "mult": """<raw>/
  mosi_data.pkl                     MulT release (word-aligned)
    dict with keys train, valid, test; each a dict with
      text (N, L, 300), audio (N, L, 5), vision (N, L, 20), labels (N, 1, 1), id (N, ...)""",
}


class MosiOptions(BuilderOptions):
    """Build settings of ``mosi``; any change gives a separate cached directory."""

    raw: str = Field(description="root of the download: the folder the pickle's path (file) starts from")
    format: Literal["mmsa", "mult"] = Field(
        default="mmsa", description="which release the pickle is: MMSA (default) or MulT"
    )
    file: str | None = Field(
        default=None,
        description="the pickle, relative to raw; default MOSI/Processed/unaligned_50.pkl (mmsa) or "
        "mosi_data.pkl (mult)",
    )
    tie: Literal["positive", "negative", "exclude"] = Field(
        default="positive",
        description="a score of exactly 0: positive (y >= 0 is positive: BalanceBenchmark, MMSA 'Has0'; "
        "keeps all 2,199 samples as the paper counts), negative (only y > 0 is positive: MultiBench), "
        "exclude (dropped, listed in the manifest: MMSA 'Non0')",
    )
    use_lengths: bool = Field(
        default=True,
        description="read each row's valid length from the pickle (audio_lengths, vision_lengths, "
        "text_bert's mask) where it has them; false stores every modality fixed-length",
    )
    nonfinite: Literal["error", "zero"] = Field(
        default="error",
        description="a NaN or inf feature value (after audio -inf -> 0, which is always done): an error "
        "naming the sample, or set to 0",
    )
    skip_bad: bool = Field(
        default=False, description="skip a sample whose rows are malformed (listed in the manifest)"
    )


@dataclass(frozen=True, eq=False)
class MosiSample:
    """One segment to decode: where it is in the pickle, its score, its padded ``(L, D)`` features per
    modality, and what the pickle says of its lengths (``lengths``: the raw value of ``audio_lengths`` /
    ``vision_lengths``; ``text_mask``: its row of ``text_bert``'s mask), for the modalities that have them."""

    sample_id: str
    split: str
    pickle_split: str
    row: int
    score: float
    features: dict[str, np.ndarray]
    lengths: dict[str, Any] = field(default_factory=dict)
    text_mask: np.ndarray | None = None


@dataclass
class _RawSplit:
    """One split of the pickle, checked for shape: ids, scores, features and length sources."""

    ids: list[str]
    scores: np.ndarray
    features: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    text_mask: np.ndarray | None


@register_dataset("mosi")
class MosiBuilder(DatasetBuilder):
    version = "1"
    description = (
        "CMU-MOSI binary sentiment: text, COVAREP audio and Facet visual feature sequences from the MMSA "
        "or MulT pickle, with the pickle's lengths; the official 1,284/229/686 split."
    )
    Options = MosiOptions

    def sources(self, options: MosiOptions) -> ShardedSource:
        """Read and check the whole pickle (every split, field and shape) and return one ``MosiSample``
        per segment in pickle order (train, valid, test), minus the ties when ``tie=exclude``."""
        path = pickle_path(options)
        data, digest = load_pickle(path, options.format)
        splits = {key: read_split(data, key, path, options) for key in PICKLE_SPLITS}
        check_same_shapes(splits, path)
        items: list[MosiSample] = []
        excluded: list[str] = []
        for key, raw in splits.items():
            for row, sample_id in enumerate(raw.ids):
                score = float(raw.scores[row])
                if options.tie == "exclude" and score == 0.0:  # MMSA "Non0" (§2.5)
                    excluded.append(sample_id)
                    continue
                items.append(
                    MosiSample(
                        sample_id=sample_id,
                        split=PICKLE_SPLITS[key],
                        pickle_split=key,
                        row=row,
                        score=score,
                        features={m: raw.features[m][row] for m in MODALITY_FIELDS},
                        lengths={m: raw.lengths[m][row] for m in raw.lengths},
                        text_mask=None if raw.text_mask is None else raw.text_mask[row],
                    )
                )
        check_unique_ids([i for raw in splits.values() for i in raw.ids], path)
        first = splits["train"]
        lengths_from = {m: LENGTH_FIELDS[m] for m in first.lengths}
        if first.text_mask is not None:
            lengths_from["text"] = f"{TEXT_BERT_FIELD} mask"
        return ShardedSource(
            classes=list(CLASSES),
            items=items,
            decode=decode_samples,
            official_split=np.array([item.split for item in items]),
            modality_kinds=dict.fromkeys(MODALITY_FIELDS, "feature_sequence"),
            shard_size=SHARD_SIZE,
            item_name=functools.partial(sample_name, path),
            build_info={
                "raw_file": str(path),
                "raw_sha256": digest,
                "lengths_from": lengths_from,
                "tie_excluded": excluded,
            },
        )


def pickle_path(options: MosiOptions) -> Path:
    """The pickle to read: ``raw`` / ``file`` (the format's default file when unset)."""
    return Path(options.raw).expanduser() / (options.file or DEFAULT_FILES[options.format])


def load_pickle(path: Path, fmt: str) -> tuple[Any, str]:
    """The unpickled file and its sha256 (recorded in the manifest: which release was built).

    Trusted input only (module docstring). A pickle written by Python 2 (numpy arrays inside) needs
    ``encoding="latin1"``, tried when the default fails to decode its strings."""
    require(path, LAYOUTS[fmt])
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise RawDataError(f"{path}: unreadable ({exc})") from exc
    try:
        try:
            data = pickle.loads(payload)  # trusted input: see the module docstring
        except UnicodeDecodeError:
            data = pickle.loads(payload, encoding="latin1")
    except Exception as exc:  # a truncated or foreign file raises any of a dozen types
        raise RawDataError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); expected layout:\n{LAYOUTS[fmt]}"
        ) from exc
    return data, hashlib.sha256(payload).hexdigest()


def _field(split: Mapping[str, Any], name: str, key: str, path: Path, fmt: str) -> Any:
    if name not in split:
        raise RawDataError(
            f"{path}: split {key!r} has no field {name!r} (it has {sorted(map(str, split))}); expected "
            f"layout (format={fmt}):\n{LAYOUTS[fmt]}"
        )
    return split[name]


def read_split(data: Any, key: str, path: Path, options: MosiOptions) -> _RawSplit:
    """One split's fields, each checked for presence and shape against the split's row count."""
    fmt = options.format
    if not isinstance(data, Mapping):
        raise RawDataError(
            f"{path}: holds a {type(data).__name__}, not a dict of splits; expected layout:\n{LAYOUTS[fmt]}"
        )
    if key not in data:
        raise RawDataError(
            f"{path}: has no split {key!r} (it has {sorted(map(str, data))}); expected layout (format={fmt}):"
            f"\n{LAYOUTS[fmt]}"
        )
    split = data[key]
    if not isinstance(split, Mapping):
        raise RawDataError(f"{path}: split {key!r} is a {type(split).__name__}, not a dict of fields")
    features = {
        m: _features(_field(split, f, key, path, fmt), f, key, path) for m, f in MODALITY_FIELDS.items()
    }
    n = len(features["text"])
    for name, values in features.items():
        if len(values) != n:
            raise RawDataError(
                f"{path}: split {key!r}: field {MODALITY_FIELDS[name]!r} has {len(values)} rows, field "
                f"'text' has {n}"
            )
    scores = _rows(_field(split, LABEL_FIELDS[fmt], key, path, fmt), LABEL_FIELDS[fmt], key, path, n)
    ids = sample_ids(_field(split, "id", key, path, fmt), key, path, n)
    lengths: dict[str, np.ndarray] = {}
    text_mask = None
    if options.use_lengths:  # where the release has them (the MulT one has none)
        for modality, name in LENGTH_FIELDS.items():
            if name in split:
                lengths[modality] = _rows(split[name], name, key, path, n)
        if TEXT_BERT_FIELD in split:
            text_mask = _text_mask(split[TEXT_BERT_FIELD], features["text"].shape[1], key, path, n)
    return _RawSplit(ids, scores, features, lengths, text_mask)


def _features(values: Any, name: str, key: str, path: Path) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 3 or array.dtype.kind not in "iuf":
        raise RawDataError(
            f"{path}: split {key!r}: field {name!r} is {array.dtype}{list(array.shape)}; expected numbers of "
            "shape (N, L, D): N segments of L padded frames of D features"
        )
    return array


def _rows(values: Any, name: str, key: str, path: Path, n: int) -> np.ndarray:
    """A per-row scalar field (scores, lengths) as a flat array of ``n``: ``labels`` is ``N × 1 × 1``."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf" or array.size != n or (array.ndim > 1 and len(array) != n):
        raise RawDataError(
            f"{path}: split {key!r}: field {name!r} is {array.dtype}{list(array.shape)}; expected one "
            f"number per row ({n} rows)"
        )
    return array.reshape(n)


def _text_mask(values: Any, text_len: int, key: str, path: Path, n: int) -> np.ndarray:
    """``text_bert``'s attention-mask row, ``(N, L)``; its L must be the text features' L."""
    array = np.asarray(values)
    if array.ndim != 3 or len(array) != n or array.shape[1] != 3 or array.dtype.kind not in "biuf":
        raise RawDataError(
            f"{path}: split {key!r}: field {TEXT_BERT_FIELD!r} is {array.dtype}{list(array.shape)}; expected "
            f"({n}, 3, L): token ids, attention mask, segment ids"
        )
    if array.shape[2] != text_len:
        raise RawDataError(
            f"{path}: split {key!r}: field {TEXT_BERT_FIELD!r} has {array.shape[2]} token positions but "
            f"'text' has {text_len} frames, so its mask cannot give the text lengths; set use_lengths=false "
            "to store text fixed-length"
        )
    return array[:, MASK_ROW, :]


def sample_ids(values: Any, key: str, path: Path, n: int) -> list[str]:
    """The release's own segment ids: MMSA stores one string per row (``<video>_<segment>``), MulT a row
    of parts (bytes), joined here with ``_``."""
    rows = list(values) if not isinstance(values, np.ndarray) or values.ndim > 0 else []
    if len(rows) != n:
        raise RawDataError(f"{path}: split {key!r}: field 'id' has {len(rows)} entries for {n} rows")
    return ["_".join(_id_part(p) for p in np.atleast_1d(np.asarray(row, dtype=object))) for row in rows]


def _id_part(part: Any) -> str:
    return part.decode("utf-8", errors="replace") if isinstance(part, bytes) else str(part)


def check_same_shapes(splits: Mapping[str, _RawSplit], path: Path) -> None:
    """Every split pads a modality to the same ``(L, D)`` (they are stored in one column)."""
    first_key = next(iter(splits))
    for key, raw in splits.items():
        for modality, name in MODALITY_FIELDS.items():
            want, got = splits[first_key].features[modality].shape[1:], raw.features[modality].shape[1:]
            if got != want:
                raise RawDataError(
                    f"{path}: field {name!r} is (L, D) = {got} in split {key!r} but {want} in {first_key!r}"
                )
        if set(raw.lengths) != set(splits[first_key].lengths) or (raw.text_mask is None) != (
            splits[first_key].text_mask is None
        ):
            raise RawDataError(
                f"{path}: split {key!r} and split {first_key!r} differ in which length fields they have "
                f"({sorted(raw.lengths)} vs {sorted(splits[first_key].lengths)}, {TEXT_BERT_FIELD})"
            )


def check_unique_ids(ids: Sequence[str], path: Path) -> None:
    seen: set[str] = set()
    for sample_id in ids:
        if sample_id in seen:
            raise RawDataError(f"{path}: segment id {sample_id!r} appears twice; ids must be unique")
        seen.add(sample_id)


def sample_name(path: Path, item: MosiSample) -> str:
    """How errors and the manifest's skip list name a sample: the file, its split and row, its id."""
    return f"{path} [{item.pickle_split} row {item.row}, id {item.sample_id}]"


def binary_label(score: float, tie: str) -> int:
    """1 (positive) for a score above 0, 0 below; a score of 0 by ``tie`` (``exclude``d ones never get
    here)."""
    if score == 0.0:
        return 0 if tie == "negative" else 1
    return int(score > 0.0)


def decode_samples(items: Sequence[MosiSample], options: MosiOptions) -> SplitArrays | DecodedShard:
    """A shard of segments as float32 ``(L, D)`` features with their lengths and binary labels; a
    malformed row (non-finite score or feature, a length outside 1..L, a broken mask) is an error naming
    it, or with ``skip_bad`` skipped and listed."""
    path = pickle_path(options)
    kept, decoded, skipped = decode_items(
        items, lambda item: decode_sample(item, options, path), options.skip_bad
    )
    rows = [(item, *values) for item, values in zip(kept, decoded, strict=True)]
    arrays = _stack(rows, items[0], options)
    return DecodedShard(arrays, skipped) if skipped else arrays


def decode_sample(
    item: MosiSample, options: MosiOptions, path: Path
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One segment's float32 features and the lengths of its variable-length modalities."""
    name = sample_name(path, item)
    if not np.isfinite(item.score):
        raise RawDataError(f"{name}: field {LABEL_FIELDS[options.format]!r} is {item.score}, not a number")
    features = {}
    for modality, values in item.features.items():
        values = values.astype(np.float32)  # a copy: the item's arrays stay as read
        if modality == "audio":
            values[values == -np.inf] = 0.0  # COVAREP log-energies; MMSA does the same (§2.5)
        if options.nonfinite == "zero":
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        elif not np.isfinite(values).all():
            raise RawDataError(
                f"{name}: field {MODALITY_FIELDS[modality]!r} holds {int((~np.isfinite(values)).sum())} NaN "
                "or inf values; build with nonfinite=zero to set them to 0, or --skip-bad to skip the sample"
            )
        features[modality] = values
    lengths = {
        m: _pickle_length(v, LENGTH_FIELDS[m], len(features[m]), name) for m, v in item.lengths.items()
    }
    if item.text_mask is not None:
        lengths["text"] = _mask_length(item.text_mask, name)
    return features, lengths


def _pickle_length(value: Any, field_name: str, padded: int, name: str) -> int:
    """A length as the pickle gives it: a whole number within 1..padded (not clipped: a length beyond
    the stored frames means the field does not describe this array)."""
    length = float(value)
    if not length.is_integer() or not 1 <= length <= padded:
        raise RawDataError(
            f"{name}: field {field_name!r} is {value}, not a whole number in 1..{padded} (the padded length)"
        )
    return int(length)


def _mask_length(mask: np.ndarray, name: str) -> int:
    """The number of tokens of an attention mask that is ones, then zeros (at least one token)."""
    values = np.asarray(mask)
    length = int(np.count_nonzero(values))
    expected = np.arange(len(values)) < length
    if length < 1 or not np.array_equal(values, expected.astype(values.dtype)):
        raise RawDataError(
            f"{name}: the mask row of field {TEXT_BERT_FIELD!r} is not ones followed by zeros with at "
            f"least one token ({values.tolist()})"
        )
    return length


def _stack(
    rows: Sequence[tuple[MosiSample, dict[str, np.ndarray], dict[str, int]]],
    first: MosiSample,
    options: MosiOptions,
) -> SplitArrays:
    """The shard's kept rows as ``SplitArrays`` (empty, with the right shapes, if every row was skipped)."""
    variable = [*first.lengths, *(["text"] if first.text_mask is not None else [])]
    scores = np.array([item.score for item, _, _ in rows], dtype=np.float64)
    return SplitArrays(
        ids=np.array([item.sample_id for item, _, _ in rows], dtype=str),
        labels=np.array([binary_label(s, options.tie) for s in scores], dtype=np.int64),
        modalities={
            m: np.stack([f[m] for _, f, _ in rows])
            if rows
            else np.zeros((0, *first.features[m].shape), np.float32)
            for m in MODALITY_FIELDS
        },
        subsets={} if options.tie == "exclude" else {NON0_SUBSET: scores != 0.0},
        lengths={m: np.array([n[m] for _, _, n in rows], dtype=np.int64) for m in variable},
    )
