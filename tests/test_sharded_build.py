"""Sharded dataset builds: parallel decoding, resuming after a crash or Ctrl-C, progress, errors.

A tiny fake builder (registered only inside the tests) decodes integers into rows; its ``decode``
records every call as a file in ``log_dir`` (so calls made in worker processes are counted too) and
fails or raises ``KeyboardInterrupt`` on an item when a trigger file asks it to.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from midasbench.datasets import ArrowDataset
from midasbench.datasets.builders import (
    DATASETS,
    BuilderOptions,
    DatasetBuilder,
    build_dataset,
    dataset_directory,
)
from midasbench.datasets.format import DatasetFormatError, SplitArrays
from midasbench.datasets.sharded_build import (
    BuildInterrupted,
    DecodedShard,
    ShardBuildError,
    ShardedSource,
    track_items,
    work_directory,
)
from midasbench.harness.cli import main

NAME = "fake_sharded"
ITEMS = 30  # 8 shards of 4 (the last one of 2)


class FakeOptions(BuilderOptions):
    log_dir: str
    items: int = ITEMS


def decode_fake(items: Sequence[int], options: FakeOptions) -> SplitArrays:
    """Rows of items: a float vector, a padded sequence with its lengths and a subset, all a pure
    function of the item. Trigger files in ``log_dir``: ``interrupt-<i>`` (Ctrl-C, once), ``fail-<i>``
    (an error while decoding item i), ``fail-after-<i>`` (an error after the items were read)."""
    log = Path(options.log_dir)
    (log / f"call-{items[0]:03d}-{uuid.uuid4().hex[:6]}").write_text(str(os.getpid()))
    for item in track_items(items):
        trigger = log / f"interrupt-{item}"
        if trigger.exists():
            trigger.unlink()
            raise KeyboardInterrupt
        if (log / f"fail-{item}").exists():
            raise OSError(f"cannot read raw/{item:03d}.wav")
    if any((log / f"fail-after-{item}").exists() for item in items):
        raise ValueError("the batch transform failed")
    lengths = np.array([1 + item % 6 for item in items])
    sequence = np.zeros((len(items), 6, 2), dtype=np.float32)
    for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
        sequence[row, :length] = np.random.default_rng([item, 1]).standard_normal((length, 2))
    return SplitArrays(
        ids=np.array([f"s{item:03d}" for item in items]),
        labels=np.array([item % 3 for item in items]),
        modalities={
            "x": np.stack([np.random.default_rng([item, 0]).standard_normal(5) for item in items]).astype(
                np.float32
            ),
            "seq": sequence,
        },
        subsets={"even": np.array([item % 2 == 0 for item in items])},
        lengths={"seq": lengths},
    )


class FakeBuilder(DatasetBuilder):
    name = NAME
    version = "1"
    description = "integers decoded into rows (tests only)"
    Options = FakeOptions
    shard_size: ClassVar[int] = 4

    def sources(self, options: FakeOptions) -> ShardedSource:
        items = list(range(options.items))
        split = np.array(["train"] * 7 + ["val"] + ["test"] * 2)[np.arange(options.items) % 10]
        return ShardedSource(
            classes=["a", "b", "c"],
            items=items,
            decode=decode_fake,
            official_split=split,
            modality_kinds={"seq": "sequence"},
            shard_size=type(self).shard_size,
            item_name=lambda item: f"raw/{item:03d}.wav",
        )


@pytest.fixture(autouse=True, scope="module")
def fake_builder() -> Iterator[None]:
    with DATASETS.temporarily(NAME, FakeBuilder):
        yield


def _build(root: Path, log: Path, **kwargs: Any) -> Path:
    log.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return build_dataset(NAME, root=root, split="official", options={"log_dir": str(log)}, **kwargs)


def _calls(log: Path) -> int:
    """Decode calls so far; the record is cleared, so the next count starts from zero."""
    calls = list(log.glob("call-*"))
    for call in calls:
        call.unlink()
    return len(calls)


def _hash(directory: Path) -> str:
    dataset = ArrowDataset(directory)
    dataset.verify()
    return dataset.manifest.content_sha256


def _work(root: Path, log: Path) -> Path:
    return work_directory(dataset_directory(root, NAME, "official", 2, FakeOptions(log_dir=str(log))))


def _kept(work: Path) -> list[str]:
    return sorted(p.name for p in work.glob("shard-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The content hash of an uninterrupted, single-process build."""
    base = tmp_path_factory.mktemp("reference")
    return _hash(_build(base / "data", base / "log"))


