"""mosi: the CMU-MOSI builder on tiny pickles in the MMSA and MulT release formats, built through the CLI.

The fixtures are written here in the real layout (``MOSI/Processed/unaligned_50.pkl``: a dict of splits
``train``/``valid``/``test`` with ``text``, ``audio``, ``vision``, ``regression_labels``, ``id``,
``audio_lengths``, ``vision_lengths``, ``text_bert``; ``mosi_data.pkl``: the same splits with ``labels``
``N × 1 × 1`` and no lengths). Every expected label, length and id below is written out by hand.
"""

from __future__ import annotations

import json
import pickle
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from raw_fixtures import short_run

from midasbench.datasets import ArrowDataset, mosi
from midasbench.harness.cli import main

TEXT_LEN, AUDIO_LEN, VISION_LEN = 8, 10, 12  # MMSA pads each modality to its own length
TEXT_DIM, AUDIO_DIM, VISION_DIM = 4, 5, 20
MULT_LEN = 8  # MulT's features are word-aligned: one length for all

# 6 / 3 / 3 segments; one score of exactly 0 in each split (the tie rules differ on them)
SCORES = {
    "train": [-2.4, -0.6, 0.0, 0.8, 1.6, 3.0],
    "valid": [-1.2, 0.0, 2.2],
    "test": [-3.0, 0.4, 0.0],
}
AUDIO_LENGTHS = {"train": [3, 10, 1, 7, 5, 2], "valid": [4, 6, 10], "test": [1, 2, 3]}
VISION_LENGTHS = {"train": [12, 1, 6, 6, 2, 9], "valid": [3, 12, 5], "test": [7, 8, 2]}
TEXT_LENGTHS = {"train": [2, 8, 5, 1, 3, 4], "valid": [6, 2, 7], "test": [8, 3, 1]}
IDS = {
    "train": ["vA$_$1", "vA$_$2", "vB$_$1", "vB$_$2", "vC$_$1", "vC$_$3"],
    "valid": ["vD$_$1", "vD$_$2", "vE$_$1"],
    "test": ["vF$_$1", "vF$_$2", "vG$_$4"],
}
LABELS = {  # by hand from SCORES
    "positive": {"train": [0, 0, 1, 1, 1, 1], "val": [0, 1, 1], "test": [0, 1, 1]},
    "negative": {"train": [0, 0, 0, 1, 1, 1], "val": [0, 0, 1], "test": [0, 1, 0]},
    "exclude": {"train": [0, 0, 1, 1, 1], "val": [0, 1], "test": [0, 1]},
}
OUR_SPLIT = {"train": "train", "valid": "val", "test": "test"}


def features(n: int, length: int, dim: int, seed: int) -> np.ndarray:
    """Seeded float64 features, padding included (the builder stores the rows as given)."""
    return np.random.default_rng(seed).normal(size=(n, length, dim))


def text_bert(lengths: list[int]) -> np.ndarray:
    """``(N, 3, L)``: token ids, an attention mask of ``lengths`` ones, zero segment ids."""
    out = np.zeros((len(lengths), 3, TEXT_LEN), dtype=np.int64)
    for row, length in enumerate(lengths):
        out[row, 0, :length] = 100 + np.arange(length)
        out[row, 1, :length] = 1
    return out


def mmsa_pickle() -> dict[str, dict[str, Any]]:
    data = {}
    for seed, (key, scores) in enumerate(SCORES.items()):
        n = len(scores)
        audio = features(n, AUDIO_LEN, AUDIO_DIM, seed)
        if key == "train":
            audio[1, 4, 2] = -np.inf  # COVAREP's -inf: stored as 0
        data[key] = {
            "text": features(n, TEXT_LEN, TEXT_DIM, 10 + seed),
            "text_bert": text_bert(TEXT_LENGTHS[key]),
            "audio": audio,
            "vision": features(n, VISION_LEN, VISION_DIM, 20 + seed),
            "audio_lengths": list(AUDIO_LENGTHS[key]),
            "vision_lengths": np.array(VISION_LENGTHS[key]),
            "regression_labels": np.array(scores, dtype=np.float32),
            "raw_text": ["some words"] * n,
            "id": list(IDS[key]),
        }
    return data


