"""The ``ucf101`` builder on a fixture tree in UCF-101's real on-disk format: the official split-1 lists
(CRLF line ends, as released) or the MIDAS ``*_new.txt`` lists with a header, per-video RGB frame folders
(``img_0000{k}.jpg``) and u/v flow folders (``frame{m:05d}.jpg``), built through the CLI.

Every frame is a flat colour whose value encodes what it is, so stored pixels are checked by hand: RGB
frame ``k`` (0-based) of video ``j`` of class ``c`` is ``(40k, 20 + 60c, 30 + 10j)``; flow frame ``m`` is
``u = 20 + 25m``, ``v = 230 - 25m``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import short_run, write_gray_jpg, write_jpg

from midasbench.datasets import ArrowDataset
from midasbench.datasets import ucf101 as ucf
from midasbench.datasets.format import ModalitySpec
from midasbench.datasets.transforms import ModalityPipelines
from midasbench.harness.cli import main
from midasbench.harness.config import load_config

# classInd order; Python's sort (the field loaders') would put HammerThrow before Hammering
CLASSES = ["Haircut", "Hammering", "HammerThrow"]
TRAIN_GROUPS, TEST_GROUPS = range(8, 15), range(1, 4)  # 7 train and 3 test videos per class
RGB_FRAMES, FLOW_FRAMES, SIZE = 6, 8, 16
FLOW_PICKS = [0, 2, 3, 4, 6, 7]  # spread(8, 6): floor((k + 0.5) * 8 / 6) for k = 0..5


def video_id(name: str, group: int) -> str:
    return f"v_{name}_g{group:02d}_c01"


def videos(groups: range) -> list[tuple[str, str]]:
    """``(class name, video id)`` in list order (class-major, as the official lists)."""
    return [(name, video_id(name, g)) for name in CLASSES for g in groups]


def write_videos(root: Path) -> None:
    """Every video's RGB and flow frame folders (10 videos per class)."""
    for label, name in enumerate(CLASSES):
        for j, group in enumerate([*TEST_GROUPS, *TRAIN_GROUPS]):
            video = video_id(name, group)
            for k in range(RGB_FRAMES):
                write_jpg(
                    root / "frames_rgb" / video / f"img_{k + 1:05d}.jpg",
                    (40 * k, 20 + 60 * label, 30 + 10 * j),
                    (20, 15),
                )
            for m in range(FLOW_FRAMES):
                write_gray_jpg(root / "flows_u" / video / f"frame{m + 1:05d}.jpg", 20 + 25 * m, (20, 15))
                write_gray_jpg(root / "flows_v" / video / f"frame{m + 1:05d}.jpg", 230 - 25 * m, (20, 15))


def write_official_lists(folder: Path) -> None:
    """classInd.txt, trainlist01.txt (with the class index) and testlist01.txt, CRLF as released."""
    folder.mkdir(parents=True, exist_ok=True)
    crlf = "\r\n".join
    (folder / "classInd.txt").write_bytes(
        crlf(f"{i + 1} {n}" for i, n in enumerate(CLASSES)).encode() + b"\r\n"
    )
    train = [f"{n}/{v}.avi {CLASSES.index(n) + 1}" for n, v in videos(TRAIN_GROUPS)]
    (folder / "trainlist01.txt").write_bytes(crlf(train).encode() + b"\r\n")
    (folder / "testlist01.txt").write_bytes(crlf(f"{n}/{v}.avi" for n, v in videos(TEST_GROUPS)).encode())


def write_tree(root: Path) -> Path:
    write_official_lists(root / "ucfTrainTestlist")
    write_videos(root)
    return root


def cli(tree: Path, root: Path, *extra: str) -> list[str]:
    """``data build ucf101`` arguments: builder options (``KEY=VALUE``, ``size`` = ``SIZE`` first) after the
    name, flags after them; one worker."""
    options = [f"size={SIZE}", *(a for a in extra if "=" in a and not a.startswith("--"))]
    flags = [a for a in extra if a not in options]
    return [
        "data",
        "build",
        "ucf101",
        *options,
        "--raw",
        str(tree),
        "--root",
        str(root),
        "--workers",
        "1",
        *flags,
    ]


