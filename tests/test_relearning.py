"""Diagnosing & Re-learning (methods-more.md §27): the §27.8 unit-test values (purity 0.75; α = 0.7163 and
the blended 0.2837, the fusion head and BN buffers untouched), KMeans purity on per-split scaled features,
the re-init schedule, θ⁰ capture, state round trip and exact resume. Expected values are computed by hand in
the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.relearning import (
    cluster_purity,
    kmeans_purity,
    reinit_due,
    reinit_strength,
    soft_reinit,
)

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=2, epochs=70, steps_per_epoch=4, seed=3)
TANH_09 = 0.7162978701990245  # tanh(0.9) = (e^1.8 − 1)/(e^1.8 + 1) = 5.049647/7.049647


class BNEncoder(torch.nn.Module):
    """BatchNorm1d(2) → Linear(2, 2): affine parameters, a weight, a bias and BN running buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(2)
        self.linear = torch.nn.Linear(2, 2)
        self.out_dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


def bn_model() -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel({"a": BNEncoder(), "v": BNEncoder()}, ConcatFusion({"a": 2, "v": 2}, 2), 2)


# Two tight groups on a line (x = 0 for rows 0-4, x = 10 for rows 5-9): KMeans(k = 2) finds exactly them.
GROUPS = np.array([0.0] * 5 + [10.0] * 5)[:, None]
# train: group A labels 0 0 0 0 0 (majority 5), group B 1 1 1 1 0 (majority 4): purity (5 + 4)/10 = 0.9
TRAIN_LABELS = [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
# val: group A 0 0 0 1 1 (majority 3), group B 1 1 1 0 0 (majority 3): purity (3 + 3)/10 = 0.6
VAL_LABELS = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]


def diagnosed_method(params: dict | None = None):
    """A method whose runtime's ``encode_rows`` gives modality a the GROUPS features with the train/val
    labels above (purities 0.9 / 0.6) and modality v the feature 10 · y (two tight groups by label: purity
    1 on both splits, gap 0). Records which split each feature pass read."""
    train, val = list(range(10)), list(range(100, 110))
    passes: list[str] = []

    def encode(model, split, rows, names):
        passes.append("val" if split is val else "train")
        labels = torch.tensor(VAL_LABELS if split is val else TRAIN_LABELS)[rows]
        a = torch.tensor(GROUPS[rows], dtype=torch.float32)
        return {"a": a, "v": 10.0 * labels[:, None].float()}, labels

    runtime = Runtime(train_split=train, val_split=val, encode_fn=encode)
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": runtime})
    return build_method("relearning", {"reinit_every": 1, **(params or {})}, context), passes


# ---------------------------------------------------------------------------------- §27.8 values


def test_spec_purity_value():
    # labels (0, 0, 1, 1), clusters (0, 0, 0, 1): cluster 0 holds labels {0, 0, 1} → majority 2;
    # cluster 1 holds {1} → 1; purity = (2 + 1)/4 = 0.75
    assert cluster_purity(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == 0.75
    # cluster ids and label values need not be 0..K−1: clusters (7, 7, 3, 3) over labels (5, 2, 2, 2) →
    # cluster 7 {5, 2} → 1, cluster 3 {2, 2} → 2; (1 + 2)/4 = 0.75
    assert cluster_purity(np.array([5, 2, 2, 2]), np.array([7, 7, 3, 3])) == 0.75


def test_spec_blend_values_and_untouched_fusion_head_and_bn_buffers():
    # purity_train 0.9, purity_val 0.6, λ = 3: α = tanh(3 · 0.3) = tanh(0.9) = 0.7163
    alpha = reinit_strength(0.9, 0.6, lam=3.0)
    assert alpha == pytest.approx(0.7163, abs=1e-4) and alpha == pytest.approx(TANH_09, abs=1e-12)
    assert reinit_strength(0.6, 0.9, lam=3.0) == alpha  # |gap|
    model = bn_model()
    encoder = model.encoders["a"]
    theta0 = {name: torch.zeros_like(p) for name, p in encoder.named_parameters()}  # θ⁰ = 0
    with torch.no_grad():
        for p in encoder.parameters():
            p.fill_(1.0)  # θ = 1
        encoder.bn.running_mean.fill_(0.5)
        encoder.bn.running_var.fill_(2.0)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    fusion = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    soft_reinit(encoder, theta0, alpha)
    # θ ← α · 0 + (1 − α) · 1 = 1 − 0.7163 = 0.2837 for the weight, the bias and BN's γ and β
    for name, p in encoder.named_parameters():
        assert torch.allclose(p, torch.full_like(p, 0.2837), atol=1e-4), name
        assert torch.equal(p, torch.full_like(p, 1.0 - alpha)), name
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())  # BN buffers bit-identical
    assert all(torch.equal(model.fusion.state_dict()[k], v) for k, v in fusion.items())  # head too


# ------------------------------------------------------------------------------------ diagnosis


