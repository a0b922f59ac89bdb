"""JPG/PNG → stored uint8 pixels ``(3, H, W)``: decoded with Pillow, converted to RGB, resized to the
builder's stored size (bilinear, anti-aliased: Pillow's resize filters its input when it shrinks).

The training-time transforms (``datasets/transforms.py``) crop, flip and normalise the stored pixels on
the device; storing them at a fixed size (224 × 224 by default, the size every field model reads) makes
every sample one fixed-shape row and the eval transform of the MIDAS code (``Resize((224, 224))``) a
no-op.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import RawDataError


def load_rgb(path: Path) -> object:
    """The decoded image as an RGB ``PIL.Image`` (forced to load now, so a truncated file fails here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise RawDataError(f"{path}: not a readable image ({exc})") from exc


def to_pixels(image: object, size: tuple[int, int]) -> np.ndarray:
    """An RGB ``PIL.Image`` as uint8 ``(3, H, W)`` at ``size`` = (H, W)."""
    from PIL import Image

    height, width = size
    resized = image.resize((width, height), Image.Resampling.BILINEAR)  # type: ignore[attr-defined]
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """``path`` as uint8 ``(3, H, W)`` at ``size``."""
    return to_pixels(load_rgb(path), size)


def read_gray(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A single-channel image (an optical-flow component) as uint8 ``(H, W)`` at ``size``."""
    from PIL import Image

    image = load_rgb(path)
    height, width = size
    gray = image.convert("L").resize((width, height), Image.Resampling.BILINEAR)  # type: ignore[attr-defined]
    return np.asarray(gray, dtype=np.uint8)
