"""Streaming writes (``DatasetWriter``) and gathers across many chunks (issue 9, items 1 and 2)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from memory_probe import PRELUDE

from midasbench.datasets.format import (
    ArrowDataset,
    DatasetFormatError,
    ModalitySpec,
    SplitArrays,
    hash_ids,
    write_dataset,
)
from midasbench.datasets.writer import ARROW_MAX_ELEMENTS, DatasetWriter, _rows_per_batch

SPECS = {
    "audio": ModalitySpec(dtype="float16", shape=(3, 4)),
    "frames": ModalitySpec(dtype="uint8", shape=(2, 5)),
}


def rows(n: int, start: int, seed: int) -> SplitArrays:
    rng = np.random.default_rng(seed)
    return SplitArrays(
        ids=np.array([f"s{start + i}" for i in range(n)]),
        labels=rng.integers(0, 3, n),
        modalities={
            "audio": rng.standard_normal((n, 3, 4)).astype(np.float16),
            "frames": rng.integers(0, 256, (n, 2, 5), dtype=np.uint8),
        },
        subsets={"hard": rng.random(n) < 0.5},
    )


def concat(parts: list[SplitArrays]) -> SplitArrays:
    return SplitArrays(
        ids=np.concatenate([p.ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        modalities={m: np.concatenate([p.modalities[m] for p in parts]) for m in SPECS},
        subsets={"hard": np.concatenate([p.subsets["hard"] for p in parts])},
    )


def in_memory_hash(splits: dict[str, SplitArrays]) -> str:
    """The content hash's definition, written out over whole in-memory arrays (not the reader's path)."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        arrays = splits[split]
        digest.update(f"split={split};rows={len(arrays.ids)}\n".encode())
        digest.update(hash_ids(arrays.ids).encode())
        digest.update(np.ascontiguousarray(arrays.labels, dtype="<i8").tobytes())
        for name in SPECS:
            arr = np.ascontiguousarray(arrays.modalities[name])
            digest.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
            digest.update(arr.tobytes())
        for name in sorted(arrays.subsets):
            digest.update(f"subset={name}".encode())
            digest.update(np.asarray(arrays.subsets[name], dtype=bool).tobytes())
    return digest.hexdigest()


def stream(path, pieces: dict[str, list[SplitArrays]], **kwargs):
    with DatasetWriter(
        path, name="toy", version="1", classes=["a", "b", "c"], modalities=SPECS, subsets=["hard"], **kwargs
    ) as writer:
        for split, parts in pieces.items():
            with writer.split(split) as out:
                for part in parts:
                    out.append(part)
        return writer.finish(split_protocol="official", split_seed=None)


def test_a_streamed_many_chunk_dataset_reads_back_identical_to_a_one_chunk_one(tmp_path):
    pieces = {
        "train": [rows(n, 100 * i, i) for i, n in enumerate([7, 1, 13, 0, 9])],
        "val": [rows(5, 1000, 10)],
        "test": [rows(3, 2000, 11), rows(4, 3000, 12)],
    }
    streamed = stream(tmp_path / "streamed", pieces, max_batch_rows=4)
    whole = {s: concat(p) for s, p in pieces.items()}
    single = write_dataset(
        tmp_path / "single",
        name="toy",
        version="1",
        classes=["a", "b", "c"],
        splits=whole,
        split_protocol="official",
        split_seed=None,
    )
    assert streamed.content_sha256 == single.content_sha256  # the same logical content, whatever the chunks
    assert streamed.content_sha256 == in_memory_hash(whole)  # the definition every dataset so far carries
    assert streamed.splits == single.splits
    a, b = ArrowDataset(tmp_path / "streamed"), ArrowDataset(tmp_path / "single")
    a.verify()
    train_a, train_b = a.split("train"), b.split("train")
    assert (
        len(train_a.columns["audio"].chunks) == 8 and len(train_b.columns["audio"].chunks) == 1
    )  # 30 rows / 4
    np.testing.assert_array_equal(train_a.ids, whole["train"].ids)
    np.testing.assert_array_equal(train_a.labels, train_b.labels)
    np.testing.assert_array_equal(train_a.subsets["hard"], whole["train"].subsets["hard"])
    index = np.array([29, 0, 3, 4, 4, 17, 28, 8])  # chunk edges, a repeat, unsorted
    for m in SPECS:
        assert train_a.columns[m]._rows is not None  # the one-fancy-index path, not the per-chunk loop
        np.testing.assert_array_equal(train_a.columns[m].gather(index), whole["train"].modalities[m][index])
        np.testing.assert_array_equal(train_a.columns[m].gather(index), train_b.columns[m].gather(index))


