"""Variable-length modalities: a length per row in the canonical format, batches trimmed to their
longest row, lengths handed to the encoders through ``ModalityInputs``, and the errors that keep a
sequence from being read with its padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from midasbench.datasets.format import ArrowDataset, DatasetFormatError, SplitArrays, write_dataset
from midasbench.datasets.loader import BatchLoader, ModalityInputs, gather_batch
from midasbench.harness.config import load_config
from midasbench.harness.errors import ConfigError

MAX_LEN, DIM = 6, 3


def sequence_split(n: int, offset: int, seed: int) -> SplitArrays:
    """``seq`` rows of length 1 + i % 6 whose valid frames hold the class signal and whose padding holds
    large noise (which a model reading the padding would trip over); ``vec`` a weak second view."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    lengths = 1 + np.arange(n) % MAX_LEN
    seq = rng.normal(scale=50.0, size=(n, MAX_LEN, DIM)).astype(np.float32)  # padding: noise
    for i, length in enumerate(lengths):
        seq[i, :length] = rng.normal(size=(length, DIM)) + (2.0 if labels[i] else -2.0)
    vec = (rng.normal(size=(n, 2)) + labels[:, None] * 0.2).astype(np.float32)
    return SplitArrays(
        ids=[f"r{offset + i}" for i in range(n)],
        labels=labels,
        modalities={"seq": seq, "vec": vec},
        lengths={"seq": lengths},
    )


@pytest.fixture(scope="module")
def sequence_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seq") / "seqset"
    write_dataset(
        path,
        name="seqset",
        version="1",
        classes=["neg", "pos"],
        splits={
            "train": sequence_split(48, 0, 0),
            "val": sequence_split(16, 100, 1),
            "test": sequence_split(16, 200, 2),
        },
        split_protocol="official",
        split_seed=None,
        chunk_rows=10,  # several record batches
    )
    return path


def test_lengths_are_stored_hashed_and_read_back(sequence_dataset: Path):
    dataset = ArrowDataset(sequence_dataset)
    dataset.verify()
    assert dataset.manifest.modalities["seq"].variable_length
    assert not dataset.manifest.modalities["vec"].variable_length
    train = dataset.split("train")
    np.testing.assert_array_equal(train.lengths["seq"], 1 + np.arange(48) % MAX_LEN)
    assert "vec" not in train.lengths


def test_bad_lengths_name_the_modality_and_row():
    good = sequence_split(4, 0, 0)
    with pytest.raises(DatasetFormatError, match=r"modality 'seq': row 2 has length 9, outside 1\.\.6"):
        SplitArrays(good.ids, good.labels, good.modalities, lengths={"seq": np.array([1, 2, 9, 3])})
    with pytest.raises(DatasetFormatError, match="lengths are given for 'text', which is not a modality"):
        SplitArrays(good.ids, good.labels, good.modalities, lengths={"text": np.ones(4)})


def test_a_batch_is_trimmed_to_its_longest_row_and_carries_the_lengths(sequence_dataset: Path):
    train = ArrowDataset(sequence_dataset).split("train")
    batch = gather_batch(train, np.array([1, 6, 2]))  # lengths 2, 1, 3
    assert batch.inputs["seq"].shape == (3, 3, DIM)  # rows sorted: 1, 2, 6 -> lengths 2, 3, 1
    assert batch.inputs.lengths["seq"].tolist() == [2, 3, 1]
    assert batch.inputs["vec"].shape == (3, 2) and "vec" not in batch.inputs.lengths
    full = train.columns["seq"].gather(np.array([2]))
    torch.testing.assert_close(batch.inputs["seq"][1], torch.from_numpy(full[0, :3]))


def test_rows_and_replace_keep_each_modalitys_lengths_with_its_rows():
    inputs = ModalityInputs(
        {"seq": torch.arange(6.0).view(3, 2), "vec": torch.zeros(3, 1)}, {"seq": torch.tensor([1, 2, 3])}
    )
    swapped = inputs.rows({"seq": torch.tensor([2, 0, 1])})
    assert swapped.lengths["seq"].tolist() == [3, 1, 2]
    assert swapped["seq"][0].tolist() == [4.0, 5.0] and torch.equal(swapped["vec"], inputs["vec"])
    zeroed = inputs.replace({"seq": torch.zeros(3, 2)})
    assert zeroed.lengths["seq"].tolist() == [1, 2, 3]
    assert ModalityInputs.of(inputs) is inputs


def sequence_config(path: Path, tmp_path: Path, *overrides: str):
    return load_config(
        "synthetic",
        [
            f"data.path={path}",
            "data.split=official",
            "model.encoders={seq: {name: transformer, params: {d_model: 16, nhead: 2, num_layers: 1, "
            "dim_feedforward: 32, dropout: 0.0}}}",
            "model.default_encoder.params={hidden: [16], out_dim: 8}",
            "train.epochs=2",
            "train.batch_size=16",
            "train.progress=false",
            "train.num_threads=1",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            "tracking.enabled=false",
            *overrides,
        ],
    )


