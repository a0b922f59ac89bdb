"""What the image + text builders share (``food101``, ``sarcasm``, ``twitter2015``; datasets.md §2.4,
§2.6, §2.7): their common options, one item type, the layout check and the shard decoder.

Every sample is one image and one text (Twitter2015: a sentence pair). ``sources`` of a builder parses
its own list files into ``ImageTextItem`` rows (paths and strings only, so items pickle cheaply and hash
deterministically) and checks that every image exists; ``decode_image_text`` then reads a shard's images
with ``raw.image.read_image`` and tokenizes its texts in one call with ``raw.text.encode``. Stored:

* ``visual``: uint8 ``(3, S, S)``, ``S`` = ``image_size`` (resized, not cropped: the MIDAS code resizes
  to 224 × 224 in training and evaluation alike, §2.4; crops and flips are device transforms);
* ``text``: int32 token ids ``(max_length,)``, padded with the tokenizer's pad id, a variable-length
  modality (``lengths``), so the encoder's attention mask comes from the stored lengths;
  for a sentence pair (Twitter2015) ``(max_length, 2)``: the ids and the pair's segment ids side by side,
  which ``hf_text`` hands to the model as ``input_ids`` and ``token_type_ids``.

The tokenizer's identity goes into the manifest (``build_info``) so a run whose text encoder uses another
vocabulary can be refused.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from .builders import BuilderOptions
from .format import SplitArrays
from .raw.image import read_image
from .raw.layout import RawDataError, require
from .raw.text import TOKENIZER_KEY, encode, identity, load_tokenizer
from .sharded_build import DecodedShard, ShardedSource, decode_items

TEXT, VISUAL = "text", "visual"
DEFAULT_TOKENIZER = "google/electra-small-discriminator"  # the MIDAS Food-101 text encoder (§1.3)


class ImageTextOptions(BuilderOptions):
    """Settings every image + text builder takes; a builder may change a default (``max_length``)."""

    raw: str = Field(description="root of the raw download (`--raw PATH`); the layout is in the docs")
    skip_bad: bool = Field(
        default=False,
        description="skip a sample whose image cannot be decoded (listed in the manifest) instead of failing",
    )
    image_size: int = Field(
        default=224, ge=8, le=1024, description="stored image side S: every image is resized to S x S"
    )
    # not "tokenizer": the manifest's build_options hold the tokenizer's identity under that key
    tokenizer_name: str = Field(
        default=DEFAULT_TOKENIZER,
        description="Hugging Face tokenizer: a hub name or a local folder (must match the text encoder)",
    )
    max_length: int = Field(
        default=128, ge=4, le=4096, description="token ids kept per text, special tokens included"
    )


@dataclass(frozen=True)
class ImageTextItem:
    """One sample to decode: its id, label, image file, text (and the second sentence of a pair), and
    where its row came from (``source``: ``file:line``, for messages)."""

    sample_id: str
    label: int
    image: str
    text: str
    source: str
    pair: str | None = None


def item_name(item: ImageTextItem) -> str:
    """The raw file an error is about: the image (the text was parsed before decoding)."""
    return f"{item.image} (sample {item.sample_id}, {item.source})"


def require_images(items: Iterable[ImageTextItem], layout: str) -> None:
    """Every item's image exists, else an error naming the first missing one and the layout."""
    for item in items:
        require(Path(item.image), layout)


def require_unique_ids(items: Sequence[ImageTextItem]) -> None:
    """Sample ids identify rows in split manifests and reports: two rows with one id is an error naming
    both rows, never a silent drop of either."""
    seen: dict[str, ImageTextItem] = {}
    for item in items:
        first = seen.setdefault(item.sample_id, item)
        if first is not item:
            raise RawDataError(
                f"{item.source}: sample id {item.sample_id!r} is used again (first at {first.source})"
            )