def test_batches_stay_within_the_byte_budget_and_arrow_s_element_limit():
    # 3·4·2 + 2·5 bytes + 16 for id and label = 50 bytes a row
    assert _rows_per_batch(SPECS, max_bytes=1000, max_rows=None) == 20
    assert _rows_per_batch(SPECS, max_bytes=1000, max_rows=7) == 7
    video = {"video": ModalitySpec(dtype="uint8", shape=(3, 16, 224, 224))}  # 2.4 M elements a row
    assert _rows_per_batch(video, max_bytes=2**40, max_rows=None) == ARROW_MAX_ELEMENTS // (
        3 * 16 * 224 * 224
    )


def test_an_error_mid_split_leaves_the_old_dataset_and_no_temporary_folder(tmp_path):
    stream(tmp_path / "toy", {"train": [rows(4, 0, 0)], "val": [rows(2, 10, 1)], "test": [rows(2, 20, 2)]})
    before = ArrowDataset(tmp_path / "toy").manifest.content_sha256
    bad = rows(3, 50, 3)
    bad.labels[1] = 7  # not a class
    with pytest.raises(DatasetFormatError, match=r"split 'train' has labels outside 0\.\.2"):
        stream(tmp_path / "toy", {"train": [rows(4, 0, 5), bad]})
    with pytest.raises(DatasetFormatError, match="splits \\['test'\\] are missing"):
        stream(tmp_path / "toy", {"train": [rows(4, 0, 5)], "val": [rows(2, 10, 1)]})
    assert ArrowDataset(tmp_path / "toy").manifest.content_sha256 == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


def test_rows_that_do_not_match_the_declared_modalities_are_refused_naming_them(tmp_path):
    wrong = rows(2, 0, 0)
    wrong.modalities["audio"] = wrong.modalities["audio"].astype(np.float32)
    with pytest.raises(DatasetFormatError, match=r"has modalities .*float32.*expected .*float16"):
        stream(tmp_path / "x", {"train": [wrong]})


@pytest.mark.slow
def test_peak_memory_of_a_streamed_write_stays_bounded_as_the_dataset_grows(tmp_path):
    """320 MB streamed in 4 MB pieces with 16 MiB batches: the writer's anonymous memory peak (not the
    page cache of its files, ``tests/memory_probe.py``) stays near a batch, far below the data."""
    script = PRELUDE + textwrap.dedent(
        f"""
        import numpy as np
        from midasbench.datasets.format import ModalitySpec, SplitArrays
        from midasbench.datasets.writer import DatasetWriter
        spec = {{"x": ModalitySpec(dtype="uint8", shape=(4096,))}}
        def piece(i, n=1024):
            ids = np.array([f"{{i}}-{{k}}" for k in range(n)])
            x = np.full((n, 4096), i % 251, dtype=np.uint8)
            return SplitArrays(ids=ids, labels=np.zeros(n, dtype=np.int64), modalities={{"x": x}})
        def write():
            with DatasetWriter({str(tmp_path / "big")!r}, name="big", version="1", classes=["a"],
                               modalities=spec, max_batch_bytes=16 * 2**20) as w:
                with w.split("train") as out:
                    for i in range(80):
                        out.append(piece(i))
                for s in ("val", "test"):
                    with w.split(s) as out:
                        out.append(piece(0, 8))
                w.finish(split_protocol="official", split_seed=None)
        measure(write)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mb = int(done.stdout.strip().splitlines()[-1])
    print(f"peak memory growth while streaming 320 MB: {growth_mb} MB")
    assert growth_mb < 100, f"peak memory grew by {growth_mb} MB while writing 320 MB"
