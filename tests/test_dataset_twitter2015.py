"""twitter2015: TomBERT's TSVs and images built through the CLI on a fixture tree, $T$ restored and the
target as the pair's second sentence (token ids + segment ids), both split protocols, missing and
corrupt files, resuming, and a few training steps of the preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import short_run, tiny_tokenizer, write_jpg

from midasbench.datasets import ArrowDataset, image_text, twitter2015
from midasbench.datasets.raw.text import TOKENIZER_KEY
from midasbench.harness.cli import main

WORDS = ["great", "bad", "ok", "obama", "nba", "is", "today"]  # ids 5..11
SIZE, MAX_LEN = 16, 12
PER_CLASS = {"train": 5, "dev": 2, "test": 3}  # 30 rows
HEADERS = {
    "train": "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String",
    "dev": "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String",
    "test": "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String.1",  # the test header differs
}
TWEETS = ["$T$ is bad", "$T$ is ok today", "$T$ is great today"]


def rows_of(stem: str) -> list[tuple[str, int, str, str, str]]:
    """``(index, label, image, tweet, target)`` rows; rows 2k and 2k+1 of a file share one tweet image
    with different targets, as TomBERT's data repeats a tweet per target."""
    rows = []
    for label in range(3):
        for k in range(PER_CLASS[stem]):
            index = len(rows)
            image = f"{stem}{index // 2}.jpg"
            rows.append((str(index), label, image, TWEETS[label], ["obama", "nba"][k % 2]))
    return rows


def write_tree(root: Path) -> Path:
    for stem, header in HEADERS.items():
        lines = [header] + ["\t".join(str(field) for field in row) for row in rows_of(stem)]
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{stem}.tsv").write_text("\n".join(lines) + "\n")
        for _, label, image, _, _ in rows_of(stem):
            write_jpg(root / "twitter15_images" / image, (40 + 80 * label, 60, 120))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tiny"
    tiny_tokenizer(folder, WORDS)
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("raw") / "twitter2015")


def build(tree: Path, root: Path, tokenizer_dir: Path, *extra: str) -> int:
    settings = [f"tokenizer_name={tokenizer_dir}", f"max_length={MAX_LEN}", f"image_size={SIZE}"]
    flags = ["--raw", str(tree), "--root", str(root), "--workers", "1"]
    return main(["data", "build", "twitter2015", *settings, *flags, *extra])


def built(root: Path, split: str) -> ArrowDataset:
    (path,) = [p for p in root.glob(f"twitter2015-{split}*") if p.is_dir()]
    dataset = ArrowDataset(path)
    dataset.verify()
    return dataset