def build(tree: Path, root: Path, *extra: str) -> Path:
    """Build through the CLI; the one dataset directory under ``root``."""
    assert main(cli(tree, root, *extra)) == 0
    (directory,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return directory


def split_ids(directory: Path) -> dict[str, list[str]]:
    dataset = ArrowDataset(directory)
    return {s: dataset.split(s).ids.tolist() for s in ("train", "val", "test")}


def label_of(video: str) -> int:
    return CLASSES.index(video.split("_")[1])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("ucf") / "UCF-101")


@pytest.fixture(scope="module")
def official(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tree, tmp_path_factory.mktemp("official"), "--split", "official")


@pytest.fixture(scope="module")
def midas70(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tree, tmp_path_factory.mktemp("midas70"), "--split", "midas70", "--split-seed", "2")


def test_official_split_is_split_1_with_a_stratified_val_cut_from_train(official: Path):
    dataset = ArrowDataset(official)
    dataset.verify()
    manifest = dataset.manifest
    assert manifest.classes == CLASSES
    assert manifest.split_protocol == "official"
    assert {s: i.rows for s, i in manifest.splits.items()} == {"train": 18, "val": 3, "test": 9}
    ids = split_ids(official)
    assert ids["test"] == [v for _, v in videos(TEST_GROUPS)]  # the test list, in its order
    assert sorted(ids["train"] + ids["val"]) == sorted(v for _, v in videos(TRAIN_GROUPS))
    assert sorted(label_of(v) for v in ids["val"]) == [0, 1, 2]  # round(0.1 * 7) = 1 per class
    for split in ("train", "val", "test"):
        data = dataset.split(split)
        assert data.labels.tolist() == [label_of(v) for v in data.ids]
    assert dataset.split("test").labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert manifest.modalities["visual"].dtype == "uint8"
    assert manifest.modalities["visual"].shape == (3, RGB_FRAMES, SIZE, SIZE)
    assert manifest.modalities["flow"].dtype == "uint8"
    assert manifest.modalities["flow"].shape == (2, 6, SIZE, SIZE)
    assert manifest.build_options["split_lists"] == {"train": "trainlist01.txt", "test": "testlist01.txt"}


def test_stored_frames_and_flow_hold_the_raw_pixels(official: Path):
    test = ArrowDataset(official).split("test")
    visual, flow = test.columns["visual"].to_numpy(), test.columns["flow"].to_numpy()
    assert visual.shape == (9, 3, RGB_FRAMES, SIZE, SIZE) and flow.shape == (9, 2, 6, SIZE, SIZE)
    for row, video in enumerate(test.ids):
        j = int(video.split("_g")[1][:2]) - 1  # test groups 1..3 are the class's videos 0..2
        means = visual[row].astype(np.float64).mean(axis=(2, 3))  # (3 channels, 6 frames)
        np.testing.assert_allclose(means[0], [0, 40, 80, 120, 160, 200], atol=3)
        np.testing.assert_allclose(means[1], 20 + 60 * label_of(video), atol=3)
        np.testing.assert_allclose(means[2], 30 + 10 * j, atol=3)
        uv = flow[row].astype(np.float64).mean(axis=(2, 3))
        np.testing.assert_allclose(uv[0], [20 + 25 * m for m in FLOW_PICKS], atol=3)
        np.testing.assert_allclose(uv[1], [230 - 25 * m for m in FLOW_PICKS], atol=3)


def test_official_val_follows_its_seed(tree: Path, official: Path, tmp_path: Path):
    again = split_ids(build(tree, tmp_path / "again", "--split", "official"))
    other = split_ids(build(tree, tmp_path / "other", "--split", "official", "val_seed=5"))
    assert again == split_ids(official)
    assert other["val"] != again["val"] and other["test"] == again["test"]
    assert sorted(label_of(v) for v in other["val"]) == [0, 1, 2]


