"""Video → stored uint8 frames ``(3, T, H, W)``, from a video file (PyAV) or a folder of extracted
frames (the layouts of OGM-GE, BalanceBenchmark and the MIDAS code).

Which frames are stored: ``T`` frames evenly spread over the clip — frame ``⌊(k + 0.5) · n / T⌋`` of
``n`` for ``k = 0..T-1`` (the centre of each of ``T`` equal segments). The training transforms then
choose among the stored frames (``frames`` transform: a random frame per segment in training, the
middle one for evaluation), so store more frames than the model reads (e.g. 10 stored, 3 read, as the
Kinetics-Sounds release keeps 10 one-per-second frames).

A frame folder is listed in natural order of its file names (the MIDAS Kinetics loader indexes an
unsorted ``os.listdir``; spec §2.2 notes the nondeterminism).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .image import load_rgb, read_gray, to_pixels
from .layout import RawDataError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def spread(available: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``available`` frames: the centre of each equal segment."""
    if available < 1:
        raise ValueError("no frames")
    return [min(available - 1, int((k + 0.5) * available / count)) for k in range(count)]


def natural_key(name: str) -> list[int | str]:
    """Sort key reading digit runs as numbers: ``frame_2`` before ``frame_10`` whatever the padding."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path, suffixes: Sequence[str] = FRAME_SUFFIXES) -> list[Path]:
    """The image files of a frame folder, in natural order of their names (numbers compared as numbers:
    a release that pads ``frame_00002`` but not ``frame_000010`` still reads in time order)."""
    if not folder.is_dir():
        raise RawDataError(f"{folder}: frame folder not found")
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in suffixes), key=lambda p: natural_key(p.name)
    )
    if not files:
        raise RawDataError(f"{folder}: holds no frames ({', '.join(suffixes)} files)")
    return files


def read_frame_folder(folder: Path, count: int, size: tuple[int, int]) -> np.ndarray:
    """``count`` frames of a folder of images as uint8 ``(3, count, H, W)`` (frames repeat when the
    folder holds fewer than ``count``)."""
    files = frame_files(folder)
    frames = [to_pixels(load_rgb(files[i]), size) for i in spread(len(files), count)]
    return np.stack(frames, axis=1)


def read_flow_folders(u_folder: Path, v_folder: Path, count: int, size: tuple[int, int]) -> np.ndarray:
    """``count`` optical-flow frames as uint8 ``(2, count, H, W)``: the u and v grayscale JPEGs of the
    same indices stacked as two channels (the TV-L1 layout UCF-101 releases use)."""
    u_files, v_files = frame_files(u_folder), frame_files(v_folder)
    if len(u_files) != len(v_files):
        raise RawDataError(
            f"{u_folder} holds {len(u_files)} flow frames but {v_folder} holds {len(v_files)}; they pair up"
        )
    picks = spread(len(u_files), count)
    u = [read_gray(u_files[i], size) for i in picks]
    v = [read_gray(v_files[i], size) for i in picks]
    return np.stack([np.stack(u), np.stack(v)])


def read_video_file(path: Path, count: int, size: tuple[int, int]) -> np.ndarray:
    """``count`` frames of a video file (MP4, AVI, FLV: whatever FFmpeg decodes) as uint8
    ``(3, count, H, W)``, decoded with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            images = [frame.to_image() for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise RawDataError(f"{path}: not a readable video ({exc})") from exc
    if not images:
        raise RawDataError(f"{path}: holds no video frames")
    return np.stack([to_pixels(images[i], size) for i in spread(len(images), count)], axis=1)