def test_kmeans_purity_scales_each_split_and_clusters_into_c_groups():
    # two tight groups: KMeans(k = 2) splits them; labels following the groups → purity 1; alternating
    # labels (0, 1, 0, 1) → each cluster is half/half → (1 + 1)/4 = 0.5
    x = np.array([[0.0, 5.0], [0.1, 5.0], [10.0, -3.0], [10.1, -3.0]], dtype=np.float32)
    assert kmeans_purity(x, np.array([0, 0, 1, 1]), 2, n_init=10, seed=0) == 1.0
    assert kmeans_purity(x, np.array([0, 1, 0, 1]), 2, n_init=10, seed=0) == 0.5
    # the scaler is fitted on the split alone: the same geometry 1000× larger gives the same purity
    assert kmeans_purity(1000 * x, np.array([0, 0, 1, 1]), 2, n_init=10, seed=0) == 1.0
    # fewer rows than classes: as many clusters as rows, each pure → 1
    assert kmeans_purity(x[:2], np.array([0, 1]), 4, n_init=10, seed=0) == 1.0
    # the diagnosis' split values: train 0.9, val 0.6 (hand counts at TRAIN_LABELS / VAL_LABELS)
    assert kmeans_purity(GROUPS, np.array(TRAIN_LABELS), 2, 10, 0) == pytest.approx(0.9)
    assert kmeans_purity(GROUPS, np.array(VAL_LABELS), 2, 10, 0) == pytest.approx(0.6)


