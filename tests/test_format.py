"""The canonical Arrow format: round trip, hashing, atomic writes, clear errors."""

import json

import numpy as np
import pytest

from midasbench.datasets import format as fmt
from midasbench.datasets import writer as writer_module
from midasbench.datasets.format import ArrowDataset, DatasetFormatError, SplitArrays, write_dataset
from midasbench.datasets.loader import BatchLoader, epoch_permutation, gather_batch


def make_split(n: int, offset: int = 0, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    return SplitArrays(
        ids=[f"id{offset + i}" for i in range(n)],
        labels=rng.integers(0, 3, n),
        modalities={
            "audio": rng.standard_normal((n, 1, 4, 5)).astype(np.float32),
            "tokens": rng.integers(0, 100, (n, 7)).astype(np.int64),
            "image": rng.integers(0, 255, (n, 2, 3)).astype(np.uint8),
        },
        subsets={"clean": rng.random(n) < 0.5},
    )


def write(tmp_path, name="toy", chunk_rows=65536, **splits):
    splits = splits or {"train": make_split(20), "val": make_split(6, 100, 1), "test": make_split(9, 200, 2)}
    return write_dataset(
        tmp_path / name,
        name=name,
        version="1",
        classes=["a", "b", "c"],
        splits=splits,
        split_protocol="official",
        split_seed=None,
        build_options={"k": 1},
        chunk_rows=chunk_rows,
    ), splits


def test_round_trip_manifest_shapes_dtypes_and_values(tmp_path):
    manifest, splits = write(tmp_path)
    ds = ArrowDataset(tmp_path / "toy")
    assert ds.manifest == manifest
    assert {k: (v.dtype, v.shape) for k, v in manifest.modalities.items()} == {
        "audio": ("float32", (1, 4, 5)),
        "tokens": ("int64", (7,)),
        "image": ("uint8", (2, 3)),
    }
    assert {k: v.rows for k, v in manifest.splits.items()} == {"train": 20, "val": 6, "test": 9}
    on_disk = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert on_disk["classes"] == ["a", "b", "c"] and on_disk["content_sha256"] == manifest.content_sha256
    for split_name, arrays in splits.items():
        data = ds.split(split_name)
        assert data.ids.tolist() == arrays.ids.tolist()
        np.testing.assert_array_equal(data.labels, arrays.labels)
        for name, values in arrays.modalities.items():
            np.testing.assert_array_equal(data.columns[name].to_numpy(), values)
        np.testing.assert_array_equal(data.subsets["clean"], arrays.subsets["clean"])
        assert manifest.splits[split_name].ids_sha256 == fmt.hash_ids(arrays.ids)
    ds.verify()


def test_reads_are_zero_copy_views_of_the_memory_map(tmp_path):
    write(tmp_path)
    column = ArrowDataset(tmp_path / "toy").split("train").columns["audio"].to_numpy()
    assert not column.flags.writeable  # a view of the read-only map, not a private copy
    assert not column.flags.owndata


def test_content_hash_depends_on_values(tmp_path):
    m1, _ = write(tmp_path, name="a")
    other = make_split(20)
    other.modalities["audio"][0, 0, 0, 0] += 1
    m2, _ = write(tmp_path, name="b", train=other, val=make_split(6, 100, 1), test=make_split(9, 200, 2))
    m3, _ = write(tmp_path, name="c")
    assert m1.content_sha256 != m2.content_sha256
    assert m1.content_sha256 == m3.content_sha256


def test_verify_detects_a_changed_file(tmp_path):
    write(tmp_path, name="x")
    write(
        tmp_path,
        name="y",
        train=make_split(20, seed=5),
        val=make_split(6, 100, 1),
        test=make_split(9, 200, 2),
    )
    (tmp_path / "y" / "train.arrow").replace(tmp_path / "x" / "train.arrow")
    with pytest.raises(DatasetFormatError, match="content_sha256"):
        ArrowDataset(tmp_path / "x").verify()


def test_interrupted_write_leaves_no_complete_dataset_and_keeps_the_old_one(tmp_path, monkeypatch):
    write(tmp_path)
    before = ArrowDataset(tmp_path / "toy").manifest.content_sha256
    calls = {"n": 0}
    real = writer_module._record_batch

    def crash_on_second_split(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-write")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "_record_batch", crash_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, train=make_split(20, seed=9), val=make_split(6, 100, 1), test=make_split(9, 200, 2))
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, name="fresh")
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(DatasetFormatError, match="not a complete midasbench dataset"):
        ArrowDataset(tmp_path / "fresh")
    assert ArrowDataset(tmp_path / "toy").manifest.content_sha256 == before
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]  # no temporary leftovers