def official_splits(items: Sequence[ImageTextItem], splits: Sequence[str]) -> np.ndarray:
    """The per-item split names as the array ``ShardedSource.official_split`` takes."""
    if len(splits) != len(items):
        raise ValueError(f"{len(splits)} split names for {len(items)} items")
    return np.asarray(splits, dtype=str)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str) -> Any:
    """One tokenizer per name and process: a worker loads it once, not once per shard."""
    return load_tokenizer(name)


def tokenizer_info(options: ImageTextOptions) -> dict[str, Any]:
    """``build_info`` of a text build: the tokenizer's identity per text modality (only ``text`` holds
    token ids; segment ids are positions of a pair, not vocabulary). Loading it here also fails a build
    with an unusable tokenizer before any image is decoded."""
    ident = identity(cached_tokenizer(options.tokenizer_name), options.tokenizer_name, options.max_length)
    return {TOKENIZER_KEY: {TEXT: ident.as_dict()}}


def decode_image_text(
    items: Sequence[ImageTextItem], options: ImageTextOptions
) -> SplitArrays | DecodedShard:
    """A shard: each item's image read at ``image_size``, then every kept text tokenized in one call
    (pairs when the items carry a second sentence). A corrupt image raises ``RawDataError`` naming it,
    or with ``skip_bad`` drops that item and lists it with the reason."""
    size = (options.image_size, options.image_size)
    kept, pixels, skipped = decode_items(
        items, lambda item: read_image(Path(item.image), size), options.skip_bad
    )
    arrays = _rows(kept, pixels, options, pairs=items[0].pair is not None)
    return DecodedShard(arrays, skipped) if skipped else arrays


def _rows(
    kept: Sequence[ImageTextItem], pixels: list[np.ndarray], options: ImageTextOptions, *, pairs: bool
) -> SplitArrays:
    """The decoded rows; an empty shard (every item skipped) still has every column, with 0 rows."""
    size, length = options.image_size, options.max_length
    if kept:
        ids, lengths, segments = encode(
            cached_tokenizer(options.tokenizer_name),
            [item.text for item in kept],
            length,
            pairs=[str(item.pair) for item in kept] if pairs else None,
        )
        visual = np.stack(pixels)
    else:
        ids, lengths = np.zeros((0, length), np.int32), np.zeros(0, np.int64)
        segments = np.zeros((0, length), np.int32) if pairs else None
        visual = np.zeros((0, 3, size, size), np.uint8)
    text = ids if segments is None else np.stack([ids, segments], axis=-1)  # (n, L, 2) for a pair
    return SplitArrays(
        ids=np.array([item.sample_id for item in kept], dtype=str),
        labels=np.array([item.label for item in kept], dtype=np.int64),
        modalities={TEXT: text, VISUAL: visual},
        lengths={TEXT: lengths},
    )


def modality_kinds(pairs: bool) -> dict[str, str]:
    return {TEXT: "token-pairs" if pairs else "tokens", VISUAL: "image"}


def image_text_source(
    items: Sequence[ImageTextItem],
    splits: Sequence[str],
    classes: Sequence[str],
    options: ImageTextOptions,
    *,
    layout: str,
    shard_size: int,
    pairs: bool = False,
    extra_info: dict[str, Any] | None = None,
) -> ShardedSource:
    """What every image + text builder's ``sources`` ends with: sample ids checked unique and every
    image present (the first missing one named with ``layout``), then the source decoding the items
    with ``decode_image_text``, the tokenizer's identity and the builder's own facts in ``build_info``."""
    require_unique_ids(items)
    require_images(items, layout)
    return ShardedSource(
        classes=list(classes),
        items=items,
        decode=decode_image_text,
        official_split=official_splits(items, splits),
        modality_kinds=modality_kinds(pairs),
        shard_size=shard_size,
        item_name=item_name,
        build_info={**tokenizer_info(options), **(extra_info or {})},
    )


def read_lines(path: Path) -> list[str]:
    """A UTF-8 text file's lines (a byte-order mark dropped), naming the file if it does not decode."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RawDataError(f"{path}: unreadable as UTF-8 text ({exc})") from exc
