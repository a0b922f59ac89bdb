"""Parallel, resumable decoding of a dataset's samples, shard by shard, with progress (issue 9).

Real datasets decode thousands of raw files (WAV → filterbank, MP4 → frames, JPG → pixels); that work
is the slow part of a build, so a builder that opts in (``DatasetBuilder.sources``) describes it as a
``ShardedSource``: one picklable item per sample, in pool order, and a module-level ``decode`` that turns
a run of items into a ``SplitArrays``. This module then

* cuts the items into shards of ``shard_size`` and decodes them over a process pool (``workers``; 1 runs
  in this process), showing a tqdm bar of samples on stderr;
* writes every finished shard atomically (a hidden temporary folder, then a rename) into a work folder
  next to the target, ``<root>/.<dirname>.build/``: one ``.npy`` per array (ids, labels, each modality,
  subset and length column) plus ``meta.json``. A ``fingerprint.json`` (builder, version, options hash,
  shard size, item count and item hash) marks whose shards they are: a folder of any other build is
  emptied, never reused. A crash or Ctrl-C keeps the finished shards, and a rerun decodes only the
  missing ones;
* hands back the pool's arrays with each modality as a ``ShardedArray``: a lazy view over the shards'
  ``.npy`` files that memory-maps a shard only while it gathers rows from it, so ``write_pool`` streams
  the dataset out in record batches without ever holding it in memory.

The result is deterministic: a shard's rows depend only on its items and the options, so the dataset
(its ``content_sha256``) is the same whatever the number of workers and however often the build was
interrupted. ``build_lock`` serialises concurrent builds of the same dataset (e.g. sweep trials that
resolve it at once): the first decodes, the others wait and then reuse its result.

Workers are started with ``forkserver`` (``spawn`` where that is missing), never ``fork``: a fork would
inherit the parent's threads and open pipes (the espeak-ng helper of ``speech.py``, for one). As with
any ``multiprocessing`` code, a script that builds a dataset with workers must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from .format import DatasetFormatError, SplitArrays, _fsync, concat_splits

FINGERPRINT_NAME = "fingerprint.json"
SHARD_META_NAME = "meta.json"
FINGERPRINT_VERSION = 1
DEFAULT_SHARD_SIZE = 64

Decode = Callable[[Sequence[Any], Any], SplitArrays]
T = TypeVar("T")


@dataclass
class ShardedSource:
    """What a sharded builder decodes: ``items`` (picklable, one per sample, in pool order) and
    ``decode(items, options) -> SplitArrays`` (a module-level function, so workers can unpickle it),
    which must return one row per item, in order, depending only on those items and the options.

    ``official_split`` (one split name per item) and ``modality_kinds`` are as in ``Pool``;
    ``item_name`` names an item in error messages (it runs in the parent only).
    """

    classes: list[str]
    items: Sequence[Any]
    decode: Decode
    official_split: np.ndarray | None = None
    modality_kinds: dict[str, str] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE
    item_name: Callable[[Any], str] = repr
    build_info: dict[str, Any] = field(default_factory=dict)
    """Facts of the build that go into the manifest's ``build_options`` beside the options (e.g. the
    tokenizer's identity under ``"tokenizer"``); JSON-serialisable."""
    blas_threads: int | None = None
    """BLAS/OpenMP threads while a shard decodes, the same in this process and in every worker. BLAS
    results can depend on the thread count (a float32 matmul split over 2 threads differs in its last
    bits from one thread), so an int takes the machine's core count out of the result; None keeps the
    libraries' default (every core), as a single-process build always had: identical whatever the
    workers on one machine, but not across machines with different core counts."""


@dataclass
class DecodedShard:
    """What ``decode`` may return instead of a plain ``SplitArrays`` when some items could not be
    decoded and the build skips bad samples (``--skip-bad``): the rows of the other items, in order, and
    per skipped item its offset in the shard and why. Every skip is listed in the manifest."""

    arrays: SplitArrays
    skipped: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class DecodedPool:
    """The decoded pool: its arrays (modalities lazy over the shards), the index of the item each row
    came from, and the skipped items (index, reason)."""

    arrays: SplitArrays
    kept: np.ndarray
    skipped: list[tuple[int, str]]


