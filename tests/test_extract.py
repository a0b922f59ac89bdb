"""The frozen-feature track (issue 9, item 6): extract once, train heads on the features, tagged apart."""

from __future__ import annotations

import json

import numpy as np
import torch

from midasbench.datasets.format import ArrowDataset
from midasbench.harness.models.encoders import build_encoder
from midasbench.harness.models.model import build_model
from midasbench.harness.training.evaluation import encode_rows
from midasbench.harness.training.extract import extract_features
from midasbench.harness.training.trainer import TrainingRun, dataset_path, train
from midasbench.harness.training.unimodal_runs import state_sha256

ENCODER = "model.default_encoder.params={hidden: [16], out_dim: 8}"
IDENTITY = "model.default_encoder={name: identity}"


def test_extracted_features_are_the_encoders_outputs_with_their_provenance(tiny_config, tmp_path):
    cfg = tiny_config(ENCODER, "train.seed=3")
    out = extract_features(cfg, name="tinyfeat", out=tmp_path / "tinyfeat")
    source, features = ArrowDataset(dataset_path(cfg)), ArrowDataset(out)
    features.verify()
    torch.manual_seed(3)  # the same seeded init the extraction used
    model = build_model(cfg.model, source.manifest).eval()
    for split in ("train", "val", "test"):
        a, b = source.split(split), features.split(split)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.subsets.keys() == b.subsets.keys()
        expected, _ = encode_rows(model, a, np.arange(len(a)), model.modalities, 512, torch.device("cpu"))
        for m in model.modalities:
            np.testing.assert_array_equal(b.columns[m].to_numpy(), expected[m].numpy())
    m = features.manifest
    assert m.classes == source.manifest.classes and m.split_protocol == source.manifest.split_protocol
    assert {s.kind for s in m.modalities.values()} == {"features"}
    frozen = m.build_options["frozen_features"]
    assert frozen["source"]["content_sha256"] == source.manifest.content_sha256
    for name, encoder in model.encoders.items():
        entry = frozen["encoders"][name]
        assert entry["encoder"] == "mlp"
        assert entry["params"]["hidden"] == [16] and entry["params"]["out_dim"] == 8  # resolved, defaults too
        assert entry["weights_sha256"] == state_sha256(encoder.state_dict())
    json.dumps(frozen)  # manifest-safe


def test_heads_train_on_the_features_and_the_runs_are_tagged_as_the_frozen_track(tiny_config, tmp_path):
    cfg = tiny_config(ENCODER)
    extract_features(cfg, name="feat", root=tmp_path / "root")
    run_cfg = tiny_config("data.name=feat", f"data.root={tmp_path / 'root'}", "data.options={}", IDENTITY)
    run = TrainingRun(run_cfg)
    assert not list(run.model.encoders.parameters())  # heads only
    assert run.run_tags()["dataset.track"] == "frozen-features"
    tags = TrainingRun(cfg).run_tags()
    assert tags["dataset.track"] == "end-to-end"
    assert (tags["split.train.rows"], tags["split.val.rows"], tags["split.test.rows"]) == ("240", "80", "160")
    result = train(run_cfg)
    assert 0.0 <= result.test["acc"] <= 1.0 and result.best_epoch >= 0


def test_the_identity_encoder_passes_stored_features_through():
    encoder = build_encoder("identity", (2, 3), "float16", {})
    x = torch.arange(12, dtype=torch.float16).reshape(2, 2, 3)
    assert encoder.out_dim == 6 and torch.equal(encoder(x), x.reshape(2, 6))
    assert encoder(torch.ones(1, 2, 3, dtype=torch.uint8)).dtype == torch.float32


def test_extraction_reads_the_inputs_through_the_eval_transforms_and_records_them(tiny_config, tmp_path):
    transforms = "data.transforms={strong: {normalize: {mean: [1.0], std: [4.0]}}}"
    cfg = tiny_config(ENCODER, transforms)
    out = extract_features(cfg, name="normfeat", out=tmp_path / "normfeat")
    torch.manual_seed(0)
    source = ArrowDataset(dataset_path(cfg))
    model = build_model(cfg.model, source.manifest).eval()
    test = source.split("test")
    raw = torch.from_numpy(test.columns["strong"].to_numpy().astype(np.float32))
    with torch.no_grad():
        expected = model.encoders["strong"]((raw - 1.0) / 4.0)  # (x - mean) / std, then the encoder
    stored = ArrowDataset(out).split("test").columns["strong"].to_numpy()
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-6, atol=1e-6)
    recorded = ArrowDataset(out).manifest.build_options["frozen_features"]["transforms"]
    assert recorded["strong"]["normalize"]["mean"] == [1.0]
