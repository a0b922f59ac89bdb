"""The training loop: determinism, validation-only model selection, exact resume, imbalance."""

import numpy as np
import pytest
import torch

from midasbench.datasets import ArrowDataset
from midasbench.harness.models.model import build_model
from midasbench.harness.training import checkpoint as ckpt
from midasbench.harness.training.checkpoint import CheckpointDir
from midasbench.harness.training.evaluation import evaluate
from midasbench.harness.training.metrics import split_metrics
from midasbench.harness.training.trainer import dataset_path, train
from midasbench.methods import MethodContext, build_method


def test_metrics_are_computed_over_the_whole_split():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 1, 0])
    out = split_metrics(labels, preds, {"first_three": np.array([1, 1, 1, 0, 0, 0], bool)})
    assert out["acc"] == pytest.approx(4 / 6)
    # per class F1: c0 P=2/3 R=2/3 → 2/3; c1 P=2/3 R=1 → 0.8; c2 → 0  ⇒ macro = (2/3 + 0.8 + 0)/3
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 3)
    assert out["acc_first_three"] == pytest.approx(2 / 3)


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tiny_config, tmp_path):
    a = train(tiny_config(f"train.checkpoint_dir={tmp_path / 'a'}"))
    b = train(tiny_config(f"train.checkpoint_dir={tmp_path / 'b'}"))
    c = train(tiny_config(f"train.checkpoint_dir={tmp_path / 'c'}", "train.seed=1"))
    assert a.history == b.history and a.test == b.test
    assert a.history != c.history


def test_best_epoch_is_chosen_on_validation_and_test_is_evaluated_on_it(tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=5")
    result = train(cfg)
    val_acc = [h["val/acc"] for h in result.history]
    assert result.best_epoch == int(np.argmax(val_acc))  # first maximum wins
    assert result.best_val["acc"] == max(val_acc)
    assert not any(key.startswith("test/") for h in result.history for key in h)  # no test peeking
    # the reported test metrics are those of the saved best-epoch weights
    dataset = ArrowDataset(dataset_path(cfg))
    model = build_model(cfg.model, dataset.manifest)
    saved = ckpt.load(result.checkpoint_dir / CheckpointDir.BEST)
    assert saved["epoch"] == result.best_epoch
    model.load_state_dict(saved["model"])
    method = build_method("joint", {}, MethodContext(("strong", "weak"), 4, 5, 8))
    again = evaluate(model, method, dataset.split("test"), 512, torch.device("cpu"), diagnostics_seed=0)
    assert again == result.test


class Crash(RuntimeError):
    pass


def test_resume_from_an_epoch_checkpoint_matches_an_uninterrupted_run(tiny_config, tmp_path):
    # dropout makes the run depend on the RNG state, which the checkpoint must restore
    overrides = (
        "train.epochs=5",
        "model.default_encoder.params.dropout=0.3",
        "method.params.unimodal_weight=0.5",
    )
    full = train(tiny_config(*overrides, f"train.checkpoint_dir={tmp_path / 'full'}"))
    interrupted = tiny_config(*overrides, f"train.checkpoint_dir={tmp_path / 'part'}")

    def crash_after_epoch_2(epoch, metrics, checkpoint_dir):
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        train(interrupted, callbacks=[crash_after_epoch_2])
    assert ckpt.load(tmp_path / "part" / CheckpointDir.LAST)["epoch"] == 2
    seen = []
    resumed = train(interrupted, callbacks=[lambda epoch, metrics, d: seen.append(epoch)])
    assert seen == [3, 4]  # only the unfinished epochs ran
    assert resumed.history == full.history
    assert resumed.test == full.test
    assert ckpt.load(tmp_path / "part" / CheckpointDir.LAST)["completed"] is True


def test_a_changed_config_does_not_resume_a_foreign_checkpoint(tiny_config, tmp_path):
    d = f"train.checkpoint_dir={tmp_path / 'x'}"

    def crash(epoch, metrics, checkpoint_dir):
        raise Crash

    with pytest.raises(Crash):
        train(tiny_config(d), callbacks=[crash])
    seen = []
    train(tiny_config(d, "optimizer.lr=0.02"), callbacks=[lambda e, m, c: seen.append(e)])
    assert seen == [0, 1, 2]


def test_unimodal_run_evaluates_its_own_head(tiny_config):
    result = train(tiny_config("method.name=unimodal", "method.params.modality=weak"))
    assert result.method == "unimodal[weak]"
    assert 0.0 <= result.test["acc"] <= 1.0


@pytest.mark.slow
def test_synthetic_reproduces_modality_imbalance(tiny_config, tmp_path):
    """Joint training's accuracy on the samples where only the weak modality carries signal is well below
    the weak unimodal model's (datasets.md §7.C, suggested CI test 3), averaged over 2 seeds."""
    default_data = "data.options={}"  # the full default generator, not the tiny one
    joint, weak = [], []
    for seed in (0, 1):
        common = (default_data, "train.epochs=40", f"train.seed={seed}")
        joint.append(
            train(
                tiny_config(
                    *common,
                    f"train.checkpoint_dir={tmp_path / f'j{seed}'}",
                    "model.default_encoder.params={hidden: [128], out_dim: 128}",
                )
            )
        )
        weak.append(
            train(
                tiny_config(
                    *common,
                    f"train.checkpoint_dir={tmp_path / f'w{seed}'}",
                    "model.default_encoder.params={hidden: [128], out_dim: 128}",
                    "method.name=unimodal",
                    "method.params.modality=weak",
                )
            )
        )
    joint_subset = np.mean([r.test["acc_only_weak"] for r in joint])
    weak_subset = np.mean([r.test["acc_only_weak"] for r in weak])
    assert joint_subset < 0.6 * weak_subset, (joint_subset, weak_subset)
    # while joint training is the better model overall: the imbalance is about how modalities are used
    assert np.mean([r.test["acc"] for r in joint]) > np.mean([r.test["acc"] for r in weak])


def test_avdigits_preset_trains_end_to_end(data_root, tmp_path):
    pytest.importorskip("espeakng_loader")
    from midasbench.harness.config import load_config

    cfg = load_config(
        "avdigits",
        [
            f"data.root={data_root}",
            "data.options={max_images: 300}",
            "train.epochs=6",
            "train.progress=false",
            f"train.checkpoint_dir={tmp_path}",
            "tracking.enabled=false",
        ],
    )
    result = train(cfg)
    assert len(result.history) == 6
    assert result.test["acc"] > 0.25  # ten classes: 2.5x chance (0.37-0.38 measured)