def test_a_re_init_blends_each_encoder_by_its_own_alpha_and_logs_the_diagnosis():
    method, passes = diagnosed_method()
    model = bn_model()
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.zero_()  # θ⁰ = 0
    method.on_epoch_start(model, 0)  # captures θ⁰; nothing to re-init before epoch 0
    assert passes == [] and method.reinits == 0
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.fill_(1.0)  # "training" moved every encoder parameter to 1
        for bn in (model.encoders["a"].bn, model.encoders["v"].bn):
            bn.running_mean.fill_(0.5)
    kept = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoders.")}
    kept.update({k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    method.on_epoch_start(model, 1)  # after epoch 0: e = 0 never re-inits
    assert passes == [] and method.reinits == 0
    method.on_epoch_start(model, 2)  # after epoch 1: 1 > 0, 1 % 1 = 0, 0 < 3 → re-init
    assert passes == ["train", "val"] and method.reinits == 1
    # a: α = tanh(3 · |0.9 − 0.6|) = 0.7163, every parameter 1 → α · 0 + (1 − α) · 1 = 0.2837;
    # v: α = tanh(3 · |1 − 1|) = 0, θ = 0 · 0 + 1 · 1 = 1 exactly
    for p in model.encoders["a"].parameters():
        assert torch.allclose(p, torch.full_like(p, 0.2837), atol=1e-4)
        assert torch.equal(p, torch.full_like(p, 1.0 - TANH_09))
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.encoders["v"].parameters())
    after = model.state_dict()  # fusion head, unimodal heads and BN buffers: bit-identical
    assert all(torch.equal(after[k], v) for k, v in kept.items())
    logs = method.on_epoch_end(model, 2)
    assert logs["reinits"] == 1.0
    assert logs["purity_train_a"] == pytest.approx(0.9) and logs["purity_val_a"] == pytest.approx(0.6)
    assert logs["alpha_a"] == pytest.approx(TANH_09, abs=1e-12)
    assert (logs["purity_train_v"], logs["purity_val_v"], logs["alpha_v"]) == (1.0, 1.0, 0.0)
    assert method.on_epoch_end(model, 3) == {"reinits": 1.0}  # the diagnosis is logged once


def test_the_diagnosis_comes_from_rank_0_through_a_broadcast():
    # on a rank other than 0 nothing is clustered: the (M, 3) rows are whatever the broadcast delivers
    method, passes = diagnosed_method()
    delivered = torch.tensor([[0.5, 0.25, 0.125], [1.0, 1.0, 0.0]], dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        seen.append(tensor.clone())
        return delivered.clone()

    method.runtime.rank = 1
    method.runtime.broadcast = broadcast  # type: ignore[method-assign]
    stats = method.diagnose(bn_model())
    assert passes == ["train", "val"]  # every rank takes part in the (collective) feature passes
    assert torch.equal(seen[0], torch.zeros(2, 3, dtype=torch.float64)) and torch.equal(stats, delivered)


# ------------------------------------------------------------------------------------- schedule


def test_schedule_re_inits_after_epochs_20_40_60_by_default_and_every_epoch_from_1_with_e_r_1():
    # defaults E_r = 20, N_r = 3 over epochs 0-69: after e = 20, 40, 60 (e = 0 never)
    done, after = 0, []
    for e in range(70):
        if reinit_due(e, 20, 3, done):
            after.append(e)
            done += 1
    assert after == [20, 40, 60]
    # E_r = 1, N_r = 3: after e = 1, 2, 3; N_r = 0: never
    done, after = 0, []
    for e in range(10):
        if reinit_due(e, 1, 3, done):
            after.append(e)
            done += 1
    assert after == [1, 2, 3]
    assert not any(reinit_due(e, 1, 0, 0) for e in range(10))


def test_the_method_re_inits_at_the_start_of_the_epoch_after_each_scheduled_epoch():
    method, passes = diagnosed_method({"reinit_every": 2, "reinit_max": 2})
    model = bn_model()
    started_with_reinit = []
    for epoch in range(9):
        before = len(passes)
        method.on_epoch_start(model, epoch)
        if len(passes) > before:
            started_with_reinit.append(epoch)
    # E_r = 2, N_r = 2: after e = 2 and 4 (then the limit), i.e. at the starts of epochs 3 and 5
    assert started_with_reinit == [3, 5] and method.reinits == 2


# -------------------------------------------------------------------------------- state / resume


def test_state_round_trips_theta0_and_the_count_and_resume_re_inits_exactly():
    model = bn_model()
    method, _ = diagnosed_method()
    assert method.state_dict() == {"theta0": None, "reinits": 0}
    method.on_epoch_start(model, 0)
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.mul_(3.0).add_(0.25)  # "training"
    state = method.state_dict()  # the checkpoint of epoch 1: before the re-init
    resumed_model = bn_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed, _ = diagnosed_method()
    resumed.load_state_dict(state)
    assert repr(resumed.state_dict()) == repr(state)
    resumed.on_epoch_start(resumed_model, 2)  # the resumed run's first epoch: θ⁰ is not re-captured
    method.on_epoch_start(model, 2)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert resumed.reinits == method.reinits == 1
    # the count survives a checkpoint: with N_r = 1 a resumed run does not re-init again
    capped, passes = diagnosed_method({"reinit_max": 1})
    capped.load_state_dict(method.state_dict())
    capped.on_epoch_start(resumed_model, 3)
    assert passes == [] and capped.reinits == 1


def test_theta0_is_the_encoders_before_the_first_step_and_missing_theta0_is_an_error():
    model = bn_model()
    method, _ = diagnosed_method()
    with pytest.raises(RuntimeError, match="no θ⁰"):
        method.on_epoch_start(model, 2)
    method.on_epoch_start(model, 0)
    assert set(method.theta0) == {"a", "v"}
    assert set(method.theta0["a"]) == {"bn.weight", "bn.bias", "linear.weight", "linear.bias"}  # no buffers
    assert torch.equal(method.theta0["a"]["linear.weight"], model.encoders["a"].linear.weight)
    with torch.no_grad():
        model.encoders["a"].linear.weight.add_(1.0)
    assert not torch.equal(method.theta0["a"]["linear.weight"], model.encoders["a"].linear.weight)  # a copy


# ------------------------------------------------------------------------------------------ rules


def test_step_is_plain_joint_cross_entropy_and_evaluation_is_the_fused_head():
    model = bn_model()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.zero_()  # z = 0: CE = log 2 for any label
    method = build_method("relearning", {}, CONTEXT)
    batch = Batch(
        inputs={"a": torch.randn(4, 2), "v": torch.randn(4, 2)},
        labels=torch.tensor([0, 1, 1, 0]),
        index=torch.arange(4),
    )
    out = method.training_step(model, batch, epoch=0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and out.extra_losses == {}
    names = {id(p) for p in method.trainable_parameters(model)}
    assert not any(id(p) in names for p in model.unimodal_heads.parameters())
    model.eval()
    features = model.encode(batch.inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))


def test_defaults_and_parameter_errors():
    from midasbench.methods.relearning import Relearning

    p = build_method("relearning", {}, CONTEXT).params
    # §27.5 harness row / §32: λ 3, every 20, at most 3, n_init 10
    assert (p.lam, p.reinit_every, p.reinit_max, p.n_init) == (3.0, 20, 3, 10)
    assert Relearning.fidelity == "official-code" and Relearning.dataset_defaults == {}
    with pytest.raises(ConfigError, match="reinit_every"):
        build_method("relearning", {"reinit_every": 0}, CONTEXT)
    with pytest.raises(ConfigError, match="lam"):
        build_method("relearning", {"lam": -1.0}, CONTEXT)


def test_a_short_run_re_inits_and_logs_both_purities(tiny_config):
    from midasbench.harness.training.trainer import train

    history = train(tiny_config("method.name=relearning", 'method.params={"reinit_every": 1}')).history
    # 3 epochs, E_r = 1: one re-init, after epoch 1 (at the start of epoch 2), logged with epoch 2
    assert [h["method/reinits"] for h in history] == [0.0, 0.0, 1.0]
    assert "method/alpha_strong" not in history[1]
    for m in ("strong", "weak"):
        assert 0.0 < history[2][f"method/purity_train_{m}"] <= 1.0
        assert 0.0 < history[2][f"method/purity_val_{m}"] <= 1.0
        gap = abs(history[2][f"method/purity_train_{m}"] - history[2][f"method/purity_val_{m}"])
        assert history[2][f"method/alpha_{m}"] == pytest.approx(math.tanh(3.0 * gap))