def mult_pickle() -> dict[str, dict[str, Any]]:
    data = {}
    for seed, (key, scores) in enumerate(SCORES.items()):
        n = len(scores)
        data[key] = {
            "text": features(n, MULT_LEN, TEXT_DIM, 30 + seed).astype(np.float32),
            "audio": features(n, MULT_LEN, AUDIO_DIM, 40 + seed).astype(np.float32),
            "vision": features(n, MULT_LEN, VISION_DIM, 50 + seed).astype(np.float32),
            "labels": np.array(scores, dtype=np.float32).reshape(n, 1, 1),
            "id": np.array([[i.split("$_$")[0].encode(), i.split("$_$")[1].encode()] for i in IDS[key]]),
        }
    return data


def write_pickle(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))
    return path


@pytest.fixture
def mmsa_tree(tmp_path: Path) -> Path:
    write_pickle(tmp_path / "raw" / "MOSI" / "Processed" / "unaligned_50.pkl", mmsa_pickle())
    return tmp_path / "raw"


def build(tree: Path, root: Path, *args: str) -> int:
    """``midasbench data build mosi`` with ``KEY=VALUE`` options and flags given in any order."""
    options = [a for a in args if "=" in a and not a.startswith("-")]
    flags = [a for a in args if a not in options]
    return main(
        ["data", "build", "mosi", *options, "--raw", str(tree), "--root", str(root), "--workers", "1", *flags]
    )


def built(root: Path, split: str = "official") -> ArrowDataset:
    (directory,) = root.glob(f"mosi-{split}-*")
    dataset = ArrowDataset(directory)
    dataset.verify()
    return dataset


def test_mmsa_pickle_builds_with_its_lengths_labels_and_ids(mmsa_tree: Path, tmp_path: Path):
    assert build(mmsa_tree, tmp_path / "d", "--split", "official") == 0
    dataset = built(tmp_path / "d")
    manifest = dataset.manifest
    assert manifest.classes == ["negative", "positive"]
    assert {k: v.rows for k, v in manifest.splits.items()} == {"train": 6, "val": 3, "test": 3}
    shapes = {m: (s.dtype, s.shape, s.variable_length) for m, s in manifest.modalities.items()}
    assert shapes == {
        "text": ("float32", (TEXT_LEN, TEXT_DIM), True),
        "audio": ("float32", (AUDIO_LEN, AUDIO_DIM), True),
        "visual": ("float32", (VISION_LEN, VISION_DIM), True),
    }
    assert manifest.subsets == ["non0"]
    raw = mmsa_pickle()
    info = manifest.build_options
    assert info["lengths_from"] == {
        "audio": "audio_lengths",
        "visual": "vision_lengths",
        "text": "text_bert mask",
    }
    assert info["tie_excluded"] == [] and len(info["raw_sha256"]) == 64
    for key, split in OUR_SPLIT.items():
        data = dataset.split(split)
        assert data.ids.tolist() == IDS[key]
        assert data.labels.tolist() == LABELS["positive"][split]
        assert data.lengths["audio"].tolist() == AUDIO_LENGTHS[key]
        assert data.lengths["visual"].tolist() == VISION_LENGTHS[key]
        assert data.lengths["text"].tolist() == TEXT_LENGTHS[key]
        assert data.subsets["non0"].tolist() == [s != 0.0 for s in SCORES[key]]
        np.testing.assert_array_equal(data.columns["text"].to_numpy(), raw[key]["text"].astype(np.float32))
        np.testing.assert_array_equal(
            data.columns["visual"].to_numpy(), raw[key]["vision"].astype(np.float32)
        )
        audio = raw[key]["audio"].astype(np.float32)
        if key == "train":
            assert data.columns["audio"].to_numpy()[1, 4, 2] == 0.0  # was -inf
            audio[1, 4, 2] = 0.0
        np.testing.assert_array_equal(data.columns["audio"].to_numpy(), audio)


@pytest.mark.parametrize("tie", ["negative", "exclude"])
def test_tie_rules_decide_a_score_of_zero(mmsa_tree: Path, tmp_path: Path, tie: str):
    assert build(mmsa_tree, tmp_path / "d", "--split", "official", f"tie={tie}") == 0
    dataset = built(tmp_path / "d")
    for split, labels in LABELS[tie].items():
        assert dataset.split(split).labels.tolist() == labels
    excluded = dataset.manifest.build_options["tie_excluded"]
    if tie == "exclude":  # MMSA "Non0": the three zero scores leave, listed by id
        assert excluded == ["vB$_$1", "vD$_$2", "vG$_$4"]
        assert {k: v.rows for k, v in dataset.manifest.splits.items()} == {"train": 5, "val": 2, "test": 2}
        assert "vB$_$1" not in dataset.split("train").ids
        assert dataset.manifest.subsets == []
    else:
        assert excluded == [] and dataset.manifest.subsets == ["non0"]