class ShardBuildError(DatasetFormatError):
    """Decoding or storing a shard failed; the message names the item (or the shard's items)."""


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during decoding; the message says how many shards are kept for the rerun to resume from."""


# ----------------------------------------------------------------------------------------- item tracking

_CURRENT_ITEM: list[int | None] = [None]  # offset in the shard of the item ``decode`` is working on


def track_items(items: Sequence[Any]) -> Iterator[Any]:
    """Iterate over a shard's items inside ``decode`` so that an error raised while one is being decoded
    is reported with that item's name; without it, errors name the shard's first and last items."""
    for offset, item in enumerate(items):
        _CURRENT_ITEM[0] = offset
        yield item
    _CURRENT_ITEM[0] = None


def decode_items(
    items: Sequence[Any], decode_one: Callable[[Any], T], skip_bad: bool
) -> tuple[list[Any], list[T], list[tuple[int, str]]]:
    """Each item through ``decode_one`` (inside ``track_items``, so a failure names its item): the
    items kept, their decoded values, and ``(offset, reason)`` of each item skipped. A ``RawDataError``
    (a missing or undecodable raw file) skips the item when ``skip_bad``, else stops the build."""
    from .raw.layout import RawDataError

    kept: list[Any] = []
    values: list[T] = []
    skipped: list[tuple[int, str]] = []
    for offset, item in enumerate(track_items(items)):
        try:
            value = decode_one(item)
        except RawDataError as exc:
            if not skip_bad:
                raise
            skipped.append((offset, str(exc)))
            continue
        kept.append(item)
        values.append(value)
    return kept, values, skipped


# ----------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class _Shard:
    """Shard ``index``: items ``start`` to ``stop`` (exclusive)."""

    index: int
    start: int
    stop: int

    @property
    def folder_name(self) -> str:
        return f"shard-{self.index:06d}"


@dataclass
class _ShardTask:
    """Everything a worker needs to decode and store one shard (pickled to it)."""

    decode: Decode
    items: list[Any]
    options: Any
    work_dir: str
    shard: _Shard
    blas_threads: int | None = None


class _WorkerFailure(Exception):  # internal: carries a decode error back to the parent
    """``decode`` raised: which shard, the offset of the item being decoded (None: unknown), and what."""

    def __init__(self, shard_index: int, offset: int | None, summary: str) -> None:
        super().__init__(shard_index, offset, summary)
        self.shard_index, self.offset, self.summary = shard_index, offset, summary


def _plan(count: int, shard_size: int) -> list[_Shard]:
    return [
        _Shard(index, start, min(start + shard_size, count))
        for index, start in enumerate(range(0, count, shard_size))
    ]


def _run_task(task: _ShardTask) -> int:
    """Decode one shard and store it; returns its rows. Runs in a worker (or in-process for 1 worker)."""
    _CURRENT_ITEM[0] = None
    try:
        with _thread_limit(task.blas_threads):
            decoded = _as_decoded(task.decode(task.items, task.options))
    except Exception as exc:
        summary = f"{type(exc).__name__}: {exc}"
        raise _WorkerFailure(task.shard.index, _CURRENT_ITEM[0], summary) from exc
    finally:
        _CURRENT_ITEM[0] = None
    rows = len(decoded.arrays.ids)
    if rows + len(decoded.skipped) != len(task.items):
        raise _WorkerFailure(
            task.shard.index,
            None,
            f"decode returned {rows} rows and {len(decoded.skipped)} skipped for {len(task.items)} items",
        )
    _write_shard(Path(task.work_dir), task.shard, decoded)
    return len(task.items)


def _as_decoded(result: Any) -> DecodedShard:
    if isinstance(result, DecodedShard):
        return result
    if isinstance(result, SplitArrays):
        return DecodedShard(result)
    raise TypeError(f"decode returned {type(result).__name__}, not SplitArrays or DecodedShard")


@contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """BLAS/OpenMP libraries loaded so far run ``threads`` threads inside the block (None: unchanged)."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(threads):
        yield


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    _fsync(path)


def _write_shard(work_dir: Path, shard: _Shard, decoded: DecodedShard) -> None:
    """Store a shard's arrays in a hidden temporary folder, then rename it into place: a shard folder
    that exists is complete. Files are numbered (the names live in ``meta.json``) so that any modality
    name is safe."""
    tmp = work_dir / f".{shard.folder_name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    arrays = decoded.arrays
    meta: dict[str, Any] = {
        "first_item": shard.start,
        "items": shard.stop - shard.start,
        "rows": len(arrays.ids),
        "skipped": [[int(offset), str(reason)] for offset, reason in decoded.skipped],
    }
    _save(tmp / "ids.npy", arrays.ids)
    _save(tmp / "labels.npy", arrays.labels)
    for kind, columns in (
        ("modalities", arrays.modalities),
        ("subsets", {k: np.asarray(v, dtype=bool) for k, v in arrays.subsets.items()}),
        ("lengths", arrays.lengths),
    ):
        meta[kind] = {}
        for number, (name, column) in enumerate(columns.items()):
            meta[kind][name] = f"{kind}-{number}.npy"
            _save(tmp / meta[kind][name], column)
    (tmp / SHARD_META_NAME).write_text(json.dumps(meta, indent=1))
    _fsync(tmp / SHARD_META_NAME)
    try:
        os.rename(tmp, work_dir / shard.folder_name)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (work_dir / shard.folder_name / SHARD_META_NAME).is_file():
            raise  # not "another build stored the same shard first"


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SHARD_META_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardBuildError(f"{folder / SHARD_META_NAME}: unreadable ({exc})") from exc


