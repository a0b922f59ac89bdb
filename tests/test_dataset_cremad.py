"""The ``cremad`` builder on a fixture tree in CREMA-D's real on-disk form: ``AudioWAV/<clip>.wav``, OGM-GE's
``Image-01-FPS/<clip>/*.jpg`` frame folders or ``VideoFlash/<clip>.flv`` videos, and OGM-GE's ``train.csv``
/ ``test.csv`` (no header, a BOM on train.csv). 30 clips: 10 each of ANG, HAP and SAD; every build goes
through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import short_run, write_jpg, write_wav

from midasbench.datasets import ArrowDataset, cremad
from midasbench.datasets.format import ModalitySpec
from midasbench.datasets.raw.audio import fbank_clip
from midasbench.datasets.transforms import ModalityPipelines
from midasbench.harness.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from midasbench.harness.config import load_config

EMOTIONS = ("ANG", "HAP", "SAD")  # labels 0, 3 and 5 of ANG, DIS, FEA, HAP, NEU, SAD
PER_CLASS, TRAIN_PER_CLASS = 10, 8
FRAMES, SIZE = 4, 16  # stored frames a clip, stored height and width
FAST = {"frames": FRAMES, "image_size": SIZE, "audio_frames": 64}  # a training test in seconds


def clip_ids() -> list[str]:
    """``<actor>_<sentence>_<EMO>_<level>``, class-interleaved (the order the lists give them in)."""
    return [f"{1001 + i}_DFA_{emo}_XX" for i in range(PER_CLASS) for emo in EMOTIONS]


def frame_count(clip: str) -> int:
    return 2 + int(clip[:4]) % 4  # 2..5 frames a clip


def write_clip_frames(folder: Path, count: int) -> None:
    """Frame ``k`` is a flat colour with red ``40·k`` (so a stored frame tells which file it came from)."""
    for k in range(count):
        write_jpg(folder / f"{k + 1:05d}.jpg", color=(40 * k, 100, 200), size=(20, 16))


def write_flv(path: Path, frames: int = 8, size: int = 32) -> None:
    """A Flash video (FLV1 codec, as CREMA-D's VideoFlash) whose frame ``k`` is a flat grey of ``25·k``."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flv", rate=5)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for k in range(frames):
            image = np.full((size, size, 3), 25 * k, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_tree(root: Path, *, visual: str = "frames", lists: bool = True) -> Path:
    for n, clip in enumerate(clip_ids()):
        write_wav(root / "AudioWAV" / f"{clip}.wav", seconds=0.3, freq=300.0 + 50 * n, seed=n)
        if visual == "frames":
            write_clip_frames(root / "Image-01-FPS" / clip, frame_count(clip))
        else:
            write_flv(root / "VideoFlash" / f"{clip}.flv")
    if lists:
        rows = [f"{clip},{clip.split('_')[2]}" for clip in clip_ids()]
        train, test = rows[: TRAIN_PER_CLASS * 3], rows[TRAIN_PER_CLASS * 3 :]
        (root / "train.csv").write_text("\ufeff" + "\n".join(train) + "\n", encoding="utf-8")
        (root / "test.csv").write_text("\n".join(test) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("cremad") / "raw")


def build(raw: Path, root: Path, *flags: str, options: tuple[str, ...] = ()) -> int:
    """``midasbench data build cremad`` with the fixture's frame settings plus ``options`` and ``flags``."""
    options = (f"frames={FRAMES}", f"image_size={SIZE}", *options)
    common = ("--raw", str(raw), "--root", str(root), "--workers", "1", "--no-progress")
    return main(["data", "build", "cremad", *options, *common, *flags])


def built(root: Path) -> ArrowDataset:
    (directory,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return ArrowDataset(directory)


def split_ids(dataset: ArrowDataset) -> dict[str, list[str]]:
    return {s: dataset.split(s).ids.tolist() for s in ("train", "val", "test")}


def all_ids(dataset: ArrowDataset) -> list[str]:
    return [i for ids in split_ids(dataset).values() for i in ids]


def test_official_split_is_ogm_ge_lists_with_a_stratified_val_cut(tree: Path, tmp_path: Path):
    assert build(tree, tmp_path / "data", "--split", "official") == EXIT_OK
    dataset = built(tmp_path / "data")
    dataset.verify()
    manifest = dataset.manifest
    assert manifest.classes == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert {k: v.rows for k, v in manifest.splits.items()} == {"train": 21, "val": 3, "test": 6}
    ids = split_ids(dataset)
    assert sorted(ids["test"]) == sorted(clip_ids()[24:])  # test.csv as it is
    assert sorted(ids["train"] + ids["val"]) == sorted(clip_ids()[:24])  # train.csv, val cut from it
    assert sorted(c.split("_")[2] for c in ids["val"]) == ["ANG", "HAP", "SAD"]  # stratified: one each
    assert manifest.modalities["audio"].dtype == "float16"
    assert manifest.modalities["audio"].shape == (1024, 128)
    assert manifest.modalities["visual"].dtype == "uint8"
    assert manifest.modalities["visual"].shape == (3, FRAMES, SIZE, SIZE)
    test = dataset.split("test")
    by_emotion = {"ANG": 0, "HAP": 3, "SAD": 5}
    assert test.labels.tolist() == [by_emotion[c.split("_")[2]] for c in test.ids]
    row = test.ids.tolist().index("1009_DFA_HAP_XX")  # 1009 % 4 = 1: 3 frames
    np.testing.assert_array_equal(
        test.columns["audio"].gather(np.array([row]))[0], fbank_clip(tree / "AudioWAV/1009_DFA_HAP_XX.wav")
    )
    red = test.columns["visual"].gather(np.array([row]))[0, 0, :, 8, 8].astype(int)
    # 4 frames spread over 3 files: ⌊(k + 0.5)·3/4⌋ = 0, 1, 1, 2 (segment centres), red 40·file
    np.testing.assert_allclose(red, [0, 40, 40, 80], atol=4)
    assert dataset.split("train").labels.dtype == np.int64


def test_midas70_is_stratified_and_reproducible_per_split_seed(tree: Path, tmp_path: Path):
    runs = {}
    for name, seed in (("a", 2), ("b", 2), ("c", 3)):
        assert build(tree, tmp_path / name, "--split-seed", str(seed)) == EXIT_OK
        runs[name] = split_ids(built(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert set(runs["a"]["train"]) != set(runs["c"]["train"])
    for ids in (runs["a"], runs["c"]):
        assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(clip_ids())  # train + test pooled
        for split, per_class in (("train", 7), ("val", 1), ("test", 2)):  # 70/10/20 of 10 per class
            emotions = [c.split("_")[2] for c in ids[split]]
            assert [emotions.count(e) for e in EMOTIONS] == [per_class] * 3, split


def test_a_classes_file_sets_the_label_order(tree: Path, tmp_path: Path, capsys):
    stat = tmp_path / "stat.csv"  # OGM-GE's stat.csv: BOM, one name a line
    stat.write_text("\ufeffNEU\nHAP\nSAD\nFEA\nDIS\nANG\n", encoding="utf-8")
    assert build(tree, tmp_path / "data", "--split", "official", options=(f"classes_file={stat}",)) == EXIT_OK
    dataset = built(tmp_path / "data")
    assert dataset.manifest.classes == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    test = dataset.split("test")
    assert test.labels.tolist() == [{"ANG": 5, "HAP": 1, "SAD": 2}[c.split("_")[2]] for c in test.ids]
    stat.write_text("NEU\nHAP\nSAD\nFEA\nDIS\n", encoding="utf-8")
    assert build(tree, tmp_path / "other", options=(f"classes_file={stat}",)) == EXIT_USAGE
    assert f"{stat}: class names" in capsys.readouterr().err


def test_without_lists_every_clip_is_pooled_and_only_midas70_applies(tmp_path: Path, capsys):
    raw = tmp_path / "raw"
    write_tree(raw, lists=False)
    with pytest.warns(UserWarning, match="no OGM-GE split lists .* only --split midas70 applies"):
        assert build(raw, tmp_path / "data") == EXIT_OK
    assert sorted(all_ids(built(tmp_path / "data"))) == sorted(clip_ids())
    with pytest.warns(UserWarning, match="only --split midas70 applies"):
        assert build(raw, tmp_path / "data", "--split", "official") == EXIT_USAGE
    assert (
        "split 'official' needs the dataset's own split lists" in capsys.readouterr().err
    )  # before decoding
    (raw / "train.csv").write_text("1001_DFA_ANG_XX,ANG\n")  # a train list without its test list
    assert build(raw, tmp_path / "data2") == EXIT_USAGE
    assert f"{raw / 'test.csv'}: not found" in capsys.readouterr().err


def test_videos_are_decoded_when_there_are_no_frame_folders(tmp_path: Path):
    raw = write_tree(tmp_path / "raw", visual="video")
    assert build(raw, tmp_path / "data", "--split", "official") == EXIT_OK
    dataset = built(tmp_path / "data")
    assert dataset.manifest.modalities["visual"].shape == (3, FRAMES, SIZE, SIZE)
    grey = dataset.split("test").columns["visual"].gather(np.array([0]))[0, :, :, 8, 8].astype(int)
    # 4 of 8 frames: ⌊(k + 0.5)·2⌋ = 1, 3, 5, 7, grey 25·k in every channel
    np.testing.assert_allclose(grey, [[25, 75, 125, 175]] * 3, atol=6)


def test_a_missing_file_is_named_before_any_decoding(tree: Path, tmp_path: Path, capsys):
    raw = tmp_path / "raw"
    write_tree(raw)
    (raw / "AudioWAV/1004_DFA_HAP_XX.wav").unlink()
    root = tmp_path / "data"
    assert build(raw, root) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{raw / 'AudioWAV/1004_DFA_HAP_XX.wav'}: not found; expected layout" in err
    assert "AudioWAV/<clip>.wav" in err
    assert not root.exists()  # nothing decoded, no work folder
    assert build(tree, root, options=("min_frames=3",)) == EXIT_USAGE  # the MIDAS filter: at least 3 frames
    assert f"{tree / 'Image-01-FPS/1004_DFA_ANG_XX'}: holds 2 frames, fewer than min_frames=3" in (
        capsys.readouterr().err
    )


def test_corrupt_files_stop_the_build_or_are_skipped_and_listed(tmp_path: Path, capsys):
    raw = write_tree(tmp_path / "raw")
    bad_wav = raw / "AudioWAV/1003_DFA_SAD_XX.wav"
    bad_wav.write_bytes(b"not a wav file at all")
    bad_jpg = raw / "Image-01-FPS/1006_DFA_ANG_XX/00002.jpg"
    bad_jpg.write_bytes(b"\xff\xd8 garbage")
    gone = raw / "AudioWAV/1008_DFA_HAP_XX.wav"
    gone.unlink()
    assert build(raw, tmp_path / "strict") == EXIT_USAGE  # the missing WAV, named up front
    assert f"{gone}: not found" in capsys.readouterr().err
    write_wav(gone, seconds=0.3)
    assert build(raw, tmp_path / "strict") == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"decoding item {clip_ids().index('1003_DFA_SAD_XX')} (1003_DFA_SAD_XX" in err
    assert f"{bad_wav}: not a readable audio file" in err
    gone.unlink()
    assert build(raw, tmp_path / "lenient", "--skip-bad", "--split", "official") == EXIT_OK
    dataset = built(tmp_path / "lenient")
    skipped = dataset.manifest.build_options["skipped"]
    assert [s["item"] for s in skipped] == [
        f"1003_DFA_SAD_XX ({bad_wav})",
        f"1006_DFA_ANG_XX ({raw / 'AudioWAV/1006_DFA_ANG_XX.wav'})",
        f"1008_DFA_HAP_XX ({gone})",
    ]
    assert skipped[0]["reason"].startswith(f"{bad_wav}: not a readable audio file")
    assert skipped[1]["reason"].startswith(f"{bad_jpg}: not a readable image")
    assert skipped[2]["reason"].startswith(f"{gone}: not found")
    ids = all_ids(dataset)
    assert dataset.manifest.splits["test"].rows == 6  # all three were train.csv clips
    assert len(ids) == 27 and not {"1003_DFA_SAD_XX", "1006_DFA_ANG_XX", "1008_DFA_HAP_XX"} & set(ids)


def test_an_interrupted_build_resumes_from_its_shards(tree: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(cremad, "SHARD_SIZE", 8)  # shards of items 0-7, 8-15, 16-23, 24-29
    calls = []

    def counting(path: Path, frames: int) -> np.ndarray:
        calls.append(path)
        if len(calls) == 20:  # item 19, in shard 2
            raise KeyboardInterrupt
        return fbank_clip(path, frames)

    monkeypatch.setattr(cremad, "fbank_clip", counting)
    assert build(tree, tmp_path / "data") == EXIT_INTERRUPTED
    assert build(tree, tmp_path / "data") == EXIT_OK
    assert len(calls) == 20 + 14  # the rerun decodes shards 2 and 3 only (items 16..29)
    assert build(tree, tmp_path / "fresh") == EXIT_OK
    assert (
        built(tmp_path / "data").manifest.content_sha256 == built(tmp_path / "fresh").manifest.content_sha256
    )


def test_the_preset_transforms_fit_the_default_stored_shapes():
    cfg = load_config("cremad")
    stored = {
        "audio": ModalitySpec(dtype="float16", shape=(1024, 128)),
        "visual": ModalitySpec(dtype="uint8", shape=(3, cremad.CremadOptions(raw=".").frames, 224, 224)),
    }
    pipelines = ModalityPipelines({m: t.model_dump() for m, t in cfg.data.transforms.items()}, stored)
    assert (
        pipelines.specs["visual"].shape == (3, 3, 224, 224) and pipelines.specs["visual"].dtype == "float32"
    )
    assert pipelines.describe()["visual"]["train"] == ["frames", "random_resized_crop", "hflip", "normalize"]
    assert pipelines.describe()["visual"]["eval"] == ["frames", "resize", "normalize"]
    assert "audio" not in cfg.data.transforms  # the fbank is used as stored


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
        "cremad",
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