def test_mult_pickle_is_fixed_length_with_joined_ids(tmp_path: Path):
    tree = tmp_path / "raw"
    write_pickle(tree / "mosi_data.pkl", mult_pickle())
    assert build(tree, tmp_path / "d", "--split", "official", "format=mult") == 0
    dataset = built(tmp_path / "d")
    modalities = dataset.manifest.modalities
    assert {m: (s.shape, s.variable_length) for m, s in modalities.items()} == {
        "text": ((MULT_LEN, TEXT_DIM), False),
        "audio": ((MULT_LEN, AUDIO_DIM), False),
        "visual": ((MULT_LEN, VISION_DIM), False),
    }
    assert dataset.manifest.build_options["lengths_from"] == {}
    raw = mult_pickle()
    for key, split in OUR_SPLIT.items():
        data = dataset.split(split)
        assert data.ids.tolist() == [i.replace("$_$", "_") for i in IDS[key]]  # b"vA", b"1" -> "vA_1"
        assert data.labels.tolist() == LABELS["positive"][split]
        assert data.lengths == {}
        np.testing.assert_array_equal(data.columns["visual"].to_numpy(), raw[key]["vision"])


def test_use_lengths_false_stores_every_modality_fixed_length(mmsa_tree: Path, tmp_path: Path):
    assert build(mmsa_tree, tmp_path / "d", "--split", "official", "use_lengths=false") == 0
    dataset = built(tmp_path / "d")
    assert not any(spec.variable_length for spec in dataset.manifest.modalities.values())
    assert dataset.split("train").lengths == {}


def big_mmsa_pickle() -> dict[str, dict[str, Any]]:
    """20 / 8 / 12 segments, half of each split negative: enough for the stratified midas70 cut."""
    data = {}
    for seed, (key, n) in enumerate({"train": 20, "valid": 8, "test": 12}.items()):
        data[key] = {
            "text": features(n, TEXT_LEN, TEXT_DIM, seed),
            "audio": features(n, AUDIO_LEN, AUDIO_DIM, seed + 1),
            "vision": features(n, VISION_LEN, VISION_DIM, seed + 2),
            "audio_lengths": 1 + np.arange(n) % AUDIO_LEN,
            "vision_lengths": 1 + np.arange(n) % VISION_LEN,
            "regression_labels": np.where(np.arange(n) % 2, 1.5, -1.5),
            "id": [f"{key}{i}" for i in range(n)],
        }
    return data


def test_midas70_is_stratified_and_reproducible_per_seed(tmp_path: Path):
    tree = tmp_path / "raw"
    write_pickle(tree / "MOSI" / "Processed" / "unaligned_50.pkl", big_mmsa_pickle())

    def split_ids(root: str, seed: int) -> dict[str, list[str]]:
        assert build(tree, tmp_path / root, "--split", "midas70", "--split-seed", str(seed)) == 0
        dataset = built(tmp_path / root, f"midas70-s{seed}")
        out = {}
        for split, rows in {"train": 28, "val": 4, "test": 8}.items():  # 70/10/20 of 40
            data = dataset.split(split)
            assert len(data.ids) == rows and data.labels.sum() == rows // 2  # stratified: half positive
            out[split] = data.ids.tolist()
        return out

    first, again, other = split_ids("a", 2), split_ids("b", 2), split_ids("c", 3)
    assert first == again
    assert first != other
    assert sorted(chain(*first.values())) == sorted(chain(*other.values()))  # the same 40 samples


def test_missing_file_split_or_field_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    tree = tmp_path / "raw"
    assert build(tree, tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert (
        f"{tree / 'MOSI' / 'Processed' / 'unaligned_50.pkl'}: not found" in err and "expected layout" in err
    )
    path = tree / "MOSI" / "Processed" / "unaligned_50.pkl"
    data = mmsa_pickle()
    del data["valid"]
    write_pickle(path, data)
    assert build(tree, tmp_path / "d") == 2
    assert f"{path}: has no split 'valid' (it has ['test', 'train'])" in capsys.readouterr().err
    data = mmsa_pickle()
    del data["test"]["vision"]
    write_pickle(path, data)
    assert build(tree, tmp_path / "d") == 2
    assert f"{path}: split 'test' has no field 'vision'" in capsys.readouterr().err
    data = mmsa_pickle()
    data["valid"]["audio_lengths"] = [1, 2]
    write_pickle(path, data)
    assert build(tree, tmp_path / "d") == 2
    assert "split 'valid': field 'audio_lengths' is int64[2]; expected one number per row (3 rows)" in (
        capsys.readouterr().err
    )
    assert not list((tmp_path / "d").glob("mosi-*"))  # nothing was written


def test_corrupt_pickle_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "raw" / "mosi_data.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a pickle at all")
    assert build(tmp_path / "raw", tmp_path / "d", "format=mult", "--skip-bad") == 2  # not one sample: fatal
    assert f"{path}: not a readable pickle" in capsys.readouterr().err