def test_serial_and_parallel_builds_are_identical(tmp_path, reference):
    serial = _build(tmp_path / "one", tmp_path / "log1", workers=1)
    parallel = _build(tmp_path / "two", tmp_path / "log2", workers=2)
    assert _hash(serial) == _hash(parallel) == reference
    pids = {int(p.read_text()) for p in (tmp_path / "log2").glob("call-*")}
    assert os.getpid() not in pids  # decoded in worker processes
    assert _calls(tmp_path / "log1") == _calls(tmp_path / "log2") == 8  # every shard once
    assert not _work(tmp_path / "two", tmp_path / "log2").exists()
    dataset = ArrowDataset(parallel)
    assert dataset.manifest.modalities["seq"].variable_length
    train = dataset.split("train")
    assert list(train.ids[:8]) == ["s000", "s001", "s002", "s003", "s004", "s005", "s006", "s010"]
    expected = decode_fake([10], FakeOptions(log_dir=str(tmp_path / "log2")))
    np.testing.assert_array_equal(train.columns["x"].to_numpy()[7], expected.modalities["x"][0])
    np.testing.assert_array_equal(train.lengths["seq"][:8], [1, 2, 3, 4, 5, 6, 1, 5])
    pool = FakeBuilder().build_pool(FakeOptions(log_dir=str(tmp_path / "log2")))  # in memory, no shards
    assert list(pool.arrays.ids) == [f"s{i:03d}" for i in range(ITEMS)]


def test_interrupted_build_keeps_finished_shards_and_resumes(tmp_path, reference):
    root, log = tmp_path / "data", tmp_path / "log"
    log.mkdir()
    (log / "interrupt-13").touch()  # Ctrl-C in shard 3 (items 12..15)
    with pytest.raises(BuildInterrupted, match="3 of 8 shards are kept"):
        _build(root, log)
    work = _work(root, log)
    assert _kept(work) == ["shard-000000", "shard-000001", "shard-000002"]
    assert not list(work.glob(".*"))  # no half-written shard
    assert _calls(log) == 4
    assert _hash(_build(root, log)) == reference
    assert _calls(log) == 5  # only the missing shards 3..7
    assert not work.exists()


def test_worker_error_names_the_item_and_parallel_build_resumes(tmp_path, reference):
    root, log = tmp_path / "data", tmp_path / "log"
    log.mkdir()
    (log / "fail-17").touch()  # shard 4
    with pytest.raises(ShardBuildError) as failure:
        _build(root, log, workers=2)
    message = str(failure.value)
    assert "item 17 (raw/017.wav, shard 4)" in message
    assert "OSError: cannot read raw/017.wav" in message
    kept = _kept(_work(root, log))
    assert "shard-000004" not in kept
    _calls(log)
    (log / "fail-17").unlink()
    assert _hash(_build(root, log, workers=2)) == reference
    assert _calls(log) == 8 - len(kept)