def test_midas70_is_stratified_and_reproducible_per_seed(tree: Path, midas70: Path, tmp_path: Path):
    ids = split_ids(midas70)
    assert {s: len(v) for s, v in ids.items()} == {"train": 21, "val": 3, "test": 6}
    for split, per_class in (("train", 7), ("val", 1), ("test", 2)):  # 10 videos a class: 7 / 1 / 2
        assert np.bincount([label_of(v) for v in ids[split]]).tolist() == [per_class] * 3
    pooled = [v for _, v in videos(TRAIN_GROUPS)] + [v for _, v in videos(TEST_GROUPS)]
    assert sorted(v for split in ids.values() for v in split) == sorted(pooled)
    assert split_ids(build(tree, tmp_path / "same", "--split-seed", "2")) == ids
    assert split_ids(build(tree, tmp_path / "seed3", "--split-seed", "3"))["test"] != ids["test"]


def test_midas_new_lists_with_a_header_and_other_folder_names(tree: Path, official: Path, tmp_path: Path):
    """The MIDAS layout: ``*_new.txt`` lists with a header row at the raw root; flow folders named as
    BalanceBenchmark's ``flow_path_u`` / ``flow_path_v`` (options)."""
    other = tmp_path / "midas_layout"
    other.mkdir()
    for source, target in (
        ("frames_rgb", "frames_rgb"),
        ("flows_u", "flow_path_u"),
        ("flows_v", "flow_path_v"),
    ):
        (other / target).symlink_to(tree / source, target_is_directory=True)
    (other / "classInd.txt").write_bytes((tree / "ucfTrainTestlist" / "classInd.txt").read_bytes())
    for name, groups in (("trainlist01_new.txt", TRAIN_GROUPS), ("testlist01_new.txt", TEST_GROUPS)):
        rows = ["path label"] + [f"{n}/{v}.avi {CLASSES.index(n)}" for n, v in videos(groups)]
        (other / name).write_text("\n".join(rows) + "\n")
    built = build(
        other,
        tmp_path / "d",
        "--split",
        "official",
        "lists_dir=.",
        "flow_u_dir=flow_path_u",
        "flow_v_dir=flow_path_v",
    )
    manifest = ArrowDataset(built).manifest
    assert manifest.build_options["split_lists"] == {
        "train": "trainlist01_new.txt",
        "test": "testlist01_new.txt",
    }
    assert split_ids(built) == split_ids(official)
    assert manifest.content_sha256 == ArrowDataset(official).manifest.content_sha256


def remove_folder(folder: Path) -> None:
    for frame in folder.iterdir():
        frame.unlink()
    folder.rmdir()


def test_a_missing_folder_or_list_is_named_with_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture):
    tree = write_tree(tmp_path / "raw")
    gone = tree / "flows_v" / video_id("Hammering", 9)
    remove_folder(gone)
    assert main(cli(tree, tmp_path / "d")) == 2
    err = capsys.readouterr().err
    assert f"{gone}: folder not found; expected layout" in err and "flows_u/v_ClassName_gXX_cYY/*.jpg" in err
    (tree / "ucfTrainTestlist" / "classInd.txt").unlink()
    assert main(cli(tree, tmp_path / "d")) == 2
    assert f"{tree / 'ucfTrainTestlist' / 'classInd.txt'}: not found" in capsys.readouterr().err
    assert not list((tmp_path / "d").glob(".*/shard-*"))  # nothing was decoded


def test_a_corrupt_jpg_fails_naming_it_and_skip_bad_lists_it(tmp_path: Path, capsys: pytest.CaptureFixture):
    tree = write_tree(tmp_path / "raw")
    bad = tree / "frames_rgb" / video_id("Haircut", 10) / "img_00003.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    assert main(cli(tree, tmp_path / "a", "--split", "official")) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable image" in err and f"video {video_id('Haircut', 10)}" in err
    gone = tree / "flows_u" / video_id("HammerThrow", 2)  # a test-list video
    remove_folder(gone)
    directory = build(tree, tmp_path / "b", "--split", "official", "--skip-bad")
    skipped = ArrowDataset(directory).manifest.build_options["skipped"]
    assert [s["item"].split()[1] for s in skipped] == [video_id("Haircut", 10), video_id("HammerThrow", 2)]
    assert f"{bad}: not a readable image" in skipped[0]["reason"]
    assert f"{gone}: frame folder not found" in skipped[1]["reason"]
    ids = split_ids(directory)
    assert sum(len(v) for v in ids.values()) == 28
    assert video_id("Haircut", 10) not in ids["train"] + ids["val"]
    assert video_id("HammerThrow", 2) not in ids["test"] and len(ids["test"]) == 8


