"""Dataset builders: a registry of offline datasets and the generic raw → canonical pipeline.

A builder produces a *pool* (every sample, with its official split if the dataset has one); this module
applies the split protocol and writes the canonical directory (``write_pool`` → ``DatasetWriter``,
streamed in record batches, atomic). The directory name carries the protocol, the split seed and a hash
of the builder options, so different settings never overwrite each other and a cached build is reused
only when it matches.

A builder gives its pool in one of two ways:

* ``build_pool(options) -> Pool``: the whole pool in memory, built in this process (``synthetic``);
* ``sources(options) -> ShardedSource``: one picklable item per sample plus a module-level
  ``decode(items, options)``, for datasets whose per-sample decoding is the slow part (``avdigits``;
  WAV/MP4/JPG decoders). ``build_dataset`` then decodes the items in shards over ``workers`` processes
  (default: every core) with a progress bar, stores each finished shard atomically in a work folder
  next to the target (``<root>/.<dirname>.build/``, tagged with a fingerprint of the build), and streams
  the final dataset from the stored shards, memory-mapped a shard at a time; the work folder is removed
  once the dataset is written. A crash or Ctrl-C keeps the finished shards and the same build run again
  decodes only the missing ones; the result is identical whatever the workers and interruptions.
  Concurrent builds of one dataset wait for each other instead of decoding it twice. See
  ``sharded_build``.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from midasbench.harness.params import describe_validation_error
from midasbench.harness.registry import Registry

from .format import (
    MANIFEST_NAME,
    SPLIT_NAMES,
    DatasetFormatError,
    SplitArrays,
    _modality_specs,
    read_manifest,
)
from .sharded_build import (
    DecodedPool,
    ShardedSource,
    build_lock,
    decode_in_memory,
    decode_shards,
    discard_work_directory,
    resolve_progress,
    resolve_workers,
    work_directory,
)
from .splits import split_indices

DATA_ROOT_ENV = "MIDASBENCH_DATA"


def default_data_root() -> Path:
    """``$MIDASBENCH_DATA`` or ``~/.cache/midasbench/data``."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "midasbench" / "data"


@dataclass
class Pool:
    """Every sample of a dataset before splitting; ``official_split`` names each row's own split."""

    classes: list[str]
    arrays: SplitArrays
    official_split: np.ndarray | None = None
    modality_kinds: dict[str, str] = field(default_factory=dict)


class BuilderOptions(BaseModel):
    """Base for a builder's typed options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class DatasetBuilder(ABC):
    """One offline dataset. Subclasses set the class attributes and implement ``build_pool`` or, when
    decoding the samples is slow, ``sources`` (decoded in parallel and resumably; module docstring)."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[BuilderOptions]] = BuilderOptions

    def sources(self, options: Any) -> ShardedSource | None:
        """The samples as items to decode in shards, or None (the default) if ``build_pool`` is the
        builder's way. Must be cheap (no decoding) and deterministic given the options."""
        return None

    def build_pool(self, options: Any) -> Pool:
        """Produce every sample in memory; must be deterministic given the options. A sharded builder
        gets this for free (every shard decoded here, in memory)."""
        source = self.sources(options)
        if source is None:
            raise NotImplementedError(
                f"dataset builder {type(self).__name__} implements neither build_pool nor sources"
            )
        return _pool_of(source, decode_in_memory(source, options, self.name))

    @classmethod
    def parse_options(cls, options: dict[str, Any] | None) -> BuilderOptions:
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as exc:
            detail = describe_validation_error(exc, "data.options")
            raise DatasetFormatError(f"dataset {cls.name!r}: invalid {detail}") from exc


# the modules whose import registers a builder (``@register_dataset``), imported on DATASETS' first use
BUILDER_MODULES = (
    "avdigits",
    "cremad",
    "food101",
    "kinetics_sounds",
    "mosi",
    "sarcasm",
    "synthetic",
    "twitter2015",
    "ucf101",
)


def _import_builders() -> None:
    import importlib

    for module in BUILDER_MODULES:
        importlib.import_module(f"{__package__}.{module}")


DATASETS: Registry[type[DatasetBuilder]] = Registry("dataset", load=_import_builders)