def test_multi_chunk_files_gather_the_right_rows(tmp_path):
    _, splits = write(tmp_path, chunk_rows=4)
    data = ArrowDataset(tmp_path / "toy").split("train")
    assert len(data.columns["audio"].chunks) == 5
    rows = np.array([19, 0, 5, 4, 3, 12])
    np.testing.assert_array_equal(
        data.columns["audio"].gather(rows), splits["train"].modalities["audio"][rows]
    )
    np.testing.assert_array_equal(
        data.columns["tokens"].gather(rows), splits["train"].modalities["tokens"][rows]
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m["splits"]["train"].update(rows=21), r"splits\.train\.rows says 21"),
        (lambda m: m.update(classes="abc"), "invalid manifest"),
    ],
)
def test_bad_manifests_name_the_file_and_field(tmp_path, mutate, message):
    write(tmp_path)
    path = tmp_path / "toy" / "manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=message) as info:
        ArrowDataset(tmp_path / "toy").split("train")
    assert "toy" in str(info.value)


def test_write_rejects_inconsistent_input(tmp_path):
    with pytest.raises(DatasetFormatError, match="modality 'a' has 3 rows, expected 2"):
        SplitArrays(ids=["x", "y"], labels=[0, 1], modalities={"a": np.zeros((3, 2))})
    bad_labels = make_split(5)
    bad_labels.labels[0] = 7
    with pytest.raises(DatasetFormatError, match=r"labels outside 0\.\.2"):
        write(tmp_path, train=bad_labels, val=make_split(2), test=make_split(2))
    with pytest.raises(DatasetFormatError, match=r"splits \['test'\] are missing"):
        write(tmp_path, train=make_split(2), val=make_split(2))


def test_batch_loader_order_is_a_function_of_seed_and_epoch_and_covers_the_split(tmp_path):
    write(tmp_path)
    split = ArrowDataset(tmp_path / "toy").split("train")
    loader = BatchLoader(split, 6, shuffle=True, seed=3)
    loader.set_epoch(1)
    first = [b.index.tolist() for b in loader]
    again = BatchLoader(split, 6, shuffle=True, seed=3)
    again.set_epoch(1)
    assert [b.index.tolist() for b in again] == first
    assert sorted(i for batch in first for i in batch) == list(range(20))
    assert len(loader) == 4
    loader.set_epoch(2)
    assert [b.index.tolist() for b in loader] != first
    loader.set_epoch(1)
    np.testing.assert_array_equal(loader.order(), epoch_permutation(20, 3, 1))
    # two ranks split the epoch into equal, disjoint-where-possible halves
    ranks = [BatchLoader(split, 4, shuffle=True, seed=3, rank=r, world_size=2).order() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10
    assert sorted(np.concatenate(ranks).tolist()) == list(range(20))


def test_a_trailing_single_row_joins_the_batch_before_it(tmp_path):
    from midasbench.datasets.loader import EpochPlan, batch_bounds

    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # 4 + 5, not 4 + 4 + 1
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(1, 4) == [(0, 1)]  # a one-row plan stays one batch
    assert batch_bounds(9, 4, drop_last=True) == [(0, 4), (4, 8)]
    assert EpochPlan(np.arange(9)).num_batches(4) == 2
    write(tmp_path)
    split = ArrowDataset(tmp_path / "toy").split("train")  # 20 rows
    loader = BatchLoader(split, 19, shuffle=True, seed=3)
    sizes = [len(b) for b in loader]
    assert sizes == [20] and len(loader) == 1
    tagged = EpochPlan(np.arange(13), np.arange(13) % 2)
    batches = list(BatchLoader(split, 6, shuffle=False).batches(tagged))
    assert [len(b) for b in batches] == [6, 7]  # 6 + 6 + 1 rows: the last row joins the second batch
    pairs = [(i, t) for b in batches for i, t in zip(b.index.tolist(), b.tags.tolist(), strict=True)]
    assert sorted(pairs) == [(i, i % 2) for i in range(13)]


def test_gather_batch_returns_typed_tensors(tmp_path):
    _, splits = write(tmp_path)
    split = ArrowDataset(tmp_path / "toy").split("train")
    batch = gather_batch(split, np.array([3, 1]))
    assert batch.index.tolist() == [1, 3]
    assert batch.inputs["tokens"].dtype.is_floating_point is False
    np.testing.assert_array_equal(batch.inputs["image"].numpy(), splits["train"].modalities["image"][[1, 3]])
    assert batch.labels.tolist() == splits["train"].labels[[1, 3]].tolist()


def test_a_concurrent_identical_build_keeps_the_dataset_that_finished_first(tmp_path):
    first, _ = write(tmp_path)
    other = make_split(20, seed=4)
    kept = write_dataset(
        tmp_path / "toy",
        name="toy",
        version="1",
        classes=["a", "b", "c"],
        splits={"train": other, "val": make_split(6, 100, 1), "test": make_split(9, 200, 2)},
        split_protocol="official",
        split_seed=None,
        replace_existing=False,
    )
    assert kept.content_sha256 == first.content_sha256
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