@pytest.fixture(scope="module")
def official(tree: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ArrowDataset:
    root = tmp_path_factory.mktemp("official")
    assert build(tree, root, tokenizer_dir, "--split", "official") == 0
    return built(root, "official")


def test_official_split_is_tomberts_train_dev_test(official: ArrowDataset):
    manifest = official.manifest
    assert manifest.classes == ["negative", "neutral", "positive"]
    assert {s: info.rows for s, info in manifest.splits.items()} == {"train": 15, "val": 6, "test": 9}
    for split, stem in (("train", "train"), ("val", "dev"), ("test", "test")):
        data = official.split(split)
        expected = {f"{stem}-{index}": label for index, label, *_ in rows_of(stem)}
        assert dict(zip(data.ids.tolist(), data.labels.tolist(), strict=True)) == expected


def test_the_pair_is_the_restored_tweet_and_its_target(official: ArrowDataset, tokenizer_dir: Path):
    specs = official.manifest.modalities
    assert list(specs) == ["text", "visual"]  # ids and segment ids side by side: (L, 2)
    assert (specs["text"].dtype, specs["text"].shape, specs["text"].variable_length) == (
        "int32",
        (12, 2),
        True,
    )
    assert (specs["visual"].dtype, specs["visual"].shape) == ("uint8", (3, SIZE, SIZE))
    test = official.split("test")
    row = list(test.ids).index("test-6")  # label 2, k 0: "$T$ is great today", target "obama"
    # [CLS] obama is great today [SEP] obama [SEP]: 2 8 10 5 11 3 8 3, then [PAD]
    assert test.columns["text"].to_numpy()[row, :, 0].tolist() == [2, 8, 10, 5, 11, 3, 8, 3, 0, 0, 0, 0]
    assert test.columns["text"].to_numpy()[row, :, 1].tolist() == [0] * 6 + [1, 1] + [0] * 4
    assert test.lengths["text"][row] == 8
    row = list(test.ids).index("test-1")  # label 0, k 1: "nba is bad" + "nba"
    assert test.columns["text"].to_numpy()[row, :7, 0].tolist() == [2, 9, 10, 6, 3, 9, 3]
    assert (
        np.abs(test.columns["visual"].to_numpy()[row].reshape(3, -1).mean(axis=1) - [40, 60, 120]).max() < 3
    )
    identity = official.manifest.build_options[TOKENIZER_KEY]
    assert list(identity) == ["text"] and identity["text"]["name"] == str(tokenizer_dir)


def test_restore_target_fills_every_mark():
    assert twitter2015.restore_target("$T$ vs $T$ !", "RT Obama") == "RT Obama vs RT Obama !"


def test_midas70_is_stratified_reproducible_and_seeded(tree: Path, tokenizer_dir: Path, tmp_path: Path):
    ids = []
    for run, seed in enumerate((2, 2, 3)):
        root = tmp_path / f"run{run}"
        assert build(tree, root, tokenizer_dir, "--split", "midas70", "--split-seed", str(seed)) == 0
        dataset = built(root, "midas70")
        # 30 rows, 10 a class: 9 held out (3 val, 6 test), 21 train; all classes everywhere
        assert {s: info.rows for s, info in dataset.manifest.splits.items()} == {
            "train": 21,
            "val": 3,
            "test": 6,
        }
        assert all(
            sorted(set(dataset.split(s).labels.tolist())) == [0, 1, 2] for s in ("train", "val", "test")
        )
        ids.append({s: sorted(dataset.split(s).ids) for s in ("train", "val", "test")})
    assert ids[0] == ids[1] and ids[0] != ids[2]


@pytest.mark.parametrize("missing", ["twitter15_images/dev1.jpg", "dev.tsv"])
def test_a_missing_file_is_named_with_exit_code_2(tokenizer_dir: Path, tmp_path: Path, capsys, missing: str):
    tree = write_tree(tmp_path / "raw")
    (tree / missing).unlink()
    assert build(tree, tmp_path / "data", tokenizer_dir) == 2
    assert f"{tree / missing}: not found; expected layout" in capsys.readouterr().err


def test_a_malformed_row_is_named(tokenizer_dir: Path, tmp_path: Path, capsys):
    tree = write_tree(tmp_path / "raw")
    with (tree / "test.tsv").open("a") as handle:
        handle.write("9\t1\ttest0.jpg\tno mark here\tobama\n")
    assert build(tree, tmp_path / "data", tokenizer_dir) == 2
    assert f"{tree / 'test.tsv'}:11: the tweet holds no $T$" in capsys.readouterr().err


def test_a_corrupt_image_fails_naming_it_and_skip_bad_lists_it(tokenizer_dir: Path, tmp_path: Path, capsys):
    tree = write_tree(tmp_path / "raw")
    bad = tree / "twitter15_images" / "test2.jpg"  # rows test-4 and test-5
    bad.write_bytes(b"GIF89a garbage")
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 2
    assert f"{bad}: not a readable image" in capsys.readouterr().err
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official", "--skip-bad") == 0
    dataset = built(tmp_path / "data", "official")
    assert sorted(set(f"test-{i}" for i in range(9)) - set(dataset.split("test").ids)) == ["test-4", "test-5"]
    skipped = dataset.manifest.build_options["skipped"]
    assert [str(bad) in s["item"] for s in skipped] == [True, True]
    assert ["sample test-4" in skipped[0]["item"], "sample test-5" in skipped[1]["item"]] == [True, True]


def test_an_interrupted_build_resumes_from_its_shards(
    tree: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch
):
    calls: list[int] = []
    interrupted: list[bool] = []
    real = image_text.decode_image_text

    def interrupting(items, options):
        calls.append(len(items))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(items, options)

    monkeypatch.setattr(twitter2015, "SHARD_SIZE", 8)  # 30 rows: 8, 8, 8, 6
    monkeypatch.setattr(image_text, "decode_image_text", interrupting)  # what the source decodes with
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 130
    calls.clear()
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 0
    assert calls == [8, 8, 6]  # shard 0 was kept
    assert sum(info.rows for info in built(tmp_path / "data", "official").manifest.splits.values()) == 30


def tiny_hf_text(vocab_size: int) -> str:
    """A tiny randomly initialised ELECTRA (no download) as an ``hf_text`` encoder override."""
    config = {
        "model_type": "electra",
        "vocab_size": vocab_size,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "embedding_size": 16,
        "max_position_embeddings": 64,
    }
    return json.dumps({"name": "hf_text", "params": {"config": config}})


def test_the_preset_trains_a_few_steps_on_the_built_fixture(official: ArrowDataset, tmp_path: Path):
    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import train

    fields = twitter2015.Twitter2015Options.model_fields
    build_options = {k: v for k, v in official.manifest.build_options.items() if k in fields}
    root = official.directory.parent
    resize = f"{{name: resize, params: {{size: {SIZE}}}}}"
    cfg = load_config(
        "twitter2015",
        [
            f"data.root={root}",
            "data.split=official",
            f"data.options={json.dumps(build_options)}",
            f"model.encoders.text={tiny_hf_text(12)}",
            "model.encoders.visual={name: resnet18}",  # the preset's ImageNet weights need internet
            f"data.transforms.visual.train=[{resize}, {{name: hflip}}]",
            f"data.transforms.visual.eval=[{resize}]",
            *short_run(tmp_path / "ckpt"),
        ],
    )
    result = train(cfg)
    assert np.isfinite(result.history[-1]["train/loss"]) and np.isfinite(result.test["acc"])
    assert [p for p in root.iterdir() if p.name.startswith("twitter2015-")] == [official.directory]