def register_dataset(name: str) -> Any:
    """``@register_dataset("synthetic")``; also sets the builder's ``name`` (one place for it)."""

    def decorator(cls: type[DatasetBuilder]) -> type[DatasetBuilder]:
        cls.name = name
        return DATASETS.register(name)(cls)

    return decorator


# Where a build's raw download lives and how it treats undecodable files: not what the dataset *is*, so
# not part of its directory name — `midasbench train cremad` finds what `data build cremad --raw PATH`
# built without repeating the path. Both are recorded in the manifest's build_options.
LOCATION_OPTIONS = ("raw", "skip_bad")


def options_hash(options: BaseModel) -> str:
    identity = {k: v for k, v in options.model_dump(mode="json").items() if k not in LOCATION_OPTIONS}
    canonical = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def dataset_directory(root: Path, name: str, split: str, split_seed: int, options: BaseModel) -> Path:
    seed_part = f"-s{split_seed}" if split == "midas70" else ""
    return Path(root) / f"{name}-{split}{seed_part}-{options_hash(options)}"


def build_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    split: str = "midas70",
    split_seed: int = 2,
    options: dict[str, Any] | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: bool | str = "auto",
) -> Path:
    """Build (or reuse) the canonical directory of a registered dataset and return its path.

    ``workers`` and ``progress`` apply to sharded builders (``sources``): processes decoding the shards
    (None: every core; 1: in this process) and the tqdm bar on stderr (``"auto"``: only on a terminal).
    ``force`` rebuilds from scratch, discarding the stored shards of an interrupted build too.
    """
    builder_cls = DATASETS.get(name)
    options = dict(options or {})
    raw_missing = "raw" in builder_cls.Options.model_fields and not options.get("raw")
    parsed = builder_cls.parse_options({**options, "raw": ""} if raw_missing else options)
    workers, show = resolve_workers(workers), resolve_progress(progress)  # bad values fail before any work
    directory = dataset_directory(
        Path(root) if root else default_data_root(), name, split, split_seed, parsed
    )
    if not force and _is_complete(directory):
        return directory
    if raw_missing:
        raise DatasetFormatError(
            f"dataset {name!r} is not built yet ({directory} holds no dataset for split {split!r} and these "
            f"options); build it from its raw download first: `midasbench data build {name} --raw PATH"
            + (f" --split {split}" if split != "midas70" else "")
            + "` with the same options (README 'Datasets')"
        )
    builder = builder_cls()
    source = builder.sources(parsed)
    write = {
        "name": name,
        "version": builder_cls.version,
        "description": builder_cls.description,
        "split": split,
        "split_seed": split_seed,
        "build_options": parsed.model_dump(mode="json"),
        "replace_existing": force,  # a concurrent identical build that finished first is kept
    }
    if source is None:
        write_pool(builder.build_pool(parsed), directory, **write)
        return directory
    if split == "official" and source.official_split is None:  # before hours of decoding, not after
        raise DatasetFormatError(
            f"dataset {name!r}: split 'official' needs the dataset's own split lists, and the raw folder "
            f"{parsed.model_dump().get('raw', '')!s} gives none; use --split midas70 or add the lists "
            f"(docs/datasets/{name}.md)"
        )
    work = work_directory(directory)
    with build_lock(work, announce=show):
        if force or not _is_complete(directory):  # else another process built it while we waited
            decoded = decode_shards(
                source,
                parsed,
                work,
                builder=name,
                version=builder_cls.version,
                workers=workers,
                progress=show,
                fresh=force,
            )
            write["build_options"] = {**write["build_options"], **source.build_info}
            if decoded.skipped:  # --skip-bad: every skipped sample is listed in the manifest
                write["build_options"] = {**write["build_options"], "skipped": _skip_list(source, decoded)}
            write_pool(_pool_of(source, decoded), directory, **write)
        discard_work_directory(work)  # only once the dataset is complete (kept on any error above)
    return directory


