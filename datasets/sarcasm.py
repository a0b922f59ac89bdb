"""``sarcasm``: the Twitter multimodal sarcasm set of HFM (Cai et al., ACL 2019), image + tweet, 2 classes
(datasets.md §2.6).

Raw layout: HFM's text files ``text/train.txt``, ``text/valid2.txt`` and ``text/test2.txt``, one Python
list literal a line (``[tweet_id, text, label]`` in train, ``[id, text, hashtag_label, human_label]`` in
valid2/test2), and the images ``<images_dir>/<tweet_id>.jpg`` from the Google-Drive archives of HFM's
README. The rows are parsed with ``ast.literal_eval`` (literals only: a line is data, never code), and
the label is the **last element**, as HFM's loader takes it (the human label in valid2/test2).

HFM's keyword filter is applied to every split (``keyword_filter``): a post whose white-space tokens
include any of ``FILTER_KEYWORDS`` is left out, before the images are checked. How many rows each split
lost is recorded in the manifest (``build_options["keyword_filtered_rows"]``), so nothing goes silently. After
the filter HFM's files give 19,816 / 2,410 / 2,409 posts (§2.6).

Splits: ``official`` is HFM's train / valid2 / test2; ``midas70`` pools the three (the MIDAS paper's
70/10/20 re-split; its 24,715 total exceeds HFM's filtered 24,635 by 80 posts of unknown origin, §1.2).
Text: the tweet as it is in the files, ELECTRA-small token ids, ``max_length`` 128 by default (a choice:
HFM's own model reads 75 words, and WordPiece splits words into more tokens).
"""

from __future__ import annotations

import ast
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
CLASSES = ["not_sarcastic", "sarcastic"]
SPLIT_FILES = {"train": "train.txt", "val": "valid2.txt", "test": "test2.txt"}
# HFM's loader drops posts holding any of these white-space tokens (§2.6)
FILTER_KEYWORDS = frozenset(
    {
        "sarcasm",
        "sarcastic",
        "reposting",
        "<url>",
        "joke",
        "jokes",
        "humour",
        "humor",
        "irony",
        "ironic",
        "exgag",
    }
)

LAYOUT = """\
<raw>/text/train.txt     one Python list a line: ['<tweet_id>', '<text>', <label>]
<raw>/text/valid2.txt    ['<tweet_id>', '<text>', <hashtag_label>, <human_label>] (label: the last element)
<raw>/text/test2.txt     as valid2.txt
<raw>/<images_dir>/<tweet_id>.jpg"""


class SarcasmOptions(ImageTextOptions):
    """Build settings of ``sarcasm``; any change gives a separate cached directory."""

    max_length: int = Field(
        default=128, ge=4, le=4096, description="token ids kept per tweet, special tokens included"
    )
    images_dir: str = Field(default="images", description="folder under the raw root holding <tweet_id>.jpg")
    keyword_filter: bool = Field(
        default=True, description="leave out posts holding a sarcasm keyword token, as HFM's loader"
    )


@register_dataset("sarcasm")
class SarcasmBuilder(DatasetBuilder):
    version = "1"
    description = (
        "Twitter multimodal sarcasm (HFM): a tweet's image and text, 2 classes, HFM's keyword filter; "
        "ELECTRA-small token ids."
    )
    Options = SarcasmOptions

    def sources(self, options: SarcasmOptions) -> ShardedSource:
        """Parse the three text files, apply the keyword filter, check every kept post's image, then one
        ``ImageTextItem`` per post (train, val, test; file order)."""
        raw = require_dir(Path(options.raw), LAYOUT)
        images = raw / options.images_dir
        items, splits, dropped = [], [], {}
        for split, file_name in SPLIT_FILES.items():
            rows = read_hfm_file(require(raw / "text" / file_name, LAYOUT))
            kept = [row for row in rows if not options.keyword_filter or passes_filter(row[1])]
            dropped[split] = len(rows) - len(kept)
            for tweet_id, text, label, where in kept:
                items.append(ImageTextItem(tweet_id, label, str(images / f"{tweet_id}.jpg"), text, where))
                splits.append(split)
        return image_text_source(
            items,
            splits,
            CLASSES,
            options,
            layout=LAYOUT,
            shard_size=SHARD_SIZE,
            extra_info={"keyword_filtered_rows": dropped},
        )


def read_hfm_file(path: Path) -> list[tuple[str, str, int, str]]:
    """``(tweet_id, text, label, "file:line")`` per non-blank line of an HFM text file. Each line is a
    Python list literal read with ``ast.literal_eval``; the label is its last element and must be 0 or
    1; a line that is no such list is named."""
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise RawDataError(f"{where}: not a Python list literal ({type(exc).__name__}: {exc})") from exc
        if not isinstance(row, list | tuple) or len(row) < 3:
            raise RawDataError(
                f"{where}: expected a list [tweet_id, text, ..., label], got {line.strip()[:80]!r}"
            )
        tweet_id, text, label = row[0], row[1], row[-1]
        if not isinstance(text, str):
            raise RawDataError(f"{where}: the text (second element) is {type(text).__name__}, not a string")
        if isinstance(label, bool) or label not in (0, 1):
            raise RawDataError(f"{where}: the label (last element) is {label!r}, expected 0 or 1")
        rows.append((str(tweet_id), text, int(label), where))
    return rows


def passes_filter(text: str) -> bool:
    """HFM's filter (§2.6): False when any white-space token of the post is a filter keyword."""
    return FILTER_KEYWORDS.isdisjoint(text.split())
