"""The ``kinetics_sounds`` builder on a fixture tree in the MIDAS code's on-disk form: ``videos/train.txt``
and ``videos/val.txt`` (space separated ``filename start end label`` after a header row),
``videos/<name>/frame_0000k.jpg`` and ``audios/<name>.wav``; and with OGM-GE's ``my_train.txt`` /
``my_test.txt`` (``<name>,<n_frames>,<label>``) instead. 30 clips: 10 each of labels 0, 7 and 30; every
build goes through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import short_run, write_jpg, write_wav

from midasbench.datasets import ArrowDataset, cremad
from midasbench.datasets import kinetics_sounds as ks
from midasbench.datasets.format import ModalitySpec
from midasbench.datasets.raw.audio import fbank_clip
from midasbench.datasets.transforms import ModalityPipelines
from midasbench.harness.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from midasbench.harness.config import load_config

LABELS = (0, 7, 30)
PER_CLASS, TRAIN_PER_CLASS = 10, 8
FRAMES, SIZE = 5, 16  # stored frames a clip, stored height and width
FAST = {"frames": FRAMES, "image_size": SIZE, "audio_frames": 64}  # a training test in seconds


def clips() -> list[tuple[str, int]]:
    """``(name, label)`` in list order, class-interleaved; names like the release's ``<youtube id>_<start>``
    (one with a leading dash, as YouTube ids may have)."""
    return [
        (f"{'-' if i == 0 else ''}yt{i:02d}x{label}_{5 * i}", label)
        for i in range(PER_CLASS)
        for label in LABELS
    ]


def names() -> list[str]:
    return [name for name, _ in clips()]


def write_media(root: Path) -> None:
    """Per clip a WAV and 9 frames (``frame_00001.jpg`` ..., frame ``k`` red ``25·k``)."""
    for n, (name, _) in enumerate(clips()):
        write_wav(root / "audios" / f"{name}.wav", seconds=0.3, freq=300.0 + 40 * n, seed=n)
        for k in range(9):
            write_jpg(
                root / "videos" / name / f"frame_0000{k + 1}.jpg", color=(25 * k, 90, 160), size=(20, 16)
            )


def write_midas_lists(root: Path, header: bool = True) -> None:
    rows = [f"{name} {5 * i} {5 * i + 10} {label}" for i, (name, label) in enumerate(clips())]
    top = ["filename start end label"] if header else []
    (root / "videos/train.txt").write_text("\n".join(top + rows[: 3 * TRAIN_PER_CLASS]) + "\n")
    (root / "videos/val.txt").write_text("\n".join(top + rows[3 * TRAIN_PER_CLASS :]) + "\n")


def write_ogm_lists(root: Path) -> None:
    rows = [f"{name},9,{label}" for name, label in clips()]
    (root / "my_train.txt").write_text("\n".join(rows[: 3 * TRAIN_PER_CLASS]) + "\n")
    (root / "my_test.txt").write_text("\n".join(rows[3 * TRAIN_PER_CLASS :]) + "\n")


def write_tree(root: Path, lists: str = "midas") -> Path:
    write_media(root)
    if lists == "midas":
        write_midas_lists(root)
    else:
        write_ogm_lists(root)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("ks") / "raw")


def build(raw: Path, root: Path, *flags: str, options: tuple[str, ...] = ()) -> int:
    """``midasbench data build kinetics_sounds`` with the fixture's frame settings plus ``options``."""
    options = (f"frames={FRAMES}", f"image_size={SIZE}", *options)
    common = ("--raw", str(raw), "--root", str(root), "--workers", "1", "--no-progress")
    return main(["data", "build", "kinetics_sounds", *options, *common, *flags])


