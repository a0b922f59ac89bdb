"""``kinetics_sounds``: Kinetics-Sounds (audio + video, 31 classes) from extracted frames and WAVs
(datasets.md §2.2).

Raw layout read (``LAYOUT``), the MIDAS code's dataset root::

    <raw>/videos/train.txt, val.txt    the lists: 'filename start end label', space separated, a header row
    <raw>/videos/<name>/*.jpg          the frames of each clip (1 fps, frame_00001.jpg ...)
    <raw>/audios/<name>.wav            the audio of each clip

or, instead of the two lists, OGM-GE's ``<raw>/my_train.txt`` and ``<raw>/my_test.txt`` (rows
``<name>,<n_frames>,<label>``, no header; 14,799 / 2,597 rows) over the same ``videos/`` and ``audios/``
(``lists``: ``auto`` takes the MIDAS lists when ``videos/train.txt`` exists). A list row's name is its first
field and its label the last; the frame count of OGM-GE's rows is not used (the folder is counted). The
first row of a MIDAS list is its header when its last field is not an integer label (the MIDAS loader
skips it because no such WAV exists), so a list without a header loses no clip.

Labels are integers 0..30. Kinetics-Sounds has no agreed list of class names (§8): ``classes_file`` names
them (31 lines, line k naming label k); without it they are ``"0"`` .. ``"30"``.

Splits. ``official`` uses the lists: the train list is train, the held-out list (MIDAS's ``val.txt``,
Kinetics' own validation list, or OGM-GE's ``my_test.txt``) is test, and a stratified ``val_fraction``
of the train list (seeded by ``val_seed``) is validation, as neither gives a list for model selection.
``midas70`` pools both lists (§1.1; the paper's 16,890 / 2,461 / 4,778 after its silent drops).

Which clips are kept: as for ``cremad`` (whose clip decoding this module shares). The MIDAS loader drops
a row whose WAV is missing without a word; here the layout is validated up front and the first missing
WAV or frame folder is named, or with ``--skip-bad`` such clips are skipped and listed in the manifest.

Stored: ``audio`` float16 ``(audio_frames, 128)``, ``(1024, 128)`` by default (``raw.audio.fbank_clip``:
OGM-GE's process_audio recipe, §2.2 / §4) and ``visual`` uint8 ``(3, frames, image_size, image_size)``:
``frames`` (default 10, the release's one frame a second) spread over the sorted frame files. The models
read 3, chosen per segment by the ``frames`` transform of the preset (the MIDAS loader indexes an unsorted
listing; we sort, §2.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from .builders import BuilderOptions, DatasetBuilder, register_dataset
from .cremad import (
    MODALITY_KINDS,
    AVClip,
    absolute_path,
    av_clip_name,
    check_clip_files,
    decode_av_clips,
    official_with_val_cut,
    read_classes_file,
)
from .raw.audio import CLIP_FRAMES
from .raw.layout import RawDataError, require, require_dir
from .sharded_build import ShardedSource

NUM_CLASSES = 31
SHARD_SIZE = 64  # clips per decoded shard (about 100 MB of frames at the defaults)

LAYOUT = """\
  <raw>/videos/train.txt, val.txt    MIDAS lists: 'filename start end label' (space separated, header row)
  <raw>/my_train.txt, my_test.txt    or OGM-GE's lists: '<name>,<n_frames>,<label>' (no header)
  <raw>/videos/<name>/*.jpg          the frames of each clip
  <raw>/audios/<name>.wav            the audio of each clip"""

MIDAS_LISTS = ("videos/train.txt", "videos/val.txt")
OGM_LISTS = ("my_train.txt", "my_test.txt")


class KineticsSoundsOptions(BuilderOptions):
    """Build settings of ``kinetics_sounds``; any change gives a separate cached directory."""

    raw: str = Field(description="the dataset root: videos/ (lists and frame folders) and audios/")
    skip_bad: bool = Field(
        default=False,
        description="skip (and list in the manifest) clips whose files are missing or do not decode",
    )
    frames: int = Field(
        default=10, ge=1, le=64, description="frames stored per clip, spread evenly (the models read 3)"
    )
    image_size: int = Field(default=224, ge=8, le=1024, description="stored frame height and width")
    audio_frames: int = Field(
        default=CLIP_FRAMES, ge=1, le=8192, description="fbank frames stored (padded or cut; the field: 1024)"
    )
    min_frames: int = Field(default=1, ge=1, description="a frame folder with fewer frames is bad")
    lists: Literal["auto", "midas", "ogm"] = Field(
        default="auto",
        description="midas: videos/train.txt + val.txt; ogm: my_train.txt + my_test.txt; auto: midas if "
        "videos/train.txt exists, else ogm",
    )
    classes_file: str | None = Field(
        default=None, description='31 class names in label order, one per line (default "0".."30")'
    )
    val_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="official split: stratified share of the train list as val"
    )
    val_seed: int = Field(default=2, ge=0, description="official split: seed of the validation cut")

    @field_validator("raw", "classes_file")
    @classmethod
    def _resolve(cls, path: str | None) -> str | None:
        return absolute_path(path)


@register_dataset("kinetics_sounds")
class KineticsSoundsBuilder(DatasetBuilder):
    version = "1"
    description = (
        "Kinetics-Sounds: 31 sound-bearing Kinetics classes; Kaldi fbank audio (1024x128) and uint8 "
        "1-fps video frames (datasets.md §2.2)."
    )
    Options = KineticsSoundsOptions

    def sources(self, options: KineticsSoundsOptions) -> ShardedSource:
        """One ``AVClip`` per list row (train list, then the held-out list); the layout and, unless
        ``skip_bad``, every clip's files are checked here, before any decoding."""
        raw = require_dir(Path(options.raw), LAYOUT)
        videos, audios = require_dir(raw / "videos", LAYOUT), require_dir(raw / "audios", LAYOUT)
        rows = read_lists(raw, options.lists)
        classes = (
            read_classes_file(Path(options.classes_file), NUM_CLASSES)
            if options.classes_file
            else tuple(str(k) for k in range(NUM_CLASSES))
        )
        items = [
            AVClip(name, label, str(audios / f"{name}.wav"), str(videos / name)) for name, label, _ in rows
        ]
        if not options.skip_bad:
            check_clip_files(items, options.min_frames, LAYOUT)
        return ShardedSource(
            classes=list(classes),
            items=items,
            decode=decode_av_clips,
            official_split=official_with_val_cut(
                [s for _, _, s in rows],
                [label for _, label, _ in rows],
                options.val_fraction,
                options.val_seed,
            ),
            modality_kinds=dict(MODALITY_KINDS),
            shard_size=SHARD_SIZE,
            item_name=av_clip_name,
            blas_threads=1,  # the fbank's matmul: identical bits whatever the machine's core count
        )


def read_lists(raw: Path, which: str) -> list[tuple[str, int, str]]:
    """``(name, label, split)`` rows of the train list ("train") then the held-out list ("test"); a name
    listed twice is an error."""
    if which == "auto":
        which = "midas" if (raw / MIDAS_LISTS[0]).is_file() else "ogm"
    paths = MIDAS_LISTS if which == "midas" else OGM_LISTS
    read = read_midas_list if which == "midas" else read_ogm_list
    rows: list[tuple[str, int, str]] = []
    seen: dict[str, Path] = {}
    for relative, split in zip(paths, ("train", "test"), strict=True):
        path = require(raw / relative, LAYOUT)
        for name, label in read(path):
            if name in seen:
                raise RawDataError(f"{path}: clip {name!r} is listed twice (also in {seen[name]})")
            seen[name] = path
            rows.append((name, label, split))
    return rows


def read_midas_list(path: Path) -> list[tuple[str, int]]:
    """A MIDAS list: whitespace-separated rows, name first and integer label last; the first row is a
    header when its last field is not an integer."""
    rows = []
    for index, (line, text) in enumerate(_lines(path)):
        fields = text.split()
        if len(fields) < 2:
            raise RawDataError(f"{path}, line {line}: expected 'filename start end label', got {text!r}")
        if index == 0 and not _is_int(fields[-1]):
            continue  # the header row
        rows.append((fields[0], _label(fields[-1], path, line)))
    return _nonempty(rows, path)


def read_ogm_list(path: Path) -> list[tuple[str, int]]:
    """An OGM-GE list: rows ``<name>,<n_frames>,<label>``, no header."""
    rows = []
    for line, text in _lines(path):
        fields = [f.strip() for f in text.split(",")]
        if len(fields) != 3 or not fields[0]:
            raise RawDataError(f"{path}, line {line}: expected '<name>,<n_frames>,<label>', got {text!r}")
        rows.append((fields[0], _label(fields[2], path, line)))
    return _nonempty(rows, path)


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers (UTF-8, a BOM tolerated)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RawDataError(f"{path}: not a readable UTF-8 text file ({exc})") from exc
    return [(k, line.strip()) for k, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _label(text: str, path: Path, line: int) -> int:
    if not _is_int(text) or not 0 <= int(text) < NUM_CLASSES:
        raise RawDataError(f"{path}, line {line}: label {text!r} is not an integer in 0..{NUM_CLASSES - 1}")
    return int(text)


def _nonempty(rows: list[tuple[str, int]], path: Path) -> list[tuple[str, int]]:
    if not rows:
        raise RawDataError(f"{path}: lists no clips")
    return rows