def _is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a complete dataset (a manifest that does not read is an error)."""
    if not (directory / MANIFEST_NAME).is_file():
        return False
    read_manifest(directory)
    return True


def _pool_of(source: ShardedSource, decoded: DecodedPool) -> Pool:
    """The pool of the decoded rows (the official split of the items they came from)."""
    official = None if source.official_split is None else np.asarray(source.official_split)[decoded.kept]
    return Pool(
        classes=list(source.classes),
        arrays=decoded.arrays,
        official_split=official,
        modality_kinds=dict(source.modality_kinds),
    )


def _skip_list(source: ShardedSource, decoded: DecodedPool) -> list[dict[str, str]]:
    return [{"item": str(source.item_name(source.items[i])), "reason": why} for i, why in decoded.skipped]


def write_pool(
    pool: Pool,
    directory: Path,
    *,
    name: str,
    version: str,
    description: str,
    split: str,
    split_seed: int,
    build_options: dict[str, Any],
    replace_existing: bool = True,
    transform: Callable[[SplitArrays], SplitArrays] | None = None,
) -> None:
    """Apply the split protocol to a pool and stream each split to the canonical directory, a record
    batch of rows at a time (the pool's arrays may be memory maps or lazy: only those rows are read);
    ``transform`` maps each batch of rows before it is written (the import's standardisation)."""
    from .writer import DatasetWriter

    indices = split_indices(split, pool.arrays.labels, pool.official_split, split_seed, name)

    def rows_of(index: np.ndarray) -> SplitArrays:
        rows = pool.arrays.take(index)
        return transform(rows) if transform is not None else rows

    head = rows_of(np.arange(min(1, len(pool.arrays.ids))))
    with DatasetWriter(
        directory,
        name=name,
        version=version,
        classes=pool.classes,
        modalities=_modality_specs(head, pool.modality_kinds),
        subsets=sorted(pool.arrays.subsets),
        description=description,
        build_options=build_options,
        replace_existing=replace_existing,
    ) as writer:
        for split_name in SPLIT_NAMES:
            rows = indices[split_name]
            with writer.split(split_name) as out:
                for start in range(0, len(rows), writer.max_rows):
                    out.append(rows_of(rows[start : start + writer.max_rows]))
        writer.finish(split_protocol=split, split_seed=split_seed if split == "midas70" else None)


def _check_split(directory: Path, split: str, split_seed: int, key: str) -> None:
    """A written dataset carries its split: a config asking for another one is an error, never a run
    that logs one protocol and is tagged with the other."""
    manifest = read_manifest(directory)
    seed_differs = split == "midas70" and manifest.split_seed != split_seed
    if manifest.split_protocol != split or seed_differs:
        held = manifest.split_protocol + (
            f" (split_seed {manifest.split_seed})" if manifest.split_seed is not None else ""
        )
        wanted = split + (f" (split_seed {split_seed})" if split == "midas70" else "")
        raise DatasetFormatError(
            f"data.split: {key} {directory} holds split {held}, but the config asks for {wanted}; set "
            f"data.split={manifest.split_protocol}"
            + (f" data.split_seed={manifest.split_seed}" if manifest.split_seed is not None else "")
            + " or import the data again with that split (`midasbench data import ... --split`)"
        )


def resolve_dataset(
    name: str | None,
    *,
    path: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    split: str = "midas70",
    split_seed: int = 2,
    options: dict[str, Any] | None = None,
) -> Path:
    """Where the dataset of a run lives, building it first if it is a registered offline dataset.

    Resolution order: an explicit ``path``; a registered builder ``name``; an imported dataset
    ``<root>/<name>`` (written by ``midasbench data import``).
    """
    if path is not None:
        _check_split(Path(path), split, split_seed, "data.path")
        return Path(path)
    if name is None:
        raise DatasetFormatError("data: set either data.name or data.path")
    if name in DATASETS:
        return build_dataset(name, root=root, split=split, split_seed=split_seed, options=options)
    data_root = Path(root) if root else default_data_root()
    imported = data_root / name
    if (imported / MANIFEST_NAME).is_file():
        _check_split(imported, split, split_seed, "data.name")
        return imported
    raise DatasetFormatError(
        f"data.name: unknown dataset {name!r}: it is not a registered builder "
        f"({', '.join(DATASETS.names())}) and {imported} holds no imported dataset "
        "(see `midasbench data import --help`)"
    )