def built(root: Path) -> ArrowDataset:
    (directory,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return ArrowDataset(directory)


def split_ids(dataset: ArrowDataset) -> dict[str, list[str]]:
    return {s: dataset.split(s).ids.tolist() for s in ("train", "val", "test")}


def label_of(name: str) -> int:
    return dict(clips())[name]


def test_official_split_is_the_lists_with_a_stratified_val_cut(tree: Path, tmp_path: Path):
    assert build(tree, tmp_path / "data", "--split", "official") == EXIT_OK
    dataset = built(tmp_path / "data")
    dataset.verify()
    manifest = dataset.manifest
    assert manifest.classes == [str(k) for k in range(31)]
    assert {k: v.rows for k, v in manifest.splits.items()} == {"train": 21, "val": 3, "test": 6}
    ids = split_ids(dataset)
    assert sorted(ids["test"]) == sorted(names()[24:])  # val.txt: the held-out list
    assert sorted(ids["train"] + ids["val"]) == sorted(names()[:24])  # train.txt, header row skipped
    assert sorted(label_of(n) for n in ids["val"]) == [0, 7, 30]  # stratified: one of each
    assert (manifest.modalities["audio"].dtype, manifest.modalities["audio"].shape) == (
        "float16",
        (1024, 128),
    )
    assert manifest.modalities["visual"].dtype == "uint8"
    assert manifest.modalities["visual"].shape == (3, FRAMES, SIZE, SIZE)
    test = dataset.split("test")
    assert test.labels.tolist() == [label_of(n) for n in test.ids]
    assert sorted(set(test.labels.tolist())) == [0, 7, 30]
    row = test.ids.tolist().index("yt09x7_45")
    np.testing.assert_array_equal(
        test.columns["audio"].gather(np.array([row]))[0], fbank_clip(tree / "audios/yt09x7_45.wav")
    )
    red = test.columns["visual"].gather(np.array([row]))[0, 0, :, 8, 8].astype(int)
    # 5 of 9 frames: ⌊(k + 0.5)·9/5⌋ = 0, 2, 4, 6, 8 (segment centres), red 25·file
    np.testing.assert_allclose(red, [0, 50, 100, 150, 200], atol=4)


def test_ogm_ge_lists_and_a_headerless_midas_list_give_the_same_clips(tree: Path, tmp_path: Path):
    reference = tmp_path / "ref"
    assert build(tree, reference, "--split", "official") == EXIT_OK
    ogm = write_tree(tmp_path / "ogm", lists="ogm")
    assert build(ogm, tmp_path / "ogm-data", "--split", "official") == EXIT_OK
    assert split_ids(built(tmp_path / "ogm-data")) == split_ids(built(reference))
    bare = tmp_path / "bare"
    write_media(bare)
    write_midas_lists(bare, header=False)  # the first row is a clip: kept, not taken for a header
    assert build(bare, tmp_path / "bare-data", "--split", "official") == EXIT_OK
    assert split_ids(built(tmp_path / "bare-data")) == split_ids(built(reference))


def test_midas70_pools_both_lists_stratified_and_reproducible(tree: Path, tmp_path: Path):
    runs = {}
    for name, seed in (("a", 2), ("b", 2), ("c", 5)):
        assert build(tree, tmp_path / name, "--split-seed", str(seed)) == EXIT_OK
        runs[name] = split_ids(built(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert set(runs["a"]["test"]) != set(runs["c"]["test"])
    for ids in (runs["a"], runs["c"]):
        assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(names())
        for split, per_class in (("train", 7), ("val", 1), ("test", 2)):
            labels = [label_of(n) for n in ids[split]]
            assert [labels.count(k) for k in LABELS] == [per_class] * 3, split


def test_a_classes_file_names_the_31_labels(tree: Path, tmp_path: Path, capsys):
    classes = tmp_path / "classes.txt"
    names31 = [f"class {k:02d}" for k in range(31)]
    classes.write_text("\n".join(names31) + "\n\n")  # a trailing blank line is skipped
    assert build(tree, tmp_path / "data", options=(f"classes_file={classes}",)) == EXIT_OK
    assert built(tmp_path / "data").manifest.classes == names31
    classes.write_text("\n".join(names31[:30]) + "\n")
    assert build(tree, tmp_path / "other", options=(f"classes_file={classes}",)) == EXIT_USAGE
    assert f"{classes}: lists 30 class names, expected 31" in capsys.readouterr().err


def test_missing_files_and_bad_rows_are_named_before_any_decoding(tmp_path: Path, capsys):
    raw = write_tree(tmp_path / "raw")
    root = tmp_path / "data"
    wav = raw / "audios/yt03x30_15.wav"
    wav.rename(tmp_path / "aside.wav")
    assert build(raw, root) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{wav}: not found; expected layout" in err and "<raw>/audios/<name>.wav" in err
    (tmp_path / "aside.wav").rename(wav)
    folder = raw / "videos/yt05x0_25"
    folder.rename(tmp_path / "aside")
    assert build(raw, root) == EXIT_USAGE
    assert f"{folder}: folder not found" in capsys.readouterr().err
    (tmp_path / "aside").rename(folder)
    train = raw / "videos/train.txt"
    lines = train.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 31"  # line 4: the third clip, label 31
    train.write_text("\n".join(lines) + "\n")
    assert build(raw, root) == EXIT_USAGE
    assert f"{train}, line 4: label '31' is not an integer in 0..30" in capsys.readouterr().err
    assert not root.exists()  # nothing was decoded


def test_corrupt_files_stop_the_build_or_are_skipped_and_listed(tmp_path: Path, capsys):
    raw = write_tree(tmp_path / "raw")
    bad_wav, bad_jpg = raw / "audios/yt02x7_10.wav", raw / "videos/yt04x30_20/frame_00003.jpg"
    bad_wav.write_bytes(b"RIFF but nothing else")
    bad_jpg.write_bytes(b"not a jpeg")
    assert build(raw, tmp_path / "strict") == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"decoding item {names().index('yt02x7_10')} (yt02x7_10" in err
    assert f"{bad_wav}: not a readable audio file" in err
    assert build(raw, tmp_path / "lenient", "--skip-bad", "--split", "official") == EXIT_OK
    dataset = built(tmp_path / "lenient")
    skipped = dataset.manifest.build_options["skipped"]
    assert [s["item"] for s in skipped] == [
        f"yt02x7_10 ({bad_wav})",
        f"yt04x30_20 ({raw / 'audios/yt04x30_20.wav'})",
    ]
    assert skipped[0]["reason"].startswith(f"{bad_wav}: not a readable audio file")
    assert skipped[1]["reason"].startswith(f"{bad_jpg}: not a readable image")
    ids = [i for split in split_ids(dataset).values() for i in split]
    assert len(ids) == 28 and not {"yt02x7_10", "yt04x30_20"} & set(ids)


def test_an_interrupted_build_resumes_from_its_shards(tree: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ks, "SHARD_SIZE", 10)  # shards of items 0-9, 10-19, 20-29
    calls = []

    def counting(path: Path, frames: int) -> np.ndarray:
        calls.append(path)
        if len(calls) == 15:  # item 14, in shard 1
            raise KeyboardInterrupt
        return fbank_clip(path, frames)

    monkeypatch.setattr(cremad, "fbank_clip", counting)  # the clip decoding kinetics_sounds shares
    assert build(tree, tmp_path / "data") == EXIT_INTERRUPTED
    assert len(list((tmp_path / "data").glob(".*.build/shard-*"))) == 1
    assert build(tree, tmp_path / "data") == EXIT_OK
    assert len(calls) == 15 + 20  # the rerun decodes shards 1 and 2 only
    assert build(tree, tmp_path / "fresh") == EXIT_OK
    assert (
        built(tmp_path / "data").manifest.content_sha256 == built(tmp_path / "fresh").manifest.content_sha256
    )


def test_the_preset_transforms_fit_the_default_stored_shapes():
    cfg = load_config("kinetics_sounds")
    stored = {
        "audio": ModalitySpec(dtype="float16", shape=(1024, 128)),
        "visual": ModalitySpec(dtype="uint8", shape=(3, ks.KineticsSoundsOptions(raw=".").frames, 224, 224)),
    }
    pipelines = ModalityPipelines({m: t.model_dump() for m, t in cfg.data.transforms.items()}, stored)
    assert stored["visual"].shape == (3, 10, 224, 224)
    assert (
        pipelines.specs["visual"].shape == (3, 3, 224, 224) and pipelines.specs["visual"].dtype == "float32"
    )
    assert pipelines.describe()["visual"]["train"] == ["frames", "random_resized_crop", "hflip", "normalize"]
    assert pipelines.describe()["visual"]["eval"] == ["frames", "resize", "normalize"]
    assert "audio" not in cfg.data.transforms


def test_the_preset_trains_on_the_built_fixture(tree: Path, tmp_path: Path):
    from midasbench.harness.training.trainer import train

    root = tmp_path / "data"
    assert build(tree, root, options=("audio_frames=64",)) == EXIT_OK
    (directory,) = list(root.iterdir())
    visual = {
        "train": [
            {"name": "frames", "params": {"num": 3}},
            {"name": "random_resized_crop", "params": {"size": SIZE}},
            {"name": "hflip"},
        ],
        "eval": [
            {"name": "frames", "params": {"num": 3, "mode": "center"}},
            {"name": "resize", "params": {"size": SIZE}},
        ],
        "normalize": {"preset": "imagenet"},
    }
    cfg = load_config(
        "kinetics_sounds",
        [
            f"data.root={root}",
            f"data.options={json.dumps({'raw': str(tree), **FAST})}",
            f"data.transforms={json.dumps({'visual': visual})}",
            *short_run(tmp_path / "ckpt"),
        ],
    )
    result = train(cfg)
    assert np.isfinite(result.history[-1]["train/loss"])
    assert np.isfinite(result.test["acc"])
    assert list(root.iterdir()) == [directory]  # the CLI's build is reused (same options), not rebuilt
