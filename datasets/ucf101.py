"""``ucf101``: UCF-101 action recognition, RGB frames + TV-L1 optical flow, 101 classes (datasets.md §2.3).

The builder reads the official split-1 lists and the frames a UCF-101 frame/flow release extracts per
video (the MIDAS code's ``frames_rgb/``, ``flows_u/``, ``flows_v/`` folders by default; every folder name
is an option, so BalanceBenchmark's ``flow_path_u`` / ``flow_path_v`` work too) and stores, per video:

* ``visual``: uint8 ``(3, frames, size, size)``: ``frames`` RGB frames evenly spread over the folder's
  sorted JPGs (``read_frame_folder``; default 6, the six ``img_0000{1..6}.jpg`` both loaders read);
* ``flow``: uint8 ``(2, flow_frames, size, size)``: the u and v grayscale flow JPGs of the same indices as
  two channels (``read_flow_folders``), so a 2-channel ResNet-18 reads it as a clip.

The models read 3 frames of each: the preset's ``frames`` transform picks one per segment (random in
training, the middle one for evaluation), as the loaders do (§2.3).

Labels: the class folder of each list row (``ClassName/v_ClassName_gXX_cYY.avi``), indexed in
``classInd.txt``'s order (label = classInd index − 1). Both field loaders sort the names instead; Python's
code-point sort differs from classInd in two pairs (``HammerThrow`` < ``Hammering``, ``JumpRope`` <
``JumpingJack``), so their label numbers of those four classes differ from ours; the classes are the same.

Split lists: ``trainlist01.txt`` / ``testlist01.txt`` (the official release), or, where those are absent,
the MIDAS code's ``trainlist01_new.txt`` / ``testlist01_new.txt``, which start with a header row (a first
row whose first field holds no ``/`` is taken as a header). A trailing label column is not read.

Official protocol: split 1's train and test lists. UCF-101 has no validation list (BalanceBenchmark
trains without one), so ``val`` is a seeded stratified share of the train list: per class,
``round(val_fraction · n)`` of its ``n`` train videos (at least 1 and at most ``n − 1`` when ``n ≥ 2``),
drawn with ``numpy.random.default_rng([val_seed, label])``. ``midas70`` pools both lists (§1.1).

Every folder is checked before decoding: a missing one is named with the expected layout (``LAYOUT``).
With ``skip_bad`` a video whose folder is missing or holds a file that does not decode is skipped and
listed in the manifest (the MIDAS loader drops videos without their three folders silently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from pydantic import Field

from .builders import BuilderOptions, DatasetBuilder, register_dataset
from .format import SplitArrays
from .raw.layout import RawDataError, require, require_dir
from .raw.video import frame_files, read_flow_folders, read_frame_folder
from .sharded_build import DecodedShard, ShardedSource, decode_items

CLASS_INDEX = "classInd.txt"
TRAIN_LISTS = ("trainlist01.txt", "trainlist01_new.txt")  # the official name first, then the MIDAS one
TEST_LISTS = ("testlist01.txt", "testlist01_new.txt")
SHARD_SIZE = 32  # videos per decoded shard: about 45 MB of frames at 224 x 224

LAYOUT = """\
<raw>/
  ucfTrainTestlist/                      split lists (option lists_dir; '.' = <raw> itself, as MIDAS)
    classInd.txt                         '<idx> <ClassName>' per line, idx 1..101
    trainlist01.txt                      'ClassName/v_ClassName_gXX_cYY.avi <idx>' per line
    testlist01.txt                       'ClassName/v_ClassName_gXX_cYY.avi' per line
                                         (or trainlist01_new.txt / testlist01_new.txt with a header row)
  frames_rgb/v_ClassName_gXX_cYY/*.jpg   RGB frames, read in sorted order (option rgb_dir)
  flows_u/v_ClassName_gXX_cYY/*.jpg      horizontal flow, grayscale (option flow_u_dir)
  flows_v/v_ClassName_gXX_cYY/*.jpg      vertical flow, as many frames as flows_u (option flow_v_dir)"""


class UCF101Options(BuilderOptions):
    """Build settings of ``ucf101``; any change gives a separate cached directory."""

    raw: str = Field(description="root of the raw download (the layout in datasets/ucf101.py LAYOUT)")
    skip_bad: bool = Field(
        default=False,
        description="skip a video whose folder is missing or holds a JPG that does not decode (listed in "
        "the manifest)",
    )
    lists_dir: str = Field(
        default="ucfTrainTestlist",
        description="folder under raw holding classInd.txt and the split-1 lists ('.': raw itself)",
    )
    rgb_dir: str = Field(
        default="frames_rgb", description="folder under raw of the per-video RGB frame folders"
    )
    flow_u_dir: str = Field(default="flows_u", description="folder under raw of the per-video u-flow folders")
    flow_v_dir: str = Field(default="flows_v", description="folder under raw of the per-video v-flow folders")
    frames: int = Field(default=6, ge=1, le=64, description="RGB frames stored per video (spread evenly)")
    flow_frames: int = Field(
        default=6, ge=1, le=64, description="flow frames stored per video (spread evenly)"
    )
    size: int = Field(default=224, ge=8, le=1024, description="stored frame height and width (square)")
    val_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="official split: share of each class's train videos held out as val",
    )
    val_seed: int = Field(default=2, ge=0, description="official split: seed of the stratified val draw")


@dataclass(frozen=True)
class UCFVideo:
    """One video to decode: its id (``v_ClassName_gXX_cYY``), label and three frame folders."""

    video: str
    label: int
    rgb: str
    flow_u: str
    flow_v: str


def _video_name(item: UCFVideo) -> str:
    return f"video {item.video} ({item.rgb})"


@register_dataset("ucf101")
class UCF101Builder(DatasetBuilder):
    version = "1"
    description = (
        "UCF-101 split 1 (101 actions): RGB frames and TV-L1 optical flow (u, v) per video, uint8 clips."
    )
    Options = UCF101Options

    def sources(self, options: UCF101Options) -> ShardedSource:
        """Read classInd and the split-1 lists, check every video's folders, and list one ``UCFVideo`` per
        row (train list first, then test list, in file order)."""
        raw = require_dir(Path(options.raw), LAYOUT)
        lists = raw / options.lists_dir
        classes = read_class_index(require(lists / CLASS_INDEX, LAYOUT))
        train_list, test_list = find_list(lists, TRAIN_LISTS), find_list(lists, TEST_LISTS)
        rows = [(v, c, "train") for v, c in read_split_list(train_list, classes)]
        rows += [(v, c, "test") for v, c in read_split_list(test_list, classes)]
        _check_unique(rows, train_list, test_list)
        items = [
            UCFVideo(
                video=video,
                label=classes.index(name),
                rgb=str(raw / options.rgb_dir / video),
                flow_u=str(raw / options.flow_u_dir / video),
                flow_v=str(raw / options.flow_v_dir / video),
            )
            for video, name, _ in rows
        ]
        if not options.skip_bad:  # with skip_bad, decode skips (and lists) a video with a missing folder
            for item in items:
                for folder in (item.rgb, item.flow_u, item.flow_v):
                    require_frames(Path(folder))
        split = np.array([s for _, _, s in rows])
        labels = np.array([item.label for item in items], dtype=np.int64)
        split[split == "train"] = official_train_val(
            labels[split == "train"], options.val_fraction, options.val_seed
        )
        return ShardedSource(
            classes=classes,
            items=items,
            decode=decode_videos,
            official_split=split,
            modality_kinds={"flow": "optical_flow", "visual": "video"},
            shard_size=SHARD_SIZE,
            item_name=_video_name,
            build_info={"split_lists": {"train": train_list.name, "test": test_list.name}},
        )


def read_class_index(path: Path) -> list[str]:
    """The class names of ``classInd.txt`` in index order; the indices must be 1..N, each once."""
    by_index: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise RawDataError(f"{path}, line {number}: expected '<idx> <ClassName>', got {line.strip()!r}")
        index = int(fields[0])
        if index in by_index:
            raise RawDataError(f"{path}, line {number}: index {index} appears twice")
        by_index[index] = fields[1]
    if sorted(by_index) != list(range(1, len(by_index) + 1)):
        raise RawDataError(f"{path}: class indices must be 1..{len(by_index)}, got {sorted(by_index)}")
    names = [by_index[i] for i in sorted(by_index)]
    if len(set(names)) != len(names):
        raise RawDataError(f"{path}: a class name appears twice")
    return names


def find_list(folder: Path, names: Sequence[str]) -> Path:
    """The first of ``names`` that exists in ``folder`` (the official list, else the MIDAS one)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise RawDataError(
        f"{folder / names[0]}: not found (nor {', '.join(names[1:])}); expected layout:\n{LAYOUT}"
    )


def read_split_list(path: Path, classes: Sequence[str]) -> list[tuple[str, str]]:
    """``(video id, class name)`` per row of a split list, in file order. A first row whose first field
    holds no ``/`` is a header (the MIDAS ``*_new.txt`` lists); fields after the path are not read."""
    known = set(classes)
    rows: list[tuple[str, str]] = []
    lines = [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), start=1)]
    lines = [(n, fields) for n, fields in lines if fields]
    if lines and "/" not in lines[0][1][0]:
        lines = lines[1:]  # the header row of a MIDAS *_new.txt list
    for number, fields in lines:
        if "/" not in fields[0]:
            raise RawDataError(
                f"{path}, line {number}: expected 'ClassName/v_ClassName_gXX_cYY.avi', "
                f"got {' '.join(fields)!r}"
            )
        entry = PurePosixPath(fields[0])
        name, video = entry.parts[0], entry.stem
        if name not in known:
            raise RawDataError(f"{path}, line {number}: class {name!r} is not in {CLASS_INDEX}")
        rows.append((video, name))
    if not rows:
        raise RawDataError(f"{path}: holds no videos")
    return rows


def _check_unique(rows: Sequence[tuple[str, str, str]], train_list: Path, test_list: Path) -> None:
    """Each video id once over both lists (ids are the sample ids)."""
    seen: dict[str, str] = {}
    for video, _, split in rows:
        if video in seen:
            where = {"train": train_list, "test": test_list}
            raise RawDataError(f"video {video} is listed twice ({where[seen[video]]}, {where[split]})")
        seen[video] = split


def require_frames(folder: Path) -> None:
    """``folder`` exists and holds at least one frame; else an error naming it and the layout."""
    require_dir(folder, LAYOUT)
    try:
        frame_files(folder)
    except RawDataError as exc:
        raise RawDataError(f"{exc}; expected layout:\n{LAYOUT}") from exc


def official_train_val(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``"train"`` or ``"val"`` per row of the train list: per class, ``round(fraction · n)`` of its ``n``
    rows (clipped to 1..n−1 when n ≥ 2; none when n = 1) become val, drawn with
    ``default_rng([seed, label])`` so one class's draw does not depend on the others."""
    out = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        rows = np.nonzero(labels == label)[0]
        if len(rows) < 2:
            continue
        count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
        chosen = np.random.default_rng([seed, int(label)]).permutation(len(rows))[:count]
        out[rows[chosen]] = "val"
    return out.astype(str)


def decode_videos(items: Sequence[UCFVideo], options: UCF101Options) -> DecodedShard:
    """A shard of videos: RGB frames and u/v flow at ``size``; with ``skip_bad``, a video whose folder is
    missing or holds an undecodable JPG is skipped with the reason (naming the file)."""
    size = (options.size, options.size)

    def decode_one(item: UCFVideo) -> tuple[np.ndarray, np.ndarray]:
        rgb = read_frame_folder(Path(item.rgb), options.frames, size)
        return rgb, read_flow_folders(Path(item.flow_u), Path(item.flow_v), options.flow_frames, size)

    kept, decoded, skipped = decode_items(items, decode_one, options.skip_bad)
    visual, flow = [v for v, _ in decoded], [f for _, f in decoded]
    arrays = SplitArrays(
        ids=np.array([item.video for item in kept], dtype=str),
        labels=np.array([item.label for item in kept], dtype=np.int64),
        modalities={
            "flow": _stack(flow, (2, options.flow_frames, *size)),
            "visual": _stack(visual, (3, options.frames, *size)),
        },
    )
    return DecodedShard(arrays, skipped)


def _stack(rows: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """uint8 rows stacked, or an empty ``(0, *shape)`` array when every video of the shard was skipped."""
    return np.stack(rows) if rows else np.empty((0, *shape), dtype=np.uint8)
