"""Checking a raw dataset tree before any decoding, and what a corrupt file does.

Builders call ``require`` for every file they will read, before the first shard is decoded, so a
missing file is named at once with the layout the builder expects, not an hour into a build. A file
that exists but cannot be decoded raises ``RawDataError`` naming it; with ``--skip-bad`` the builder
skips that sample instead and the manifest lists it (``sharded_build.Skipped``) — never a silent drop.
"""

from __future__ import annotations

from pathlib import Path

from ..format import DatasetFormatError


class RawDataError(DatasetFormatError):
    """A raw file is missing, unreadable or malformed; the message names it (the CLI exits 2: bad input)."""


def require(path: Path, layout: str) -> Path:
    """``path`` if it is a file; else an error naming it and the expected layout (a short text)."""
    if not path.is_file():
        raise RawDataError(f"{path}: not found; expected layout:\n{layout}")
    return path


def require_dir(path: Path, layout: str) -> Path:
    """``path`` if it is a folder; else an error naming it and the expected layout."""
    if not path.is_dir():
        raise RawDataError(f"{path}: folder not found; expected layout:\n{layout}")
    return path
