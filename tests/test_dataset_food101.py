"""food101: the MIDAS jsonl and BalanceBenchmark csv layouts built through the CLI on a fixture tree
of tiny JPGs and real-format list files, both split protocols, missing and corrupt files, resuming,
and a few training steps of the preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import short_run, tiny_tokenizer, write_jpg

from midasbench.datasets import ArrowDataset, food101, image_text
from midasbench.datasets.raw.text import TOKENIZER_KEY
from midasbench.harness.cli import main

CLASSES = ["pizza", "sushi", "waffles"]
WORDS = [*CLASSES, "recipe", "with", "cheese"]  # ids 5, 6, 7, 8, 9, 10
PER_CLASS = {"train": 8, "test": 3}  # 33 rows: 24 train, 9 test
SIZE, MAX_LEN = 16, 16


def sample_text(label: int, k: int) -> str:
    """A retweet with a hashtag and a URL; every third sample adds "with cheese"."""
    extra = " with cheese" if k % 3 == 0 else ""
    return f"RT #{CLASSES[label]} recipe{extra} http://t.co/x{k}"


def color(split: str, label: int, k: int) -> tuple[int, int, int]:
    return (20 + 60 * label, 40 + 20 * k, 200 if split == "train" else 100)


def write_jsonl_tree(root: Path) -> Path:
    """MIDAS layout: {train,test}.jsonl with integer labels, images/<split>/<img>, a classes file."""
    for split, count in PER_CLASS.items():
        lines = []
        for label in range(len(CLASSES)):
            for k in range(count):
                img = f"{CLASSES[label]}/{split}_{label}_{k}.jpg"
                write_jpg(root / "images" / split / img, color(split, label, k), size=(20, 18))
                record = {
                    "id": f"{split}_{label}_{k}",
                    "img": img,
                    "text": sample_text(label, k),
                    "label": label,
                }
                lines.append(json.dumps(record))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tiny"
    tiny_tokenizer(folder, WORDS)
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl_tree(tmp_path_factory.mktemp("raw") / "food")


def options(tree: Path, tokenizer_dir: Path) -> list[str]:
    return [
        f"tokenizer_name={tokenizer_dir}",
        f"max_length={MAX_LEN}",
        f"image_size={SIZE}",
        "val_count=3",
        f"classes_file={tree / 'classes.txt'}",
    ]


def build(tree: Path, root: Path, tokenizer_dir: Path, *extra: str) -> int:
    """``midasbench data build food101 OPTIONS --raw TREE --root ROOT --workers 1 EXTRA``."""
    head = ["data", "build", "food101", *options(tree, tokenizer_dir)]
    return main([*head, "--raw", str(tree), "--root", str(root), "--workers", "1", *extra])


def built(root: Path, split: str) -> ArrowDataset:
    (path,) = [p for p in root.glob(f"food101-{split}*") if p.is_dir()]
    dataset = ArrowDataset(path)
    dataset.verify()
    return dataset


@pytest.fixture(scope="module")
def official(tree: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ArrowDataset:
    root = tmp_path_factory.mktemp("official")
    assert build(tree, root, tokenizer_dir, "--split", "official") == 0
    return built(root, "official")


def test_official_split_keeps_test_and_cuts_a_stratified_val_from_train(official: ArrowDataset):
    manifest = official.manifest
    assert manifest.classes == CLASSES
    assert {s: info.rows for s, info in manifest.splits.items()} == {"train": 21, "val": 3, "test": 9}
    test = official.split("test")
    assert sorted(test.ids) == sorted(f"test_{label}_{k}" for label in range(3) for k in range(3))
    val = official.split("val")
    assert sorted(val.labels.tolist()) == [0, 1, 2]  # stratified: one of each class
    assert all(sample_id.startswith("train_") for sample_id in val.ids)
    for split in ("train", "val", "test"):
        data = official.split(split)
        assert data.labels.tolist() == [int(sample_id.split("_")[1]) for sample_id in data.ids]


def test_stored_shapes_dtypes_tokens_and_pixels(official: ArrowDataset, tree: Path, tokenizer_dir: Path):
    specs = official.manifest.modalities
    assert list(specs) == ["text", "visual"]  # the MIDAS code's (text, image) order
    assert (specs["text"].dtype, specs["text"].shape, specs["text"].variable_length) == ("int32", (16,), True)
    assert (specs["visual"].dtype, specs["visual"].shape) == ("uint8", (3, SIZE, SIZE))
    test = official.split("test")
    row = list(test.ids).index("test_1_0")  # "RT #sushi recipe with cheese http://t.co/x0"
    ids = test.columns["text"].to_numpy()[row]
    # "sushi recipe with cheese": [CLS]=2 sushi=6 recipe=8 with=9 cheese=10 [SEP]=3, then [PAD]=0
    assert ids.tolist() == [2, 6, 8, 9, 10, 3] + [0] * 10
    assert test.lengths["text"][row] == 6
    row = list(test.ids).index("test_2_1")  # "waffles recipe": [CLS] 7 8 [SEP]
    assert test.columns["text"].to_numpy()[row, :5].tolist() == [2, 7, 8, 3, 0]
    assert test.lengths["text"][row] == 4
    pixels = test.columns["visual"].to_numpy()[row]
    assert np.abs(pixels.reshape(3, -1).mean(axis=1) - np.array(color("test", 2, 1))).max() < 3
    identity = official.manifest.build_options[TOKENIZER_KEY]["text"]
    assert identity["name"] == str(tokenizer_dir) and identity["max_length"] == MAX_LEN
    assert identity["pad_token_id"] == 0 and official.manifest.build_options["layout_read"] == "jsonl"


def test_text_clean_up_drops_a_leading_rt_urls_and_hashes():
    assert food101.clean_text("RT #Pizza  night https://t.co/abc www.x.org/y !") == "Pizza night !"
    assert food101.clean_text("ART of #sushi") == "ART of sushi"  # only a leading "RT" word


def test_midas70_is_stratified_reproducible_and_seeded(tree: Path, tokenizer_dir: Path, tmp_path: Path):
    ids = {}
    for seed in (2, 2, 5):
        root = tmp_path / f"s{seed}-{len(ids)}"
        assert build(tree, root, tokenizer_dir, "--split", "midas70", "--split-seed", str(seed)) == 0
        dataset = built(root, "midas70")
        # 33 rows: 30 % = 10 held out (3 val, 7 test), 23 train; every class in every split
        assert {s: info.rows for s, info in dataset.manifest.splits.items()} == {
            "train": 23,
            "val": 3,
            "test": 7,
        }
        assert all(set(dataset.split(s).labels.tolist()) == {0, 1, 2} for s in ("train", "val", "test"))
        ids[len(ids)] = {s: sorted(dataset.split(s).ids) for s in ("train", "val", "test")}
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


@pytest.mark.parametrize("missing", ["images/test/sushi/test_1_2.jpg", "test.jsonl"])
def test_a_missing_file_is_named_with_exit_code_2(
    tree: Path, tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
):
    copy = write_jsonl_tree(tmp_path / "raw")
    (copy / missing).unlink()
    assert build(copy, tmp_path / "data", tokenizer_dir) == 2
    err = capsys.readouterr().err
    assert f"{copy / missing}: not found; expected layout" in err


def test_a_corrupt_image_fails_naming_it_and_skip_bad_lists_it(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    copy = write_jsonl_tree(tmp_path / "raw")
    bad = copy / "images" / "train" / "pizza" / "train_0_4.jpg"
    bad.write_bytes(b"not a jpeg at all")
    assert build(copy, tmp_path / "data", tokenizer_dir, "--split", "official") == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable image" in err and "sample train_0_4" in err
    assert build(copy, tmp_path / "data", tokenizer_dir, "--split", "official", "--skip-bad") == 0
    dataset = built(tmp_path / "data", "official")
    assert sum(info.rows for info in dataset.manifest.splits.values()) == 32
    (skipped,) = dataset.manifest.build_options["skipped"]
    assert str(bad) in skipped["item"] and "not a readable image" in skipped["reason"]
    assert "train_0_4" not in {i for s in ("train", "val", "test") for i in dataset.split(s).ids}


def test_an_interrupted_build_resumes_from_its_shards(
    tree: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    calls: list[int] = []
    real = image_text.decode_image_text

    def interrupting(items, options):
        calls.append(len(items))
        if len(calls) == 2 and not (tmp_path / "interrupted").exists():
            (tmp_path / "interrupted").touch()
            raise KeyboardInterrupt
        return real(items, options)

    monkeypatch.setattr(food101, "SHARD_SIZE", 8)  # 33 items: 5 shards
    monkeypatch.setattr(image_text, "decode_image_text", interrupting)  # what the source decodes with
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 130
    calls.clear()
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 0
    assert calls == [8, 8, 8, 1]  # shard 0 was kept; only shards 1-4 are decoded again
    assert sum(info.rows for info in built(tmp_path / "data", "official").manifest.splits.values()) == 33


def write_csv_tree(root: Path) -> Path:
    """BalanceBenchmark layout: texts/{train,test}_titles.csv (header, class-name labels) and
    images/<split>/<class>/<file>."""
    (root / "texts").mkdir(parents=True)
    for split, count in (("train", 5), ("test", 2)):
        rows = ["Image_path,text,label"]
        for label, name in enumerate(CLASSES):
            for k in range(count):
                write_jpg(root / "images" / split / name / f"{name}_{split}{k}.jpg", color(split, label, k))
                rows.append(f'{name}_{split}{k}.jpg,"#{name}, recipe",{name}')
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_balancebenchmark_csv_layout(tokenizer_dir: Path, tmp_path: Path):
    tree = write_csv_tree(tmp_path / "raw")
    settings = [f"tokenizer_name={tokenizer_dir}", "max_length=8", "image_size=8", "val_count=3"]
    flags = ["--raw", str(tree), "--root", str(tmp_path / "d"), "--workers", "1", "--split", "official"]
    assert main(["data", "build", "food101", *settings, *flags]) == 0
    dataset = built(tmp_path / "d", "official")
    assert dataset.manifest.classes == CLASSES  # sorted folder names under images/train
    assert dataset.manifest.build_options["layout_read"] == "csv"
    test = dataset.split("test")
    assert sorted(test.ids) == sorted(f"{n}_test{k}" for n in CLASSES for k in range(2))
    row = list(test.ids).index("waffles_test1")
    assert test.labels[row] == 2
    assert test.columns["text"].to_numpy()[row, :5].tolist() == [2, 7, 1, 8, 3]  # "waffles , recipe"
    assert test.columns["visual"].to_numpy().shape == (6, 3, 8, 8)


def test_the_preset_trains_a_few_steps_on_the_built_fixture(
    official: ArrowDataset, tree: Path, tmp_path: Path
):
    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import train

    build_options = {
        k: v for k, v in official.manifest.build_options.items() if k in food101.Food101Options.model_fields
    }
    root = official.directory.parent
    tiny_text = (
        "{name: hf_text, params: {config: {model_type: electra, vocab_size: 11, hidden_size: 16, "
        "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32, embedding_size: 16, "
        "max_position_embeddings: 64}}}"
    )
    resize = f"{{name: resize, params: {{size: {SIZE}}}}}"
    cfg = load_config(
        "food101",
        [
            f"data.root={root}",
            "data.split=official",
            f"data.options={json.dumps(build_options)}",
            f"model.encoders.text={tiny_text}",
            "model.encoders.visual={name: resnet18}",  # the preset's ImageNet weights need internet
            f"data.transforms.visual.train=[{resize}, {{name: hflip}}]",
            f"data.transforms.visual.eval=[{resize}]",
            *short_run(tmp_path / "ckpt"),
        ],
    )
    result = train(cfg)
    assert np.isfinite(result.history[-1]["train/loss"])
    assert np.isfinite(result.test["acc"])
    assert [p for p in root.iterdir() if p.name.startswith("food101-")] == [
        official.directory
    ]  # reused, not rebuilt
