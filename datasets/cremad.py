"""``cremad``: CREMA-D (audio + video, 6 emotions) built from its raw release (datasets.md §2.1).

Raw layout read (``LAYOUT``)::

    <raw>/AudioWAV/<clip>.wav              every clip's audio (16 kHz WAV)
    <raw>/Image-01-FPS/<clip>/*.jpg        extracted frames (OGM-GE's video_preprocessing.py), or
    <raw>/VideoFlash/<clip>.flv            the release's videos, decoded with PyAV when no frame folder tree
    <split_dir>/train.csv, test.csv        optional: OGM-GE's official lists (``clip,EMOTION``, no header)

Clip ids are ``<actor>_<sentence>_<EMO>_<level>`` (``1001_DFA_ANG_XX``): the label is parsed from the id.
The classes are ``ANG, DIS, FEA, HAP, NEU, SAD`` in that order — the MIDAS code's order, which sorts the
names of OGM-GE's ``stat.csv`` — unless ``classes_file`` gives another (one name per line, e.g. OGM-GE's
``stat.csv`` itself for its ``NEU, HAP, SAD, FEA, DIS, ANG``).

Splits. With OGM-GE's ``train.csv`` / ``test.csv`` (6,698 / 744 rows) the pool is their clips and the
``official`` protocol uses them; they have no validation list, so ``official`` cuts a stratified
``val_fraction`` of the train list (seeded by ``val_seed``, scikit-learn's ``train_test_split``) as
validation. Without them every clip of ``AudioWAV/`` is pooled and only ``midas70`` applies (the build
warns at once; ``--split official`` then fails). ``midas70`` pools train and test lists, as the MIDAS
code does (§1.1: 7,442 → 5,209 / 744 / 1,489).

Which clips are kept. The MIDAS loader silently drops a clip whose WAV is missing or whose frame folder
holds fewer than ``fps`` (3) frames. Here nothing is dropped silently: the layout is validated up front
and the first missing WAV, frame folder, video or a folder with fewer than ``min_frames`` frames is named
(exit 2). With ``--skip-bad`` such clips, and clips whose files do not decode, are skipped instead and
listed under ``build_options.skipped`` in the manifest. ``min_frames=3`` reproduces the MIDAS filter.

Stored: ``audio`` float16 ``(audio_frames, 128)``, ``(1024, 128)`` by default (``raw.audio.fbank_clip``:
the Kaldi fbank of §4 from the native-rate WAV, padded or cut to 1024 frames and AudioSet-normalised as
the field does) and ``visual`` uint8 ``(3, frames, image_size, image_size)``: ``frames`` frames spread
evenly over the clip (``raw.video``), resized to a square. The models read 3 frames, chosen per segment
by the ``frames`` transform (the preset), so ``frames`` (default 6) leaves the training draw a choice
within each segment, as the MIDAS loader's random frame per segment does.

The clip pieces (``AVClip``, ``decode_av_clips``, the up-front checks, the val cut, the class file) are
shared with ``kinetics_sounds``, which has the same audio and frame-folder form.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import Field, field_validator

from .builders import BuilderOptions, DatasetBuilder, register_dataset
from .format import DatasetFormatError, SplitArrays
from .raw.audio import CLIP_FRAMES, MEL_BINS, fbank_clip
from .raw.layout import RawDataError, require, require_dir
from .raw.video import frame_files, read_frame_folder, read_video_file
from .sharded_build import DecodedShard, ShardedSource, decode_items

CLASSES = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")  # sorted, as the MIDAS code orders them (§2.1)
SHARD_SIZE = 64  # clips per decoded shard (about 60 MB of frames at the defaults)
MODALITY_KINDS = {"audio": "fbank", "visual": "video"}

LAYOUT = """\
  <raw>/AudioWAV/<clip>.wav            (e.g. 1001_DFA_ANG_XX.wav)
  <raw>/Image-01-FPS/<clip>/*.jpg      frame folders (option frames_dir), or else
  <raw>/VideoFlash/<clip>.flv          the videos (decoded with PyAV)
  <split_dir>/train.csv, test.csv      optional: OGM-GE's lists, rows 'clip,EMOTION' (split_dir: <raw>)"""


# ----------------------------------------------------------------------------------------- options


def absolute_path(path: str | None) -> str | None:
    """A path option as an absolute path, so that the CLI (which resolves ``--raw``) and a config that
    names the same folder another way share one options hash and one cached build."""
    return None if path is None else str(Path(path).expanduser().resolve())


class CremadOptions(BuilderOptions):
    """Build settings of ``cremad``; any change gives a separate cached directory."""

    raw: str = Field(description="root of the CREMA-D download (holds AudioWAV/ and the visual folder)")
    skip_bad: bool = Field(
        default=False,
        description="skip (and list in the manifest) clips whose files are missing or do not decode",
    )
    frames: int = Field(
        default=6, ge=1, le=64, description="frames stored per clip, spread evenly (the models read 3)"
    )
    image_size: int = Field(default=224, ge=8, le=1024, description="stored frame height and width")
    audio_frames: int = Field(
        default=CLIP_FRAMES, ge=1, le=8192, description="fbank frames stored (padded or cut; the field: 1024)"
    )
    visual_source: Literal["auto", "frames", "video"] = Field(
        default="auto",
        description="frames: <raw>/<frames_dir>/<clip>/*.jpg; video: <raw>/VideoFlash/<clip>.flv; "
        "auto: frames if <raw>/<frames_dir>/ exists, else video",
    )
    frames_dir: str = Field(
        default="Image-01-FPS", description="folder of <raw> holding one frame folder per clip"
    )
    min_frames: int = Field(
        default=1, ge=1, description="a frame folder with fewer frames is bad (the MIDAS loader uses 3)"
    )
    split_dir: str | None = Field(
        default=None, description="folder holding OGM-GE's train.csv and test.csv (default: raw)"
    )
    classes_file: str | None = Field(
        default=None, description="class names in label order, one per line (default ANG..SAD, sorted)"
    )
    val_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="official split: stratified share of train.csv as val"
    )
    val_seed: int = Field(default=2, ge=0, description="official split: seed of the validation cut")

    @field_validator("raw", "split_dir", "classes_file")
    @classmethod
    def _resolve(cls, path: str | None) -> str | None:
        return absolute_path(path)


# ----------------------------------------------------------------------------------------- builder


@register_dataset("cremad")
class CremadBuilder(DatasetBuilder):
    version = "1"
    description = (
        "CREMA-D: 7,442 acted clips of 91 actors, 6 emotions; Kaldi fbank audio (1024x128) and "
        "uint8 video frames (datasets.md §2.1)."
    )
    Options = CremadOptions

    def sources(self, options: CremadOptions) -> ShardedSource:
        """One ``AVClip`` per clip, in list order (train.csv then test.csv) or sorted by id; the layout
        and, unless ``skip_bad``, every clip's files are checked here, before any decoding."""
        raw = require_dir(Path(options.raw), LAYOUT)
        audio_dir = require_dir(raw / "AudioWAV", LAYOUT)
        visual_dir, is_video = _visual_folder(raw, options)
        classes = read_classes_file(Path(options.classes_file), CLASSES) if options.classes_file else CLASSES
        split_dir = Path(options.split_dir) if options.split_dir else raw
        clips, listed = pooled_clips(audio_dir, split_dir)
        items = []
        for clip, _ in clips:
            emotion = parse_clip_id(clip, str(audio_dir / f"{clip}.wav"))
            visual = visual_dir / (f"{clip}.flv" if is_video else clip)
            items.append(
                AVClip(clip, classes.index(emotion), str(audio_dir / f"{clip}.wav"), str(visual), is_video)
            )
        if not options.skip_bad:
            check_clip_files(items, options.min_frames, LAYOUT)
        official = None
        if listed:
            official = official_with_val_cut(
                [s for _, s in clips], [c.label for c in items], options.val_fraction, options.val_seed
            )
        return ShardedSource(
            classes=list(classes),
            items=items,
            decode=decode_av_clips,
            official_split=official,
            modality_kinds=dict(MODALITY_KINDS),
            shard_size=SHARD_SIZE,
            item_name=av_clip_name,
            blas_threads=1,  # the fbank's matmul: identical bits whatever the machine's core count
        )


def _visual_folder(raw: Path, options: CremadOptions) -> tuple[Path, bool]:
    """The folder the frames come from and whether it holds videos (``visual_source``)."""
    frames = raw / options.frames_dir
    source = options.visual_source
    if source == "auto":
        source = "frames" if frames.is_dir() else "video"
    if source == "frames":
        return require_dir(frames, LAYOUT), False
    return require_dir(raw / "VideoFlash", LAYOUT), True


def pooled_clips(audio_dir: Path, split_dir: Path) -> tuple[list[tuple[str, str]], bool]:
    """``(clip, split)`` pairs of OGM-GE's lists and True; without the lists every WAV's clip (sorted,
    split "train": a placeholder, as there is no official split then) and False, with a warning, so the
    user knows at once that ``--split official`` cannot work."""
    listed = read_official_lists(split_dir)
    if listed is not None:
        return listed, True
    warnings.warn(
        f"cremad: no OGM-GE split lists in {split_dir} (train.csv, test.csv): every clip of "
        f"{audio_dir} is pooled and only --split midas70 applies",
        stacklevel=3,
    )
    clips = [(p.stem, "train") for p in sorted(audio_dir.glob("*.wav"))]
    if not clips:
        raise RawDataError(f"{audio_dir}: holds no .wav files; expected layout:\n{LAYOUT}")
    return clips, False


def parse_clip_id(clip: str, where: str) -> str:
    """The emotion code of a clip id ``<actor>_<sentence>_<EMO>_<level>``; ``where`` names the file or
    line the id comes from in the error."""
    parts = clip.split("_")
    if len(parts) != 4 or not all(parts) or parts[2] not in CLASSES:
        raise RawDataError(
            f"{where}: {clip!r} is not a CREMA-D clip id <actor>_<sentence>_<EMO>_<level> "
            f"with EMO one of {', '.join(CLASSES)}"
        )
    return parts[2]


def read_official_lists(folder: Path) -> list[tuple[str, str]] | None:
    """OGM-GE's ``train.csv`` then ``test.csv`` as ``(clip, split)`` pairs, or None if neither exists
    (one without the other is an error: a half split is never guessed)."""
    train, test = folder / "train.csv", folder / "test.csv"
    if not train.is_file() and not test.is_file():
        return None
    rows = [(clip, "train") for clip in read_split_csv(require(train, LAYOUT))]
    rows += [(clip, "test") for clip in read_split_csv(require(test, LAYOUT))]
    seen: dict[str, str] = {}
    for clip, split in rows:
        if clip in seen:
            raise RawDataError(f"{folder}: clip {clip!r} is listed twice ({seen[clip]}.csv and {split}.csv)")
        seen[clip] = split
    return rows


def read_split_csv(path: Path) -> list[str]:
    """The clip ids of an OGM-GE list (rows ``clip,EMOTION``, no header, maybe a UTF-8 BOM); each row's
    emotion must be the one its id carries."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RawDataError(f"{path}: not a readable UTF-8 text file ({exc})") from exc
    clips = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}, line {line}"
        if len(row) < 2:
            raise RawDataError(f"{where}: expected 'clip,EMOTION' (no header), got {','.join(row)!r}")
        clip, emotion = row[0].strip(), row[1].strip()
        if parse_clip_id(clip, where) != emotion:
            raise RawDataError(f"{where}: emotion {emotion!r} does not match clip id {clip!r}")
        clips.append(clip)
    if not clips:
        raise RawDataError(f"{path}: lists no clips")
    return clips


# ----------------------------------------------------------------------------------------- shared clips


@dataclass(frozen=True)
class AVClip:
    """One audio-visual clip to decode: its id, label, WAV path and visual path (a frame folder, or a
    video file when ``video``)."""

    clip_id: str
    label: int
    audio: str
    visual: str
    video: bool = False


def av_clip_name(item: AVClip) -> str:
    return f"{item.clip_id} ({item.audio})"


class AVDecodeOptions(Protocol):
    """The options ``decode_av_clips`` reads (``cremad`` and ``kinetics_sounds`` both have them)."""

    skip_bad: bool
    frames: int
    image_size: int
    audio_frames: int
    min_frames: int


def read_classes_file(path: Path, expected: Sequence[str] | int) -> tuple[str, ...]:
    """Class names in label order from ``path`` (one per line, UTF-8 with or without BOM, blank lines
    skipped, unique). ``expected``: the names it must hold (any order), or how many."""
    try:
        text = require(path, "  a text file: one class name per line, in label order").read_text(
            encoding="utf-8-sig"
        )
    except (OSError, UnicodeDecodeError) as exc:
        raise RawDataError(f"{path}: not a readable UTF-8 text file ({exc})") from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(set(names)) != len(names):
        raise RawDataError(f"{path}: class names must be unique, got {list(names)}")
    if isinstance(expected, int):
        if len(names) != expected:
            raise RawDataError(f"{path}: lists {len(names)} class names, expected {expected} (labels 0..)")
    elif set(names) != set(expected):
        raise RawDataError(f"{path}: class names {list(names)} are not the classes {list(expected)}")
    return names


def check_clip_files(items: Sequence[AVClip], min_frames: int, layout: str) -> None:
    """Every file a build will read exists (the first missing one named with the layout), and every
    frame folder holds at least ``min_frames`` frames."""
    for item in items:
        require(Path(item.audio), layout)
        if item.video:
            require(Path(item.visual), layout)
        else:
            count_frames(require_dir(Path(item.visual), layout), min_frames)


def count_frames(folder: Path, min_frames: int) -> int:
    """The frames of a folder; fewer than ``min_frames`` (or none) is a bad clip."""
    count = len(frame_files(folder))
    if count < min_frames:
        raise RawDataError(f"{folder}: holds {count} frames, fewer than min_frames={min_frames}")
    return count


def official_with_val_cut(
    splits: Sequence[str], labels: Sequence[int], fraction: float, seed: int
) -> np.ndarray:
    """The lists' split per item, with a stratified, seeded ``fraction`` of the train rows turned into
    "val" (for lists that have no validation list)."""
    from sklearn.model_selection import train_test_split

    out = np.array(splits, dtype=object)
    train = np.nonzero(out == "train")[0]
    try:
        _, val = train_test_split(
            train, test_size=fraction, stratify=np.asarray(labels)[train], random_state=seed
        )
    except ValueError as exc:  # a class with a single train row, or fewer val rows than classes
        raise DatasetFormatError(
            f"the official split's validation cut ({fraction} of the {len(train)} train rows, stratified) "
            f"cannot be made: {exc}"
        ) from exc
    out[val] = "val"
    return out.astype(str)


def decode_av_clips(items: Sequence[AVClip], options: AVDecodeOptions) -> SplitArrays | DecodedShard:
    """A shard of clips: each WAV as the stored fbank, each frame folder or video as ``frames`` frames
    at ``image_size``. A clip whose files are missing or do not decode stops the build (naming the
    file), or with ``skip_bad`` is skipped and reported."""
    size = (options.image_size, options.image_size)

    def decode_one(item: AVClip) -> tuple[np.ndarray, np.ndarray]:
        audio = fbank_clip(require(Path(item.audio), "  a WAV file per clip"), options.audio_frames)
        return audio, _read_visual(item, options.frames, size, options.min_frames)

    kept, decoded, skipped = decode_items(items, decode_one, options.skip_bad)
    audio, visual = [a for a, _ in decoded], [v for _, v in decoded]
    arrays = SplitArrays(
        ids=np.array([item.clip_id for item in kept], dtype=str),
        labels=np.array([item.label for item in kept], dtype=np.int64),
        modalities={
            "audio": _stack(audio, (options.audio_frames, MEL_BINS), np.float16),
            "visual": _stack(visual, (3, options.frames, *size), np.uint8),
        },
    )
    return DecodedShard(arrays, skipped) if skipped else arrays


def _read_visual(item: AVClip, frames: int, size: tuple[int, int], min_frames: int) -> np.ndarray:
    if item.video:
        return read_video_file(require(Path(item.visual), "  a video file per clip"), frames, size)
    folder = require_dir(Path(item.visual), "  a folder of frames (*.jpg) per clip")
    count_frames(folder, min_frames)
    return read_frame_folder(folder, frames, size)


def _stack(rows: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Rows stacked, or an empty array of the row shape (a shard whose clips were all skipped)."""
    return np.stack(rows).astype(dtype, copy=False) if rows else np.zeros((0, *shape), dtype=dtype)
