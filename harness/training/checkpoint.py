"""Atomic checkpoint files and the RNG states that make a resumed run match an uninterrupted one."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary sibling, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike[str]) -> Any:
    # Our own checkpoints hold numpy RNG state and plain Python objects besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CheckpointError(RuntimeError):
    """A checkpoint directory whose files do not agree with each other or with the config."""


def gathered_rng_state(runtime: Any) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (dropout and augmentation draws differ per rank)."""
    from midasbench.harness.training.distributed import gather_objects

    return gather_objects(rng_state(), runtime)


def rank_rng_state(saved: list[dict[str, Any]] | dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's state from a checkpoint's list (rank 0's when the run had fewer ranks)."""
    if isinstance(saved, dict):
        return saved
    return saved[rank] if rank < len(saved) else saved[0]


class CheckpointDir:
    """``last.pt`` (resume point) and ``best.pt`` (the selected epoch: model, method modules and state).

    Crash-consistent: a new best is staged as ``best.pt.next``, promoted only after ``last.pt`` that
    names its epoch is written; on resume a staged file is promoted or dropped to agree with ``last.pt``,
    and ``best.pt`` must then hold the epoch ``last.pt`` records."""

    LAST, BEST, STAGED = "last.pt", "best.pt", "best.pt.next"

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def _path(self, name: str) -> Path:
        return self.directory / name

    def load_last(self, reconcile: bool = True) -> dict[str, Any] | None:
        """The unfinished ``last.pt`` of this config, or None (fresh start)."""
        path = self._path(self.LAST)
        if not path.is_file():
            return None
        state = load(path)
        if state.get("fingerprint") != self.fingerprint or state.get("completed"):
            return None
        if reconcile:
            staged = self._path(self.STAGED)
            if staged.is_file():
                if load(staged).get("epoch") == state["best_epoch"]:
                    os.replace(staged, self._path(self.BEST))
                else:
                    staged.unlink()
            if state["best_epoch"] >= 0:
                self.load_best(state["best_epoch"])  # raises if best.pt disagrees
        return state

    def stage_best(self, state: dict[str, Any]) -> None:
        atomic_save({"fingerprint": self.fingerprint, **state}, self._path(self.STAGED))

    def save_last(self, state: dict[str, Any]) -> None:
        atomic_save({"fingerprint": self.fingerprint, **state}, self._path(self.LAST))
        staged = self._path(self.STAGED)
        if staged.is_file():
            os.replace(staged, self._path(self.BEST))

    def load_best(self, epoch: int) -> dict[str, Any]:
        path = self._path(self.BEST)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, but {self._path(self.LAST)} records best epoch {epoch}")
        best = load(path)
        if best.get("fingerprint") != self.fingerprint or best.get("epoch") != epoch:
            raise CheckpointError(
                f"{path}: holds epoch {best.get('epoch')} of config {best.get('fingerprint')}, but "
                f"{self._path(self.LAST)} records best epoch {epoch} of config {self.fingerprint}"
            )
        return best

    def mark_completed(self) -> None:
        state = load(self._path(self.LAST))
        state["completed"] = True
        atomic_save(state, self._path(self.LAST))

    @staticmethod
    def barrier(runtime: Any) -> None:
        """All ranks wait for rank 0's files (under DDP the directory is shared storage)."""
        if runtime.distributed:
            import torch.distributed as dist

            dist.barrier()
