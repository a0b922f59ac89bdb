"""``twitter2015``: target-oriented multimodal sentiment of TomBERT (Yu & Jiang, IJCAI 2019), a tweet's
image and its text with one target, 3 classes (datasets.md §2.7).

Raw layout: TomBERT's ``train.tsv``, ``dev.tsv`` and ``test.tsv`` (``absa_data/twitter2015/`` in its
repository), a header row and then tab-separated ``index, label (0/1/2), image id (<id>.jpg), tweet with
the target replaced by $T$, target``; the test file's header names differ, its column order does not,
so the header row is skipped unread. Images: ``<images_dir>/<image id>``.

Text, as §2.7 says: the tweet with ``$T$`` restored to the target is the first sentence and the target
the second, tokenized as a pair (``[CLS] tweet [SEP] target [SEP]``). Stored: ``text`` int32
``(max_length, 2)`` with lengths: the pair's token ids and its segment ids (0 for the tweet, 1 for the
target) side by side, which ``hf_text`` passes as ``input_ids`` and ``token_type_ids``; ``max_length``
64 by default, TomBERT's ``max_seq_length``.

Sample ids are ``<file>-<index>`` (``train-17``): a tweet appears in several rows with different
targets, and the index column is only unique within its file. Labels: TomBERT's 0 / 1 / 2, with 1
neutral (§2.7); 0 negative and 2 positive is our reading of its shifted -1 / 0 / 1 polarity [inferred].

Splits: ``official`` is train / dev / test (3,179 / 1,122 / 1,037 rows, §2.7); ``midas70`` pools them,
the MIDAS paper's 70/10/20 re-split (3,736 / 534 / 1,068, Table 5).
"""

from __future__ import annotations

from pathlib import Path

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
CLASSES = ["negative", "neutral", "positive"]
SPLIT_FILES = {"train": "train", "val": "dev", "test": "test"}  # our split name -> TomBERT's file stem
TARGET_MARK = "$T$"

LAYOUT = """\
<raw>/train.tsv, <raw>/dev.tsv, <raw>/test.tsv
    a header row, then: index <TAB> label (0/1/2) <TAB> <image id>.jpg <TAB> tweet with $T$ <TAB> target
<raw>/<images_dir>/<image id>.jpg"""


class Twitter2015Options(ImageTextOptions):
    """Build settings of ``twitter2015``; any change gives a separate cached directory."""

    max_length: int = Field(
        default=64,
        ge=4,
        le=4096,
        description="token ids kept per tweet + target pair, special tokens included (64: TomBERT)",
    )
    images_dir: str = Field(
        default="twitter15_images", description="folder under the raw root holding the tweets' images"
    )


@register_dataset("twitter2015")
class Twitter2015Builder(DatasetBuilder):
    version = "1"
    description = (
        "Twitter2015 (TomBERT): a tweet's image and text with one target, 3 sentiment classes; "
        "ELECTRA-small token ids of the (tweet, target) pair plus its segment ids."
    )
    Options = Twitter2015Options

    def sources(self, options: Twitter2015Options) -> ShardedSource:
        """Parse the three TSVs, check every image, then one ``ImageTextItem`` per row (train, dev, test;
        file order) whose text is the restored tweet and whose pair is the target."""
        raw = require_dir(Path(options.raw), LAYOUT)
        items, splits = [], []
        for split, stem in SPLIT_FILES.items():
            for item in read_tsv(require(raw / f"{stem}.tsv", LAYOUT), stem, raw / options.images_dir):
                items.append(item)
                splits.append(split)
        return image_text_source(
            items, splits, CLASSES, options, layout=LAYOUT, shard_size=SHARD_SIZE, pairs=True
        )


def read_tsv(path: Path, stem: str, images: Path) -> list[ImageTextItem]:
    """The rows of a TomBERT TSV after its header row: five tab-separated fields each, the label 0..2 and
    the tweet holding ``$T$``; a malformed line is named ``file:line``."""
    items = []
    for number, line in enumerate(read_lines(path)[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != 5:
            raise RawDataError(
                f"{where}: {len(fields)} tab-separated fields, expected 5 "
                "(index, label, image id, tweet, target)"
            )
        index, label, image, tweet, target = (field.strip() for field in fields)
        if label not in ("0", "1", "2"):
            raise RawDataError(f"{where}: label {label!r}, expected 0, 1 or 2")
        if TARGET_MARK not in tweet:
            raise RawDataError(f"{where}: the tweet holds no {TARGET_MARK} to restore the target into")
        items.append(
            ImageTextItem(
                sample_id=f"{stem}-{index}",
                label=int(label),
                image=str(images / image),
                text=restore_target(tweet, target),
                source=where,
                pair=target,
            )
        )
    return items


def restore_target(tweet: str, target: str) -> str:
    """The tweet with every ``$T$`` replaced by the target (§2.7: the first sentence of the pair)."""
    return tweet.replace(TARGET_MARK, target)
