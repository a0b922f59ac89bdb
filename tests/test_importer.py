"""``import_folder``: the three modality forms, both label kinds, both protocols, and every bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midasbench.datasets.format import ArrowDataset, DatasetFormatError
from midasbench.datasets.importer import import_folder

N = 42
NAMES = ["cat", "dog", "emu"]


def _ids(n: int = N) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def _write_labels(
    folder: Path,
    ids: list[str],
    labels: list[str],
    splits: list[str] | None = None,
    header: str | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [header or ("id,label,split" if splits is not None else "id,label")]
    for i, (sample_id, label) in enumerate(zip(ids, labels, strict=True)):
        rows.append(f"{sample_id},{label}" + (f",{splits[i]}" if splits is not None else ""))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


def _official(n: int = N) -> list[str]:
    return ["train" if i % 6 < 4 else ("val" if i % 6 == 4 else "test") for i in range(n)]


def _arrays(n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "audio": rng.normal(size=(n, 8)),  # float64 → stored float32
        "image": rng.integers(0, 255, size=(n, 1, 4, 4), dtype=np.uint8),
        "tokens": rng.integers(0, 1000, size=(n, 5), dtype=np.int64),
    }


def _write_npy(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)


def _write_parquet(folder: Path, arrays: dict[str, np.ndarray], ids: list[str]) -> None:
    for name, arr in arrays.items():
        # reversed row order: rows are matched on id, not position
        flat = arr.reshape(len(arr), -1)[::-1]
        value = pa.array(list(flat), type=pa.list_(pa.from_numpy_dtype(arr.dtype)))
        table = pa.table({"id": ids[::-1], "value": value})
        if arr.ndim > 2:
            table = table.replace_schema_metadata({"shape": json.dumps(list(arr.shape[1:]))})
        pq.write_table(table, folder / f"{name}.parquet")


def _write_per_sample(folder: Path, arrays: dict[str, np.ndarray], ids: list[str]) -> None:
    for name, arr in arrays.items():
        (folder / name).mkdir()
        for sample_id, row in zip(ids, arr, strict=True):
            np.save(folder / name / f"{sample_id}.npy", row)


WRITERS: dict[str, Callable[[Path, dict[str, np.ndarray], list[str]], None]] = {
    "npy": lambda folder, arrays, ids: _write_npy(folder, arrays),
    "parquet": _write_parquet,
    "folder": _write_per_sample,
}


def _folder(
    tmp_path: Path, form: str, label_kind: str, splits: bool = True
) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / f"in-{form}-{label_kind}"
    ids = _ids()
    index = [i % len(NAMES) for i in range(N)]
    labels = [NAMES[i] for i in index] if label_kind == "str" else [str(i) for i in index]
    _write_labels(folder, ids, labels, _official() if splits else None)
    arrays = _arrays()
    WRITERS[form](folder, arrays, ids)
    return folder, arrays


def _all_rows(ds: ArrowDataset) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    out = {}
    for split in ("train", "val", "test"):
        data = ds.split(split)
        for row, sample_id in enumerate(data.ids):
            idx = np.array([row])
            out[str(sample_id)] = (
                int(data.labels[row]),
                {name: col.gather(idx)[0] for name, col in data.columns.items()},
            )
    return out


@pytest.mark.parametrize("form", ["npy", "parquet", "folder"])
@pytest.mark.parametrize("label_kind", ["str", "int"])
def test_import_round_trip(tmp_path: Path, form: str, label_kind: str) -> None:
    folder, arrays = _folder(tmp_path, form, label_kind)
    out = import_folder(folder, name="mine", root=tmp_path / "data")
    assert out == tmp_path / "data" / "mine"
    ds = ArrowDataset(out)
    m = ds.manifest
    assert m.name == "mine" and m.version == "imported-1"
    assert m.classes == (NAMES if label_kind == "str" else ["0", "1", "2"])
    assert {k: (v.dtype, v.shape) for k, v in m.modalities.items()} == {
        "audio": ("float32", (8,)),
        "image": ("uint8", (1, 4, 4)),
        "tokens": ("int64", (5,)),
    }
    assert sum(s.rows for s in m.splits.values()) == N
    assert m.split_protocol == "midas70" and m.split_seed == 2
    assert m.build_options["source"] == str(folder.resolve())
    assert m.build_options["modalities"]["audio"]["source_dtype"] == "float64"
    assert m.build_options["labels"]["kind"] == label_kind

    rows = _all_rows(ds)
    assert sorted(rows) == _ids()
    for i in (0, 17, N - 1):
        label, values = rows[f"s{i:03d}"]
        assert label == i % len(NAMES)
        np.testing.assert_array_equal(values["audio"], arrays["audio"][i].astype(np.float32))
        np.testing.assert_array_equal(values["image"], arrays["image"][i])
        np.testing.assert_array_equal(values["tokens"], arrays["tokens"][i])
    ds.verify()


def test_official_split(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path, "npy", "str")
    out = import_folder(folder, name="off", out=tmp_path / "custom", split="official")
    ds = ArrowDataset(out)
    assert ds.manifest.split_protocol == "official" and ds.manifest.split_seed is None
    official = dict(zip(_ids(), _official(), strict=True))
    for split in ("train", "val", "test"):
        ids = [str(i) for i in ds.split(split).ids]
        assert ids == [i for i in _ids() if official[i] == split]


def test_midas70_depends_on_seed(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path, "npy", "int", splits=False)
    a = ArrowDataset(import_folder(folder, name="a", root=tmp_path, split_seed=1))
    b = ArrowDataset(import_folder(folder, name="b", root=tmp_path, split_seed=2))
    assert {k: v.rows for k, v in a.manifest.splits.items()} == {"train": 29, "val": 4, "test": 9}
    assert list(a.split("test").ids) != list(b.split("test").ids)


def test_classes_file_sets_order_and_names(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path, "npy", "str")
    (folder / "classes.txt").write_text("emu\ncat\n\ndog\nyak\n")
    ds = ArrowDataset(import_folder(folder, name="c", root=tmp_path / "d"))
    assert ds.manifest.classes == ["emu", "cat", "dog", "yak"]
    rows = _all_rows(ds)
    assert rows["s000"][0] == 1 and rows["s001"][0] == 2 and rows["s002"][0] == 0

    folder, _ = _folder(tmp_path, "npy", "int")
    (folder / "classes.txt").write_text("zero\none\ntwo\n")
    assert ArrowDataset(import_folder(folder, name="i", root=tmp_path / "d")).manifest.classes == [
        "zero",
        "one",
        "two",
    ]


def test_parquet_fixed_shape_tensor_and_bool(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    ids = _ids()
    _write_labels(folder, ids, [NAMES[i % 3] for i in range(N)])
    video = np.arange(N * 6, dtype=np.float32).reshape(N, 2, 3)
    pq.write_table(
        pa.table({"id": ids, "value": pa.FixedShapeTensorArray.from_numpy_ndarray(video)}),
        folder / "video.parquet",
    )
    mask = np.arange(N * 4).reshape(N, 4) % 3 == 0
    np.save(folder / "mask.npy", mask)
    np.save(folder / "score.npy", np.arange(N, dtype=np.float16))  # one scalar per sample
    ds = ArrowDataset(import_folder(folder, name="t", root=tmp_path))
    specs = {k: (v.dtype, v.shape) for k, v in ds.manifest.modalities.items()}
    assert specs == {"mask": ("uint8", (4,)), "score": ("float16", (1,)), "video": ("float32", (2, 3))}
    _, values = _all_rows(ds)["s005"]
    np.testing.assert_array_equal(values["video"], video[5])
    np.testing.assert_array_equal(values["mask"], mask[5].astype(np.uint8))
    assert values["score"][0] == 5


def test_reimport_replaces_dataset(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path, "npy", "str")
    out = import_folder(folder, name="r", root=tmp_path)
    first = ArrowDataset(out).manifest.content_sha256
    np.save(folder / "audio.npy", np.zeros((N, 8)))
    assert ArrowDataset(import_folder(folder, name="r", root=tmp_path)).manifest.content_sha256 != first


# ---------------------------------------------------------------- bad inputs: each names file and value


def _bad(tmp_path: Path, match: list[str], **kwargs: object) -> None:
    """Import ``tmp_path/in`` expecting an error whose message holds every string of ``match``."""
    target = tmp_path / "data" / "bad"
    with pytest.raises(DatasetFormatError) as info:
        import_folder(tmp_path / "in", name="bad", root=tmp_path / "data", **kwargs)  # type: ignore[arg-type]
    for text in match:
        assert text in str(info.value), (text, str(info.value))
    assert not target.exists()
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def _good(tmp_path: Path, n: int = N) -> Path:
    folder = tmp_path / "in"
    _write_labels(folder, _ids(n), [NAMES[i % 3] for i in range(n)])
    np.save(folder / "audio.npy", np.ones((n, 3), dtype=np.float32))
    return folder


def test_missing_labels_csv(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "audio.npy", np.ones((3, 2)))
    _bad(tmp_path, ["labels.csv", "not found"])


@pytest.mark.parametrize("column", ["label"])  # id is optional (test_labels_without_ids_...)
def test_missing_column(tmp_path: Path, column: str) -> None:
    folder = _good(tmp_path)
    header = "id,label".replace(column, "other")
    _write_labels(folder, _ids(), ["cat"] * N, header=header)
    _bad(tmp_path, ["labels.csv", f"column {column!r}"])


def test_duplicate_id(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    ids = _ids()
    ids[7] = ids[3]
    _write_labels(folder, ids, [NAMES[i % 3] for i in range(N)])
    _bad(tmp_path, ["labels.csv", "line 9", "duplicate id 's003'", "line 5"])


def test_label_not_in_classes_file(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "classes.txt").write_text("cat\ndog\n")
    _bad(tmp_path, ["labels.csv line 4", "'emu'", "classes.txt"])


def test_int_label_outside_classes_file(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _write_labels(folder, _ids(), [str(i % 3) for i in range(N)])
    (folder / "classes.txt").write_text("a\nb\n")
    _bad(tmp_path, ["labels.csv line 4", "label '2'", "classes.txt"])


def test_negative_int_label(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _write_labels(folder, _ids(), ["-1"] + ["0"] * (N - 1))
    _bad(tmp_path, ["labels.csv line 2", "'-1'", "negative"])


def test_bad_split_value(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    splits = _official()
    splits[5] = "validation"
    _write_labels(folder, _ids(), [NAMES[i % 3] for i in range(N)], splits)
    _bad(tmp_path, ["labels.csv line 7", "field 'split'", "'validation'"])


def test_official_without_split_column(tmp_path: Path) -> None:
    _good(tmp_path)
    _bad(tmp_path, ["labels.csv", "column 'split'", "official"], split="official")


def test_official_with_an_empty_split(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    _write_labels(folder, _ids(), [NAMES[i % 3] for i in range(N)], ["train"] * (N - 1) + ["test"])
    _bad(tmp_path, ["labels.csv", "['val']"], split="official")


def test_npy_row_count(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    np.save(folder / "audio.npy", np.ones((N - 2, 3)))
    _bad(tmp_path, ["audio.npy", f"{N - 2} rows", f"labels.csv has {N} rows"])


def test_parquet_missing_id(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    ids = _ids()
    keep = [i for i in ids if i not in ("s010", "s020")]
    pq.write_table(
        pa.table({"id": keep, "value": pa.array([[1.0, 2.0]] * len(keep))}), folder / "text.parquet"
    )
    _bad(tmp_path, ["text.parquet", "id 's010'", "2 label id(s) missing"])


def test_parquet_missing_value_column(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    pq.write_table(pa.table({"id": _ids(), "vals": pa.array([[1.0]] * N)}), folder / "text.parquet")
    _bad(tmp_path, ["text.parquet", "column 'value'"])


def test_parquet_ragged_values(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    values = [[1.0, 2.0]] * N
    values[4] = [1.0, 2.0, 3.0]
    table = pa.table({"id": _ids(), "value": pa.array(values)})
    pq.write_table(table, folder / "text.parquet")
    _bad(tmp_path, ["text.parquet", "3 elements", "id 's004'"])
    pq.write_table(table.replace_schema_metadata({"shape": "[3]"}), folder / "text.parquet")
    _bad(tmp_path, ["text.parquet", "2 elements", "id 's000'", "[3]"])


def test_parquet_duplicate_id(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    ids = [*_ids(), "s001"]
    pq.write_table(pa.table({"id": ids, "value": pa.array([[1.0]] * len(ids))}), folder / "text.parquet")
    _bad(tmp_path, ["text.parquet", "duplicate id 's001'"])


def test_per_sample_shape_mismatch(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "image").mkdir()
    for i, sample_id in enumerate(_ids()):
        np.save(folder / "image" / f"{sample_id}.npy", np.zeros((2, 3) if i != 11 else (3, 2), np.uint8))
    _bad(tmp_path, ["s011.npy", "(3, 2)", "(2, 3)", "s000.npy"])


def test_per_sample_missing_file(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "image").mkdir()
    for sample_id in _ids()[:-1]:
        np.save(folder / "image" / f"{sample_id}.npy", np.zeros(2))
    _bad(tmp_path, [f"s{N - 1:03d}.npy", "not found"])


def test_no_modality(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "audio.npy").unlink()
    (folder / ".DS_Store").write_text("")
    (folder / "classes.txt").write_text("cat\ndog\nemu\n")
    _bad(tmp_path, ["no modality found"])


def test_unknown_file(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    (folder / "notes.md").write_text("hi")
    _bad(tmp_path, ["notes.md", "not a modality"])


def test_reserved_and_duplicate_modality_names(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    np.save(folder / "label.npy", np.ones((N, 1)))
    _bad(tmp_path, ["label.npy", "reserved"])
    (folder / "label.npy").unlink()
    pq.write_table(pa.table({"id": _ids(), "value": pa.array([[1.0]] * N)}), folder / "audio.parquet")
    _bad(tmp_path, ["audio.parquet", "audio.npy", "'audio'"])


def test_unsupported_dtype(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    np.save(folder / "audio.npy", np.ones((N, 2), dtype=np.complex64))
    _bad(tmp_path, ["audio.npy", "complex64"])


@pytest.mark.parametrize("form", ["npy", "folder"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_naming_the_file_the_sample_and_the_element(
    tmp_path: Path, form: str, bad: float
) -> None:
    folder = _good(tmp_path)
    values = np.ones((N, 2, 3), dtype=np.float64)
    values[7, 1, 2] = bad  # labels.csv line 9 (header, then s000 on line 2)
    (folder / "audio.npy").unlink()
    WRITERS[form](folder, {"audio": values}, _ids())
    source = "audio.npy" if form == "npy" else "audio"
    expected = [source, "'audio'", f"holds {bad}", "element (1, 2)", "sample 's007'", "line 9", "NaN and Inf"]
    _bad(tmp_path, expected)


def test_too_few_per_class_for_midas70(tmp_path: Path) -> None:
    _good(tmp_path, n=9)
    _bad(tmp_path, ["labels.csv", "midas70", "at least 5", "'cat' has 3, 'dog' has 3, 'emu' has 3"])


def test_refuses_to_replace_a_non_dataset_directory(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "file.txt").write_text("do not delete")
    with pytest.raises(DatasetFormatError, match="not a midasbench dataset"):
        import_folder(folder, name="x", out=keep)
    assert (keep / "file.txt").read_text() == "do not delete"
    with pytest.raises(DatasetFormatError, match="input folder"):
        import_folder(folder, name="x", out=tmp_path)
    with pytest.raises(DatasetFormatError, match="registered builder"):
        import_folder(folder, name="synthetic", root=tmp_path / "data")


def test_labels_without_ids_match_modalities_by_order(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "labels.csv").write_text("label\n" + "".join(f"{NAMES[i % 3]}\n" for i in range(N)))
    np.save(folder / "audio.npy", np.arange(N * 2, dtype=np.float32).reshape(N, 2))
    out = import_folder(folder, name="noid", root=tmp_path / "ok")
    train = ArrowDataset(out).split("train")
    rows = [int(i[3:]) for i in train.ids]  # "row<k>"
    np.testing.assert_array_equal(
        train.columns["audio"].to_numpy()[:, 0], np.array(rows, dtype=np.float32) * 2
    )
    (folder / "image").mkdir()
    _bad(tmp_path, ["image", "no 'id' column", "matched by order"])


def test_a_feature_csv_is_a_modality_matched_on_id_or_by_order(tmp_path: Path) -> None:
    folder = _good(tmp_path)
    ids = _ids()
    rows = [f"{sample_id},{k},{k * 0.5}" for k, sample_id in enumerate(ids)][::-1]  # reversed: matched on id
    (folder / "clinical.csv").write_text("id,age,score\n" + "\n".join(rows) + "\n")
    out = import_folder(folder, name="withcsv", root=tmp_path / "ok")
    data = ArrowDataset(out)
    assert (
        data.manifest.modalities["clinical"].shape == (2,)
        and data.manifest.modalities["clinical"].dtype == "float32"
    )
    train = data.split("train")
    k = np.array([ids.index(i) for i in train.ids])
    np.testing.assert_array_equal(
        train.columns["clinical"].to_numpy(), np.column_stack([k, k * 0.5]).astype(np.float32)
    )
    (folder / "clinical.csv").write_text("id,age\n" + "\n".join(f"{i}," for i in ids) + "\n")  # empty cells
    _bad(tmp_path, ["clinical", "holds nan", "NaN and Inf"])
    (folder / "clinical.csv").write_text("id,age\n" + "\n".join(f"{i},old" for i in ids) + "\n")
    _bad(tmp_path, ["clinical.csv", "column 'age'", "not numbers"])


def test_standardize_uses_training_statistics_only_and_records_them(tmp_path: Path) -> None:
    folder, _ = _folder(tmp_path, "npy", "str")  # official split column; audio float64 (N, 8)
    rng = np.random.default_rng(5)
    audio = rng.normal(3000.0, 50.0, size=(N, 8))  # values in the thousands
    np.save(folder / "audio.npy", audio)
    with pytest.warns(UserWarning, match="'audio' has training values up to .*--standardize"):
        import_folder(folder, name="raw", root=tmp_path / "ok", split="official")
    out = import_folder(folder, name="std", root=tmp_path / "ok", split="official", standardize=True)
    data = ArrowDataset(out)
    train_rows = [i for i, s in enumerate(_official()) if s == "train"]
    stored = audio.astype(np.float32).astype(np.float64)  # statistics of the stored (float32) values
    mean, std = stored[train_rows].mean(axis=0), stored[train_rows].std(axis=0)  # population std, train only
    recorded = data.manifest.build_options["standardize"]["audio"]
    np.testing.assert_allclose(recorded["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(recorded["std"], std, rtol=1e-9)
    assert "image" not in data.manifest.build_options["standardize"]  # integer modalities are left alone
    for split in ("train", "test"):
        part = data.split(split)
        rows = [_ids().index(i) for i in part.ids]
        expected = ((stored[rows] - mean) / std).astype(np.float32)
        np.testing.assert_allclose(part.columns["audio"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
    train = data.split("train").columns["audio"].to_numpy()
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)


def test_store_dtype_narrows_a_modality_after_checking_every_value_fits(tmp_path):
    from midasbench.datasets.importer import describe_import, import_folder

    folder = tmp_path / "narrow"
    folder.mkdir()
    n = 30
    (folder / "labels.csv").write_text("label\n" + "".join(f"{i % 3}\n" for i in range(n)))
    spec = np.linspace(-3.0, 3.0, n * 4, dtype=np.float32).reshape(n, 4)
    np.save(folder / "audio.npy", spec)
    np.save(folder / "pixels.npy", np.arange(n * 2, dtype=np.int64).reshape(n, 2))
    narrow = {"audio": "float16", "pixels": "uint8"}
    assert "audio: float16[4]" in describe_import(folder, store_dtypes=narrow)
    ds = ArrowDataset(import_folder(folder, name="narrow", out=tmp_path / "out", store_dtypes=narrow))
    assert ds.manifest.modalities["audio"].dtype == "float16"
    assert ds.manifest.modalities["pixels"].dtype == "uint8"
    assert ds.manifest.build_options["modalities"]["audio"]["stored_as"] == "float16"
    rows = {int(i[3:]): k for k, i in enumerate(ds.split("train").ids)}  # ids are row<k>
    stored = ds.split("train").columns["audio"].to_numpy()
    for row, k in rows.items():
        np.testing.assert_array_equal(stored[k], spec[row].astype(np.float16))
    np.save(folder / "pixels.npy", np.full((n, 2), 300, dtype=np.int64))
    with pytest.raises(DatasetFormatError, match=r"pixels=uint8: 'pixels' holds values in \[300, 300\]"):
        import_folder(folder, name="narrow", out=tmp_path / "out2", store_dtypes=narrow)
    with pytest.raises(DatasetFormatError, match="floats are not stored as integers"):
        import_folder(folder, name="narrow", out=tmp_path / "out3", store_dtypes={"audio": "uint8"})
    with pytest.raises(DatasetFormatError, match=r"has no modality 'video'"):
        import_folder(folder, name="narrow", out=tmp_path / "out4", store_dtypes={"video": "uint8"})


def test_store_dtype_flag_of_the_cli(tmp_path, capsys):
    from midasbench.harness.cli import EXIT_USAGE, main

    assert main(["data", "import", str(tmp_path), "--name", "x", "--store-dtype", "audio"]) == EXIT_USAGE
    assert "expected MODALITY=DTYPE" in capsys.readouterr().err