def _shard_files(meta: dict[str, Any]) -> list[str]:
    return [
        "ids.npy",
        "labels.npy",
        *[f for kind in ("modalities", "subsets", "lengths") for f in meta[kind].values()],
    ]


def _shard_is_complete(folder: Path, shard: _Shard) -> bool:
    """A stored shard is reused only if its metadata matches the plan and every array opens with its
    row count (a header read through a memory map: the data is not read)."""
    try:
        meta = json.loads((folder / SHARD_META_NAME).read_text())
        if meta["first_item"] != shard.start or meta["items"] != shard.stop - shard.start:
            return False
        return all(len(np.load(folder / f, mmap_mode="r")) == meta["rows"] for f in _shard_files(meta))
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------------------- work folder


def work_directory(target: Path) -> Path:
    """The work folder of the build of ``target``: a hidden sibling, ``<root>/.<dirname>.build``."""
    return target.parent / f".{target.name}.build"


def discard_work_directory(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)


@contextmanager
def build_lock(work_dir: Path, *, announce: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the work folder (``flock`` on the folder itself, so that no lock file
    outlives the build) while building. Whoever removes the folder does so holding the lock, after the
    dataset is complete; a waiter whose folder was removed takes a fresh one and finds the dataset done.
    A no-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux or macOS
        yield
        return
    while True:
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(work_dir, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if announce:
                print(f"waiting for another build that holds {work_dir} ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(work_dir)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the folder was removed (or replaced) while we waited: lock the current one
    try:
        yield
    finally:
        os.close(fd)


def build_fingerprint(
    source: ShardedSource, options: BaseModel, *, builder: str, version: str
) -> dict[str, Any]:
    """What identifies a build's shards: stored shards are reused only under an identical fingerprint
    (the items' hash catches a changed list of raw files under the same options)."""
    canonical = json.dumps(options.model_dump(mode="json"), sort_keys=True)
    items_digest = hashlib.sha256(pickle.dumps(list(source.items), protocol=4)).hexdigest()
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "builder": builder,
        "version": version,
        "options_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
        "shard_size": source.shard_size,
        "items": len(source.items),
        "items_sha256": items_digest,
    }


def _prepare_work_directory(work_dir: Path, fingerprint: dict[str, Any], fresh: bool) -> None:
    """Keep the folder's shards only if it holds this very build; empty it otherwise (its contents, not
    the folder: it carries the build lock). Leftover temporary shards of a crash are always removed."""
    path = work_dir / FINGERPRINT_NAME
    try:
        same = not fresh and json.loads(path.read_text()) == fingerprint
    except (OSError, json.JSONDecodeError):
        same = False
    for entry in work_dir.iterdir():
        if not same or entry.name.startswith("."):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if not same:
        path.write_text(json.dumps(fingerprint, indent=1))
        _fsync(path)


# ----------------------------------------------------------------------------------------- decoding


def resolve_workers(workers: int | None) -> int:
    """``None``: every core this process may run on; otherwise at least 1."""
    if workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    if workers < 1:
        raise DatasetFormatError(f"workers must be at least 1, got {workers}")
    return int(workers)


def resolve_progress(progress: bool | str) -> bool:
    """``"auto"``: a bar only when stderr is a terminal (no bar characters in logs)."""
    if progress == "auto":
        return sys.stderr.isatty()
    if isinstance(progress, bool):
        return progress
    raise DatasetFormatError(f"progress must be True, False or 'auto', got {progress!r}")


def decode_shards(
    source: ShardedSource,
    options: BaseModel,
    work_dir: Path,
    *,
    builder: str,
    version: str,
    workers: int | None = None,
    progress: bool | str = "auto",
    fresh: bool = False,
) -> DecodedPool:
    """Decode every shard not yet stored in ``work_dir`` (all of them if ``fresh``) and return the pool,
    its modalities lazy over the stored shards. The caller holds ``build_lock(work_dir)``."""
    _check_source(source, builder, workers)
    shards = _plan(len(source.items), source.shard_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    _prepare_work_directory(
        work_dir, build_fingerprint(source, options, builder=builder, version=version), fresh
    )
    missing = [s for s in shards if not _shard_is_complete(work_dir / s.folder_name, s)]
    for shard in missing:  # an incomplete shard folder (should not happen: renames are atomic)
        shutil.rmtree(work_dir / shard.folder_name, ignore_errors=True)
    tasks = [
        _ShardTask(
            source.decode,
            list(source.items[s.start : s.stop]),
            options,
            str(work_dir),
            s,
            source.blas_threads,
        )
        for s in missing
    ]
    from tqdm.auto import tqdm

    with tqdm(
        total=len(source.items),
        initial=len(source.items) - sum(s.stop - s.start for s in missing),
        desc=f"{builder}: decoding",
        unit="sample",
        file=sys.stderr,
        disable=not resolve_progress(progress),
        dynamic_ncols=True,
    ) as bar:
        try:
            _run_tasks(tasks, min(resolve_workers(workers), max(1, len(tasks))), bar.update)
        except _WorkerFailure as failure:
            raise ShardBuildError(_failure_message(failure, source, shards, builder)) from failure
        except KeyboardInterrupt as exc:
            kept = sum(_shard_is_complete(work_dir / s.folder_name, s) for s in shards)
            raise BuildInterrupted(
                f"dataset {builder!r}: interrupted; {kept} of {len(shards)} shards are kept in {work_dir}, "
                "run the same build again to decode only the rest"
            ) from exc
    return open_shards(work_dir, shards, builder)


def _check_source(source: ShardedSource, builder: str, workers: int | None) -> None:
    if len(source.items) == 0:
        raise ShardBuildError(f"dataset {builder!r}: the builder produced no items to decode")
    if source.shard_size < 1:
        raise ShardBuildError(f"dataset {builder!r}: shard_size must be at least 1, got {source.shard_size}")
    if source.official_split is not None and len(source.official_split) != len(source.items):
        raise ShardBuildError(
            f"dataset {builder!r}: official_split has {len(source.official_split)} entries for "
            f"{len(source.items)} items"
        )
    if resolve_workers(workers) > 1:
        try:
            pickle.dumps(source.decode)
        except Exception as exc:
            raise ShardBuildError(
                f"dataset {builder!r}: decode {source.decode!r} cannot be sent to worker processes ({exc}); "
                "make it a module-level function, or build with workers=1"
            ) from exc


def _run_tasks(tasks: list[_ShardTask], workers: int, done: Callable[[int], Any]) -> None:
    """Decode the shards in this process (1 worker) or over a process pool; ``done(rows)`` after each.
    On an error or Ctrl-C, shards not yet started are cancelled and running ones are let finish (and
    are kept), then the error is raised."""
    if workers == 1:
        for task in tasks:
            done(_run_task(task))
        return
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    try:
        futures: dict[Future[int], _ShardTask] = {executor.submit(_run_task, t): t for t in tasks}
        for future in as_completed(futures):
            try:
                done(future.result())
            except BrokenProcessPool as exc:
                shard = futures[future].shard
                raise _WorkerFailure(shard.index, None, _DIED.format(exc=exc)) from exc
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


_DIED = (
    "its worker process died ({exc}); a script that builds with workers > 1 must guard its entry point "
    "with `if __name__ == '__main__':` (workers re-import it), or build with workers=1"
)


def _pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` with the dataset modules preloaded (workers start by a cheap fork of a clean
    server, not a fresh interpreter each), else ``spawn``."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["midasbench.datasets"])
        return context
    return multiprocessing.get_context("spawn")  # pragma: no cover - Windows


def _failure_message(
    failure: _WorkerFailure, source: ShardedSource, shards: list[_Shard], builder: str
) -> str:
    shard = shards[failure.shard_index]
    if failure.offset is not None:
        index = shard.start + failure.offset
        where = f"item {index} ({_name(source, index)}, shard {shard.index})"
    else:
        where = (
            f"shard {shard.index} (items {shard.start}..{shard.stop - 1}: "
            f"{_name(source, shard.start)} .. {_name(source, shard.stop - 1)})"
        )
    return f"dataset {builder!r}: decoding {where} failed: {failure.summary}"


def _name(source: ShardedSource, index: int) -> str:
    try:
        name = str(source.item_name(source.items[index]))
    except Exception:  # naming must never hide the real error
        name = f"item {index}"
    return name if len(name) <= 120 else name[:117] + "..."


# ----------------------------------------------------------------------------------------- reading back


class ShardedArray:
    """One modality of the pool, row-concatenated over the shards' ``.npy`` files and read on demand.

    It answers what ``SplitArrays`` and ``write_pool`` ask (``dtype``, ``shape``, ``ndim``, ``len`` and
    rows by index); ``array[rows]`` memory-maps each shard holding some of the rows only while copying
    them out, so memory stays at the gathered rows whatever the pool's size.
    """

    def __init__(self, paths: Sequence[Path], name: str) -> None:
        self.paths = list(paths)
        heads = [np.load(p, mmap_mode="r") for p in self.paths]
        first = heads[0]
        for path, head in zip(self.paths, heads, strict=True):
            if head.dtype != first.dtype or head.shape[1:] != first.shape[1:]:
                raise ShardBuildError(
                    f"{path}: modality {name!r} is {head.dtype} rows of {head.shape[1:]}, but "
                    f"{self.paths[0]} has {first.dtype} rows of {first.shape[1:]}: decode must give "
                    "every sample the same dtype and shape"
                )
        self.dtype = first.dtype
        self.row_shape = tuple(first.shape[1:])
        self.offsets = np.concatenate([[0], np.cumsum([len(h) for h in heads])]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, rows: Any) -> np.ndarray:
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        scalar = index.ndim == 0
        index = np.atleast_1d(index)
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(index), *self.row_shape), dtype=self.dtype)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            data = np.load(self.paths[shard], mmap_mode="r")
            out[where] = data[index[where] - self.offsets[shard]]
            del data  # unmaps the shard: its pages leave this process
        return out[0] if scalar else out


def open_shards(work_dir: Path, shards: list[_Shard], builder: str) -> DecodedPool:
    """The stored shards as one pool: ids, labels, subsets and lengths (small) in memory, each modality
    a ``ShardedArray``, with the items the rows came from and those skipped. Every shard must hold the
    same columns."""
    metas = [_read_meta(work_dir / s.folder_name) for s in shards]
    first = metas[0]
    for shard, meta in zip(shards, metas, strict=True):
        for kind in ("modalities", "subsets", "lengths"):
            if list(meta[kind]) != list(first[kind]):
                raise ShardBuildError(
                    f"dataset {builder!r}: {work_dir / shard.folder_name} has {kind} {list(meta[kind])}, "
                    f"but {work_dir / shards[0].folder_name} has {list(first[kind])}"
                )

    def column(kind: str, name: str) -> list[Path]:
        return [work_dir / s.folder_name / m[kind][name] for s, m in zip(shards, metas, strict=True)]

    def loaded(paths: list[Path]) -> np.ndarray:
        return np.concatenate([np.load(p, allow_pickle=False) for p in paths])

    arrays = SplitArrays(
        ids=loaded([work_dir / s.folder_name / "ids.npy" for s in shards]),
        labels=loaded([work_dir / s.folder_name / "labels.npy" for s in shards]),
        modalities={name: ShardedArray(column("modalities", name), name) for name in first["modalities"]},
        subsets={name: loaded(column("subsets", name)) for name in first["subsets"]},
        lengths={name: loaded(column("lengths", name)) for name in first["lengths"]},
    )
    return DecodedPool(arrays, *_kept_and_skipped(shards, metas))


def _kept_and_skipped(
    shards: list[_Shard], metas: list[dict[str, Any]]
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Per row, the index of its item; and each skipped item's index and reason, from the shards' meta."""
    kept: list[np.ndarray] = []
    skipped: list[tuple[int, str]] = []
    for shard, meta in zip(shards, metas, strict=True):
        gone = {int(offset) for offset, _ in meta["skipped"]}
        skipped += [(shard.start + int(offset), str(reason)) for offset, reason in meta["skipped"]]
        kept.append(np.array([i for i in range(shard.start, shard.stop) if i - shard.start not in gone]))
    return np.concatenate(kept).astype(np.int64), skipped


def decode_in_memory(source: ShardedSource, options: Any, builder: str) -> DecodedPool:
    """Every shard decoded in this process and concatenated in memory (``DatasetBuilder.build_pool`` of
    a sharded builder: for callers that want the pool itself; builds go through ``decode_shards``)."""
    _check_source(source, builder, 1)
    shards = _plan(len(source.items), source.shard_size)
    with _thread_limit(source.blas_threads):
        parts = [_as_decoded(source.decode(list(source.items[s.start : s.stop]), options)) for s in shards]
    metas = [{"skipped": p.skipped} for p in parts]
    return DecodedPool(concat_splits([p.arrays for p in parts]), *_kept_and_skipped(shards, metas))
