"""sarcasm: HFM's Python-literal text files and <tweet_id>.jpg images built through the CLI on a
fixture tree, the keyword filter, the last-element label, both split protocols, missing and corrupt
files, resuming, safe parsing, and a few training steps of the preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import short_run, tiny_tokenizer, write_jpg

from midasbench.datasets import ArrowDataset, image_text, sarcasm
from midasbench.datasets.raw.text import TOKENIZER_KEY
from midasbench.harness.cli import main

WORDS = ["love", "mondays", "great", "day", "cat", "photo"]  # ids 5..10
SIZE, MAX_LEN = 16, 12


def rows_of(split: str) -> list[list]:
    """HFM rows: train ``[id, text, label]``; valid2/test2 ``[id, text, hashtag_label, human_label]``
    with the label last (the hashtag label is made to disagree, so reading it would be caught). Rows
    that the keyword filter drops have no image."""
    base = {"train": 1000, "val": 2000, "test": 3000}[split]
    count = {"train": 6, "val": 2, "test": 2}[split]
    rows = []
    for label in (0, 1):
        for k in range(count):
            tweet_id = str(base + 10 * label + k)
            text = "love mondays" if label else "great cat photo"
            text += " day" * (k % 2)
            rows.append([tweet_id, text, label] if split == "train" else [tweet_id, text, 1 - label, label])
    if split == "train":
        rows += [["1900", "such sarcasm wow", 1], ["1901", "look <url>", 0]]
    if split == "val":
        rows.append(["2900", "pure irony", 1, 1])
    return rows


FILES = {"train": "train.txt", "val": "valid2.txt", "test": "test2.txt"}
FILTERED = {"1900", "1901", "2900"}


def write_tree(root: Path) -> Path:
    for split, name in FILES.items():
        rows = rows_of(split)
        (root / "text").mkdir(parents=True, exist_ok=True)
        (root / "text" / name).write_text("".join(repr(row) + "\n" for row in rows))
        for row in rows:
            if row[0] not in FILTERED:
                write_jpg(root / "images" / f"{row[0]}.jpg", (30 + 100 * row[-1], int(row[0]) % 200, 90))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tiny"
    tiny_tokenizer(folder, WORDS)
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("raw") / "sarcasm")


def build(tree: Path, root: Path, tokenizer_dir: Path, *extra: str) -> int:
    settings = [f"tokenizer_name={tokenizer_dir}", f"max_length={MAX_LEN}", f"image_size={SIZE}"]
    flags = ["--raw", str(tree), "--root", str(root), "--workers", "1"]
    return main(["data", "build", "sarcasm", *settings, *flags, *extra])


def built(root: Path, split: str) -> ArrowDataset:
    (path,) = [p for p in root.glob(f"sarcasm-{split}*") if p.is_dir()]
    dataset = ArrowDataset(path)
    dataset.verify()
    return dataset


@pytest.fixture(scope="module")
def official(tree: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ArrowDataset:
    root = tmp_path_factory.mktemp("official")
    assert build(tree, root, tokenizer_dir, "--split", "official") == 0
    return built(root, "official")


def test_official_split_is_hfms_files_after_the_keyword_filter(official: ArrowDataset):
    manifest = official.manifest
    assert manifest.classes == ["not_sarcastic", "sarcastic"]
    assert {s: info.rows for s, info in manifest.splits.items()} == {"train": 12, "val": 4, "test": 4}
    for split in ("train", "val", "test"):
        expected = {row[0]: row[-1] for row in rows_of(split) if row[0] not in FILTERED}
        data = official.split(split)
        # the label is the last element: valid2/test2's hashtag label (third) is the opposite
        assert dict(zip(data.ids.tolist(), data.labels.tolist(), strict=True)) == expected
    assert manifest.build_options["keyword_filtered_rows"] == {"train": 2, "val": 1, "test": 0}


def test_stored_shapes_dtypes_tokens_and_tokenizer_identity(official: ArrowDataset, tokenizer_dir: Path):
    specs = official.manifest.modalities
    assert (specs["text"].dtype, specs["text"].shape, specs["text"].variable_length) == ("int32", (12,), True)
    assert (specs["visual"].dtype, specs["visual"].shape) == ("uint8", (3, SIZE, SIZE))
    test = official.split("test")
    text = test.columns["text"].to_numpy()
    row = list(test.ids).index("3011")  # "love mondays day": [CLS] 5 6 8 [SEP]
    assert text[row].tolist() == [2, 5, 6, 8, 3] + [0] * 7 and test.lengths["text"][row] == 5
    row = list(test.ids).index("3000")  # "great cat photo": [CLS] 7 9 10 [SEP]
    assert text[row, :6].tolist() == [2, 7, 9, 10, 3, 0] and test.lengths["text"][row] == 5
    pixels = test.columns["visual"].to_numpy()[row]
    assert np.abs(pixels.reshape(3, -1).mean(axis=1) - np.array([30, 3000 % 200, 90])).max() < 3
    identity = official.manifest.build_options[TOKENIZER_KEY]["text"]
    assert identity["name"] == str(tokenizer_dir) and identity["max_length"] == MAX_LEN


def test_the_keyword_filter_matches_whole_tokens():
    assert not sarcasm.passes_filter("so #not ironic")
    assert not sarcasm.passes_filter("see <url> now")
    assert sarcasm.passes_filter("ironically sarcastically #sarcasm")  # no token is a keyword itself


def test_midas70_is_stratified_reproducible_and_seeded(tree: Path, tokenizer_dir: Path, tmp_path: Path):
    ids = []
    for run, seed in enumerate((2, 2, 7)):
        root = tmp_path / f"run{run}"
        assert build(tree, root, tokenizer_dir, "--split", "midas70", "--split-seed", str(seed)) == 0
        dataset = built(root, "midas70")
        # 20 posts, 10 a class: 6 held out (2 val, 4 test), 14 train; both classes everywhere
        assert {s: info.rows for s, info in dataset.manifest.splits.items()} == {
            "train": 14,
            "val": 2,
            "test": 4,
        }
        assert all(sorted(set(dataset.split(s).labels.tolist())) == [0, 1] for s in ("train", "val", "test"))
        ids.append({s: sorted(dataset.split(s).ids) for s in ("train", "val", "test")})
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_rows_are_parsed_as_literals_never_run(tokenizer_dir: Path, tmp_path: Path, capsys):
    tree = write_tree(tmp_path / "raw")
    marker = tmp_path / "ran"
    with (tree / "text" / "test2.txt").open("a") as handle:
        handle.write(f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    assert build(tree, tmp_path / "data", tokenizer_dir) == 2
    assert f"{tree / 'text' / 'test2.txt'}:5: not a Python list literal" in capsys.readouterr().err
    assert not marker.exists()
    (tree / "text" / "test2.txt").write_text("['3000', 'great day', 0, 2]\n")
    assert build(tree, tmp_path / "data", tokenizer_dir) == 2
    assert "test2.txt:1: the label (last element) is 2, expected 0 or 1" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["images/1003.jpg", "text/valid2.txt"])
def test_a_missing_file_is_named_with_exit_code_2(tokenizer_dir: Path, tmp_path: Path, capsys, missing: str):
    tree = write_tree(tmp_path / "raw")
    (tree / missing).unlink()
    assert build(tree, tmp_path / "data", tokenizer_dir) == 2
    assert f"{tree / missing}: not found; expected layout" in capsys.readouterr().err


def test_a_corrupt_image_fails_naming_it_and_skip_bad_lists_it(tokenizer_dir: Path, tmp_path: Path, capsys):
    tree = write_tree(tmp_path / "raw")
    bad = tree / "images" / "2010.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 2
    assert f"{bad}: not a readable image" in capsys.readouterr().err
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official", "--skip-bad") == 0
    dataset = built(tmp_path / "data", "official")
    assert dataset.manifest.splits["val"].rows == 3 and "2010" not in dataset.split("val").ids
    (skipped,) = dataset.manifest.build_options["skipped"]
    assert str(bad) in skipped["item"] and "not a readable image" in skipped["reason"]


def test_an_interrupted_build_resumes_from_its_shards(
    tree: Path, tokenizer_dir: Path, tmp_path: Path, monkeypatch
):
    calls: list[int] = []
    interrupted: list[bool] = []
    real = image_text.decode_image_text

    def interrupting(items, options):
        calls.append(len(items))
        if len(calls) == 3 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(items, options)

    monkeypatch.setattr(sarcasm, "SHARD_SIZE", 6)  # 20 posts: shards of 6, 6, 6, 2
    monkeypatch.setattr(image_text, "decode_image_text", interrupting)  # what the source decodes with
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 130
    calls.clear()
    assert build(tree, tmp_path / "data", tokenizer_dir, "--split", "official") == 0
    assert calls == [6, 2]  # shards 0 and 1 were kept
    assert sum(info.rows for info in built(tmp_path / "data", "official").manifest.splits.values()) == 20


def test_the_preset_trains_a_few_steps_on_the_built_fixture(official: ArrowDataset, tmp_path: Path):
    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import train

    fields = sarcasm.SarcasmOptions.model_fields
    build_options = {k: v for k, v in official.manifest.build_options.items() if k in fields}
    root = official.directory.parent
    tiny_text = (
        "{name: hf_text, params: {config: {model_type: electra, vocab_size: 11, hidden_size: 16, "
        "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32, embedding_size: 16, "
        "max_position_embeddings: 64}}}"
    )
    resize = f"{{name: resize, params: {{size: {SIZE}}}}}"
    cfg = load_config(
        "sarcasm",
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
    assert np.isfinite(result.history[-1]["train/loss"]) and np.isfinite(result.test["acc"])
    assert [p for p in root.iterdir() if p.name.startswith("sarcasm-")] == [official.directory]