def test_error_outside_the_item_loop_names_the_shard_items(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    (log / "fail-after-9").touch()
    with pytest.raises(ShardBuildError, match=r"shard 2 \(items 8\.\.11: raw/008\.wav \.\. raw/011\.wav\)"):
        _build(tmp_path / "data", log)


@pytest.mark.parametrize("change", ["shard_size", "version", "force"])
def test_work_folder_of_another_build_is_not_reused(tmp_path, monkeypatch, reference, change):
    root, log = tmp_path / "data", tmp_path / "log"
    log.mkdir()
    (log / "interrupt-13").touch()
    with pytest.raises(BuildInterrupted):
        _build(root, log)
    assert len(_kept(_work(root, log))) == 3
    _calls(log)
    if change == "shard_size":
        monkeypatch.setattr(FakeBuilder, "shard_size", 5)
    elif change == "version":
        monkeypatch.setattr(FakeBuilder, "version", "2")
    directory = _build(root, log, force=change == "force")
    assert _calls(log) == (6 if change == "shard_size" else 8)  # everything decoded again
    assert _hash(directory) == reference


def test_foreign_shards_are_never_read(tmp_path, reference):
    """A planted shard under the fingerprint of another build is discarded, not written out."""
    root, log = tmp_path / "data", tmp_path / "log"
    log.mkdir()
    (log / "interrupt-5").touch()
    with pytest.raises(BuildInterrupted):
        _build(root, log)
    work = _work(root, log)
    fingerprint = work / "fingerprint.json"
    fingerprint.write_text(fingerprint.read_text().replace(f'"builder": "{NAME}"', '"builder": "other"'))
    (work / "shard-000000" / "ids.npy").write_bytes(b"not a shard")
    _calls(log)
    assert _hash(_build(root, log)) == reference
    assert _calls(log) == 8


def test_progress_bar_on_stderr_only_when_asked(tmp_path, capsys):
    _build(tmp_path / "on", tmp_path / "log_on", progress=True)
    err = capsys.readouterr().err
    assert f"{NAME}: decoding" in err and f"{ITEMS}/{ITEMS}" in err
    _build(tmp_path / "off", tmp_path / "log_off", progress="auto")  # stderr is not a terminal here
    assert "decoding" not in capsys.readouterr().err


def test_cli_workers_and_progress_flags(tmp_path, capsys):
    log = tmp_path / "log"
    log.mkdir()
    base = ["data", "build", NAME, f"log_dir={log}", "--split", "official", "--root", str(tmp_path / "d")]
    assert main([*base, "--workers", "1", "--progress"]) == 0
    captured = capsys.readouterr()
    assert f"{ITEMS}/{ITEMS}" in captured.err and "sha256" in captured.out
    assert main([*base, "--workers", "0", "--force"]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
    assert not list((tmp_path / "d").glob(".*"))  # nothing started


def test_avdigits_parallel_build_is_bit_identical(tmp_path):
    pytest.importorskip("espeakng_loader")
    options = {"max_images": 100}  # two shards of 64 and 36 samples
    serial = build_dataset("avdigits", root=tmp_path / "one", options=options, workers=1, progress=False)
    parallel = build_dataset("avdigits", root=tmp_path / "two", options=options, workers=2, progress=False)
    assert _hash(serial) == _hash(parallel)
    assert sum(s.rows for s in ArrowDataset(parallel).manifest.splits.values()) == 100


def decode_skipping(items: Sequence[int], options: FakeOptions) -> DecodedShard:
    """``decode_fake``, except that items with a ``skip-<i>`` file in ``log_dir`` are skipped as corrupt."""
    log = Path(options.log_dir)
    bad = [k for k, item in enumerate(items) if (log / f"skip-{item}").exists()]
    good = [item for k, item in enumerate(items) if k not in bad]
    return DecodedShard(decode_fake(good, options), [(k, f"corrupt raw/{items[k]:03d}.wav") for k in bad])


class SkippingBuilder(FakeBuilder):
    def sources(self, options: FakeOptions) -> ShardedSource:
        source = super().sources(options)
        source.decode = decode_skipping
        return source


def test_skipped_samples_are_dropped_with_their_split_and_listed_in_the_manifest(tmp_path: Path):
    log = tmp_path / "log"
    log.mkdir()
    for item in (5, 17):  # item 17 is a "val" row of the official split (17 % 10 == 7)
        (log / f"skip-{item}").write_text("")
    with DATASETS.temporarily("fake_skipping", SkippingBuilder):
        path = build_dataset(
            "fake_skipping",
            root=tmp_path / "data",
            split="official",
            options={"log_dir": str(log)},
            workers=1,
            progress=False,
        )
    dataset = ArrowDataset(path)
    dataset.verify()
    ids = {s: set(dataset.split(s).ids.tolist()) for s in ("train", "val", "test")}
    assert "s005" not in ids["train"] and "s017" not in ids["val"]
    assert sum(len(v) for v in ids.values()) == ITEMS - 2
    assert ids["val"] == {"s007", "s027"}  # the official split of the kept items, unshifted
    assert dataset.manifest.build_options["skipped"] == [
        {"item": "raw/005.wav", "reason": "corrupt raw/005.wav"},
        {"item": "raw/017.wav", "reason": "corrupt raw/017.wav"},
    ]


class RawOptions(FakeOptions):
    raw: str
    skip_bad: bool = False


class RawBuilder(FakeBuilder):
    Options = RawOptions


def test_a_build_is_found_without_its_raw_path_and_an_unbuilt_one_says_how_to_build_it(tmp_path: Path):
    log = tmp_path / "log"
    log.mkdir()
    with DATASETS.temporarily("fake_raw", RawBuilder):
        options = {"log_dir": str(log)}
        with pytest.raises(
            DatasetFormatError, match=r"not built yet .* `midasbench data build fake_raw --raw PATH --split"
        ):
            build_dataset("fake_raw", root=tmp_path / "data", split="official", options=options)
        built = build_dataset(
            "fake_raw", root=tmp_path / "data", split="official", options={**options, "raw": "/x"}, workers=1
        )
        again = build_dataset("fake_raw", root=tmp_path / "data", split="official", options=options)
        moved = build_dataset(
            "fake_raw",
            root=tmp_path / "data",
            split="official",
            options={**options, "raw": "/y", "skip_bad": True},
        )
    assert built == again == moved  # where the raw data lives is not what the dataset is
    assert ArrowDataset(built).manifest.build_options["raw"] == "/x"  # but it is recorded