def test_an_interrupted_build_resumes_from_its_shards(
    tree: Path, official: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ucf, "SHARD_SIZE", 8)  # shards of items 0-7, 8-15, 16-23, 24-29
    decode, calls = ucf.decode_videos, []

    def interrupting(items, options):
        calls.append(items[0].video)
        if len(calls) == 3 and not (tmp_path / "interrupted").exists():
            (tmp_path / "interrupted").touch()
            raise KeyboardInterrupt  # Ctrl-C while shard 2 decodes
        return decode(items, options)

    monkeypatch.setattr(ucf, "decode_videos", interrupting)
    args = cli(tree, tmp_path / "d", "--split", "official")
    assert main(args) == 130
    assert len(list((tmp_path / "d").glob(".*.build/shard-*"))) == 2
    calls.clear()
    assert main(args) == 0
    assert len(calls) == 2  # only shards 2 and 3 are decoded again
    (directory,) = [p for p in (tmp_path / "d").iterdir() if not p.name.startswith(".")]
    assert ArrowDataset(directory).manifest.content_sha256 == ArrowDataset(official).manifest.content_sha256


def test_the_preset_transforms_fit_the_default_stored_shapes():
    cfg = load_config("ucf101")
    pipelines = ModalityPipelines(
        {m: t.model_dump() for m, t in cfg.data.transforms.items()},
        {
            "visual": ModalitySpec(dtype="uint8", shape=(3, 6, 224, 224)),
            "flow": ModalitySpec(dtype="uint8", shape=(2, 6, 224, 224)),
        },
    )
    assert (
        pipelines.specs["visual"].shape == (3, 3, 224, 224) and pipelines.specs["visual"].dtype == "float32"
    )
    assert pipelines.specs["flow"].shape == (2, 3, 224, 224)
    assert pipelines.describe()["visual"]["train"] == ["frames", "resize", "hflip", "normalize"]
    flow_norm = cfg.data.transforms["flow"].normalize
    assert (flow_norm["mean"], flow_norm["std"]) == ([0.1307, 0.1307], [0.3081, 0.3081])  # MIDAS a_norm


def test_the_preset_trains_on_the_built_fixture(tree: Path, midas70: Path, tmp_path: Path):
    from midasbench.harness.training.trainer import train

    def sized(extra: list[dict]) -> dict:
        return {
            "train": [
                {"name": "frames", "params": {"num": 3}},
                {"name": "resize", "params": {"size": SIZE}},
                *extra,
            ],
            "eval": [
                {"name": "frames", "params": {"num": 3, "mode": "center"}},
                {"name": "resize", "params": {"size": SIZE}},
            ],
        }

    transforms = {
        "visual": {**sized([{"name": "hflip"}]), "normalize": {"preset": "imagenet"}},
        "flow": {**sized([]), "normalize": {"mean": [0.1307, 0.1307], "std": [0.3081, 0.3081]}},
    }
    cfg = load_config(
        "ucf101",
        [
            f"data.root={midas70.parent}",
            f"data.options={json.dumps({'raw': str(tree.resolve()), 'size': SIZE})}",
            f"data.transforms={json.dumps(transforms)}",
            *short_run(tmp_path / "ckpt"),
        ],
    )
    result = train(cfg)
    assert np.isfinite(result.history[-1]["train/loss"])
    assert np.isfinite(result.test["acc"])
    assert [p for p in midas70.parent.iterdir() if not p.name.startswith(".")] == [
        midas70
    ]  # reused, not rebuilt