def test_the_model_hands_lengths_to_the_encoder_and_refuses_a_plain_dict(
    sequence_dataset: Path, tmp_path: Path
):
    from midasbench.harness.training.trainer import build_run_model

    cfg = sequence_config(sequence_dataset, tmp_path)
    model, _ = build_run_model(cfg, ArrowDataset(sequence_dataset).manifest)
    model.eval()
    assert model.variable_length == {"seq"}
    batch = next(iter(BatchLoader(ArrowDataset(sequence_dataset).split("train"), 8, shuffle=False)))
    with torch.no_grad():
        features = model.encode(batch.inputs)["seq"]
        direct = model.encoders["seq"](batch.inputs["seq"], batch.inputs.lengths["seq"])
        torch.testing.assert_close(features, direct)
        unmasked = model.encoders["seq"](batch.inputs["seq"])
        assert not torch.allclose(features, unmasked)  # the noisy padding would have been read
        with pytest.raises(ValueError, match="modality 'seq' holds variable-length sequences"):
            model.encode(dict(batch.inputs))


def test_an_encoder_that_cannot_take_lengths_is_refused(sequence_dataset: Path, tmp_path: Path):
    from midasbench.harness.training.trainer import build_run_model

    cfg = sequence_config(sequence_dataset, tmp_path, "model.encoders={}")
    with pytest.raises(ConfigError, match=r"model.encoders.seq: encoder 'mlp' cannot read variable-length"):
        build_run_model(cfg, ArrowDataset(sequence_dataset).manifest)


@pytest.mark.parametrize(
    "method",
    [
        "method.name=joint",
        "method.params={level: input, warmup_epochs: 0}",  # MIDAS swaps input rows: lengths go along
        "method.name=agm",  # zeroed inputs keep their rows' lengths
    ],
)
def test_methods_train_on_a_variable_length_modality(sequence_dataset: Path, tmp_path: Path, method: str):
    from midasbench.harness.training.trainer import train

    overrides = [method] if method.startswith("method.name") else ["method.name=midas", method]
    result = train(sequence_config(sequence_dataset, tmp_path, *overrides))
    assert np.isfinite(result.history[-1]["train/loss"])
    assert result.test["acc"] > 0.6  # the signal lives in the valid frames only


def write_sequence_folder(folder: Path, n: int = 20) -> dict[str, np.ndarray]:
    """labels.csv plus a ``frames/`` folder of ``<id>.npy`` sequences of lengths 1..4 and a ``vec.npy``."""
    folder.mkdir()
    (folder / "frames").mkdir()
    rows = ["id,label"] + [f"s{i},{i % 2}" for i in range(n)]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    sequences = {}
    for i in range(n):
        sequences[f"s{i}"] = np.full((1 + i % 4, 2), float(i + 1), dtype=np.float32)
        np.save(folder / "frames" / f"s{i}.npy", sequences[f"s{i}"])
    np.save(folder / "vec.npy", np.arange(2 * n, dtype=np.float32).reshape(n, 2))
    return sequences


def test_a_folder_of_sequences_imports_as_a_variable_length_modality(tmp_path: Path):
    from midasbench.datasets.importer import describe_import, import_folder

    sequences = write_sequence_folder(tmp_path / "in")
    assert "frames: float32[4, 2] from frames (folder (variable length)" in describe_import(tmp_path / "in")
    path = import_folder(tmp_path / "in", name="seqs", out=tmp_path / "out", split="midas70")
    dataset = ArrowDataset(path)
    dataset.verify()
    assert dataset.manifest.modalities["frames"].variable_length
    for split in ("train", "val", "test"):
        data = dataset.split(split)
        stored = data.columns["frames"].to_numpy()
        for row, sample_id in enumerate(data.ids):
            length = len(sequences[sample_id])
            assert data.lengths["frames"][row] == length
            np.testing.assert_array_equal(stored[row, :length], sequences[sample_id])
            assert not stored[row, length:].any()  # zero padding


def test_standardizing_a_sequence_modality_leaves_its_padding_out(tmp_path: Path):
    from midasbench.datasets.importer import train_statistics

    values = np.zeros((2, 3, 1))
    values[0, :1] = 2.0  # length 1: [2]
    values[1, :3] = 4.0  # length 3: [4, 4, 4]
    stats = train_statistics(values, np.arange(2), lengths=np.array([1, 3]))
    # valid values 2, 4, 4, 4: mean 3.5, std sqrt(((1.5)^2 + 3 * 0.5^2) / 4) = sqrt(0.75)
    assert stats.mean.tolist() == [3.5] and stats.std[0] == pytest.approx(0.75**0.5)


def test_files_that_differ_beyond_the_first_axis_are_refused(tmp_path: Path):
    from midasbench.datasets.importer import import_folder

    write_sequence_folder(tmp_path / "in", n=10)
    np.save(tmp_path / "in" / "frames" / "s3.npy", np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(
        DatasetFormatError, match=r"s3\.npy: has shape \(2, 5\).*only the first axis may differ"
    ):
        import_folder(tmp_path / "in", name="bad", out=tmp_path / "out")