def test_a_malformed_row_is_named_or_skipped_and_listed(mmsa_tree: Path, tmp_path: Path, capsys):
    path = mmsa_tree / "MOSI" / "Processed" / "unaligned_50.pkl"
    data = mmsa_pickle()
    data["valid"]["vision"][2, 0, 3] = np.nan
    data["test"]["audio_lengths"][1] = 0
    write_pickle(path, data)
    assert build(mmsa_tree, tmp_path / "d", "--split", "official") == 2
    assert (
        f"{path} [valid row 2, id vE$_$1]: field 'vision' holds 1 NaN or inf values"
        in capsys.readouterr().err
    )
    assert build(mmsa_tree, tmp_path / "d", "--split", "official", "--skip-bad") == 0
    dataset = built(tmp_path / "d")
    assert {k: v.rows for k, v in dataset.manifest.splits.items()} == {"train": 6, "val": 2, "test": 2}
    skipped = dataset.manifest.build_options["skipped"]
    assert [s["item"] for s in skipped] == [
        f"{path} [valid row 2, id vE$_$1]",
        f"{path} [test row 1, id vF$_$2]",
    ]
    assert "field 'audio_lengths' is 0, not a whole number in 1..10" in skipped[1]["reason"]
    assert dataset.split("test").ids.tolist() == ["vF$_$1", "vG$_$4"]
    # nonfinite=zero keeps the NaN row, as 0
    assert build(mmsa_tree, tmp_path / "z", "--split", "official", "--skip-bad", "nonfinite=zero") == 0
    val = built(tmp_path / "z").split("val")
    assert val.ids.tolist() == IDS["valid"] and val.columns["visual"].to_numpy()[2, 0, 3] == 0.0


def test_an_interrupted_build_resumes_from_its_shards(mmsa_tree: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mosi, "SHARD_SIZE", 4)  # 12 samples: 3 shards
    calls: list[str] = []
    decode = mosi.decode_samples

    def interrupting(items, options):
        calls.append(items[0].sample_id)
        if len(calls) == 2 and not (tmp_path / "resumed").exists():
            raise KeyboardInterrupt
        return decode(items, options)

    monkeypatch.setattr(mosi, "decode_samples", interrupting)
    assert build(mmsa_tree, tmp_path / "d", "--split", "official") == 130
    assert calls == ["vA$_$1", "vC$_$1"]
    (tmp_path / "resumed").write_text("")
    calls.clear()
    assert build(mmsa_tree, tmp_path / "d", "--split", "official") == 0
    assert calls == ["vC$_$1", "vE$_$1"]  # the first shard was kept
    assert build(mmsa_tree, tmp_path / "fresh", "--split", "official") == 0
    assert built(tmp_path / "d").manifest.content_sha256 == built(tmp_path / "fresh").manifest.content_sha256


def test_the_preset_trains_on_the_built_fixture(mmsa_tree: Path, tmp_path: Path):
    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import train

    tiny = "{name: transformer, params: {d_model: 8, nhead: 2, num_layers: 1, dim_feedforward: 16}}"
    cfg = load_config(
        "mosi",
        [
            f"data.root={tmp_path / 'data'}",
            f"data.options={json.dumps({'raw': str(mmsa_tree)})}",
            f"model.encoders={{text: {tiny}, audio: {tiny}, visual: {tiny}}}",
            *short_run(tmp_path / "ckpt"),
        ],
    )
    result = train(cfg)
    assert np.isfinite(result.history[-1]["train/loss"])
    assert 0.0 <= result.test["acc"] <= 1.0 and "acc_non0" in result.test
    (directory,) = (tmp_path / "data").glob("mosi-official-*")  # the preset built it by name
    assert ArrowDataset(directory).manifest.modalities["audio"].variable_length
