"""G-Blending (methods-more §26): the blend weights and their guards (§26.3, §26.8), the weighted loss's
gradient scaling (§26.2, §26.8), the probes (untouched main model, branch parameters, the carve), the
re-estimation epochs, the evaluated prediction, state and requirements."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests_support_models import two_layer_model

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.training.trainer import TrainingRun, train
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.gblending import (
    FUSED,
    blend_weights,
    carve_rows,
    generalization_overfitting,
    raw_blend_weight,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=30, steps_per_epoch=2)
PROBES = "method.params={probe_epochs: 1}"


def gblending(**params):
    return build_method("gblending", params, CONTEXT)


# ---- §26.3 / §26.8 the weights


def test_blend_weights_are_the_spec_unit_test_values():
    # §26.8: (ΔG, ΔO) = (0.2, 0.1) a, (0.1, 0.2) v, (0.3, 0.3) f
    # w̃ = 0.2/0.01 = 20, 0.1/0.04 = 2.5, 0.3/0.09 = 3.3333; Σ = 25.8333
    # w = 20/25.8333 = 0.7742, 2.5/25.8333 = 0.0968, 3.3333/25.8333 = 0.1290
    delta_g = {"a": 0.2, "b": 0.1, FUSED: 0.3}
    delta_o = {"a": 0.1, "b": 0.2, FUSED: 0.3}
    assert [raw_blend_weight(delta_g[k], delta_o[k]) for k in delta_g] == pytest.approx([20, 2.5, 10 / 3])
    w = blend_weights(delta_g, delta_o)
    assert list(w) == ["a", "b", FUSED]
    assert [w["a"], w["b"], w[FUSED]] == pytest.approx([0.7742, 0.0968, 0.1290], abs=5e-5)
    assert sum(w.values()) == pytest.approx(1.0)


def test_a_branch_whose_holdout_loss_did_not_fall_gets_no_weight():
    # ΔG_b = −0.1 → w̃_b = 0; ΔG_a = 0 → 0; only f: w̃ = 0.3/0.09 → w_f = 1
    w = blend_weights({"a": 0.0, "b": -0.1, FUSED: 0.3}, {"a": 0.1, "b": 0.2, FUSED: 0.3})
    assert w == {"a": 0.0, "b": 0.0, FUSED: 1.0}
    # ΔG = 0.2, ΔO = −0.1: the square, so the sign of ΔO does not matter (w̃ = 0.2/0.01 = 20)
    assert raw_blend_weight(0.2, -0.1) == pytest.approx(20.0)


def test_all_zero_raw_weights_fall_back_to_the_fused_branch_alone():
    # every ΔG ≤ 0: Σ w̃ = 0 → w_f = 1, others 0
    w = blend_weights({"a": -0.1, "b": 0.0, FUSED: -0.3}, {"a": 0.1, "b": 0.2, FUSED: 0.3})
    assert w == {"a": 0.0, "b": 0.0, FUSED: 1.0}


def test_the_overfitting_term_is_floored():
    # ΔO = 0 → ΔO² floored at 1e-6: w̃ = 0.1 / 1e-6 = 1e5; ΔO = 1e-4 → ΔO² = 1e-8 → also 1e5
    assert raw_blend_weight(0.1, 0.0) == pytest.approx(1e5)
    assert raw_blend_weight(0.1, 1e-4) == pytest.approx(1e5)


def test_generalization_and_overfitting_by_hand():
    # L^T: 1.0 → 0.5, L^V: 1.2 → 0.9: ΔG = 1.2 − 0.9 = 0.3; O_0 = 0.2, O_n = 0.4 → ΔO = 0.2
    g, o = generalization_overfitting(1.0, 1.2, 0.5, 0.9)
    assert (g, o) == pytest.approx((0.3, 0.2))


# ---- §26.2 / §26.8 the weighted loss


def zero_head_model():
    """Heads g_f, g_a, g_b zeroed: every logit is 0, softmax = (1/3, 1/3, 1/3), every CE = log 3."""
    model = two_layer_model(num_classes=3)
    with torch.no_grad():
        for head in (model.fusion.linear, *model.unimodal_heads.values()):
            head.weight.zero_()
            head.bias.zero_()
    return model


def label_zero_batch() -> Batch:
    torch.manual_seed(3)
    return Batch(
        inputs={"a": torch.randn(4, 4), "b": torch.randn(4, 2)},
        labels=torch.zeros(4, dtype=torch.long),
        index=torch.arange(4),
    )


def weighted(**weights):
    method = gblending()
    method.load_state_dict({"weights": weights, "delta_g": {}, "delta_o": {}, "estimated_at": 0})
    return method


def test_the_weighted_loss_scales_each_head_s_gradient_by_its_weight():
    # §26.8: w = (0.5, 0.25, 0.25) for (a, b, f)
    model, batch = zero_head_model(), label_zero_batch()
    method = weighted(a=0.5, b=0.25, fused=0.25)
    out = method.training_step(model, batch, 0)
    # every CE is log 3 and the weights sum to 1: L = log 3
    assert out.loss.item() == pytest.approx(math.log(3))
    assert [out.logs[f"loss_{k}"] for k in ("a", "b", FUSED)] == pytest.approx([math.log(3)] * 3)
    out.loss.backward()
    # ∂CE/∂bias = mean_i (softmax − onehot(0)) = (1/3 − 1, 1/3, 1/3) = (−2/3, 1/3, 1/3)
    plain_bias = torch.tensor([-2 / 3, 1 / 3, 1 / 3])
    torch.testing.assert_close(model.fusion.linear.bias.grad, 0.25 * plain_bias)  # (−1/6, 1/12, 1/12)
    torch.testing.assert_close(model.unimodal_heads["a"].bias.grad, 0.5 * plain_bias)  # (−1/3, 1/6, 1/6)
    torch.testing.assert_close(model.unimodal_heads["b"].bias.grad, 0.25 * plain_bias)
    # the weight gradients: 0.25× the plain fusion-CE gradient, 0.5× the plain unimodal-CE gradient of g_a
    fusion_w = model.fusion.linear.weight.grad.clone()
    head_a_w = model.unimodal_heads["a"].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    features = model.encode(batch.inputs)
    F.cross_entropy(model.fuse(features), batch.labels).backward(retain_graph=True)
    F.cross_entropy(model.unimodal_heads["a"](features["a"]), batch.labels).backward()
    torch.testing.assert_close(fusion_w, 0.25 * model.fusion.linear.weight.grad)
    torch.testing.assert_close(head_a_w, 0.5 * model.unimodal_heads["a"].weight.grad)


def test_before_any_estimate_only_the_fused_loss_counts_but_every_head_is_in_the_graph():
    # VMZ's CLI defaults (0, 0, 1): L = CE(z) = log 3; the unimodal heads get zero (not missing) gradients
    model, batch = zero_head_model(), label_zero_batch()
    method = gblending()
    assert method.weights == {"a": 0.0, "b": 0.0, FUSED: 1.0}
    out = method.training_step(model, batch, 0)
    assert out.loss.item() == pytest.approx(math.log(3))
    out.loss.backward()
    assert torch.equal(model.unimodal_heads["a"].bias.grad, torch.zeros(3))


def test_evaluation_reads_the_fused_logits_only():
    model, batch = two_layer_model(num_classes=3), label_zero_batch()
    method = weighted(a=0.9, b=0.1, fused=0.0)
    features = model.encode(batch.inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))
    assert method.eval_modalities(model) == ["a", "b"]


# ---- §26.3 when the weights are estimated


@pytest.mark.parametrize(
    ("params", "num_epochs", "expected"),
    [
        ({}, 8, [0]),  # offline: once, from θ0
        ({"mode": "online", "super_epoch": 3}, 8, [0, 3, 6]),  # every S = 3 epochs from epoch 0
        ({"mode": "online"}, 25, [0, 10, 20]),  # BB's super-epoch S = 10
    ],
)
def test_estimation_epochs(params, num_epochs, expected, monkeypatch):
    method = gblending(**params)
    seen = []
    monkeypatch.setattr(method, "estimate", lambda model, epoch: seen.append(epoch))
    for epoch in range(num_epochs):
        method.on_epoch_start(None, epoch)
    assert seen == expected
    assert method.label == ("gblending[online]" if params else "gblending")


def test_carve_is_a_seeded_tenth_of_the_training_rows():
    rows, holdout = carve_rows(240, 0.1, seed=0)
    assert len(holdout) == 24 and len(rows) == 216  # round(0.1 · 240) = 24
    assert not set(rows) & set(holdout) and sorted([*rows, *holdout]) == list(range(240))
    again, other = carve_rows(240, 0.1, seed=0)[1], carve_rows(240, 0.1, seed=1)[1]
    assert np.array_equal(holdout, again) and not np.array_equal(holdout, other)
    assert len(carve_rows(5, 0.01, seed=0)[1]) == 1  # at least one row held out


# ---- the probes on a real (tiny) run


def model_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_probe_run_leaves_the_main_model_and_the_global_rng_untouched(tiny_config):
    run = TrainingRun(tiny_config("method.name=gblending", PROBES))
    before, rng = model_state(run.model), torch.get_rng_state()
    run.method.on_epoch_start(run.model, 0)
    after = model_state(run.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)  # the probes' dropout drew from their own stream
    method = run.method
    assert set(method.weights) == {"strong", "weak", FUSED} and sum(method.weights.values()) == pytest.approx(
        1
    )
    assert all(w >= 0 for w in method.weights.values()) and method.estimated_at == 0
    # the weights follow from the logged ΔG, ΔO (§26.3)
    assert method.weights == pytest.approx(blend_weights(method.delta_g, method.delta_o))
    logs = method.on_epoch_end(run.model, 0)
    assert {"w_strong", "w_weak", "w_fused", "delta_g_fused", "delta_o_weak"} <= set(logs)
    # a function of (model, seed): estimating again from the same model gives the same numbers
    first = dict(method.delta_g)
    method.on_epoch_start(run.model, 0)
    assert method.delta_g == first


def test_a_modality_probe_trains_only_its_encoder_and_head(tiny_config):
    import copy

    run = TrainingRun(tiny_config("method.name=gblending", PROBES))
    probe = copy.deepcopy(run.model)
    run.method.train_probe(probe, "weak", seed=5, rows=None)
    start, end = model_state(run.model), model_state(probe)
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.startswith(("encoders.weak.", "unimodal_heads.weak.")) for k in changed)
    assert any(k.startswith("unimodal_heads.weak.") for k in changed)


def test_train_carve_probes_never_train_on_the_holdout(tiny_config):
    run = TrainingRun(
        tiny_config("method.name=gblending", "method.params={probe_epochs: 1, holdout: train_carve}")
    )
    runtime, seen, original = run.runtime, set(), run.runtime.train_batches

    def recording(epoch, seed, rows=None):
        for batch in original(epoch, seed, rows):
            seen.update(batch.index.tolist())
            yield batch

    runtime.train_batches = recording
    run.method.on_epoch_start(run.model, 0)
    _, holdout = carve_rows(len(run.train_split), 0.1, run.cfg.train.seed)
    assert seen and not seen & set(holdout.tolist())
    assert len(seen) == len(run.train_split) - len(holdout)


def test_a_short_online_run_logs_the_weights_every_epoch(tiny_config):
    params = "method.params={probe_epochs: 1, mode: online, super_epoch: 2}"
    history = train(tiny_config("method.name=gblending", params)).history
    assert [round(sum(h[f"method/w_{k}"] for k in ("strong", "weak", FUSED)), 6) for h in history] == [
        1.0
    ] * 3
    assert all(math.isfinite(h["train/loss_fused"]) for h in history)


# ---- state and requirements


def test_state_round_trips_and_is_used_by_the_step():
    method = weighted(a=0.5, b=0.25, fused=0.25)
    method.delta_g, method.delta_o = {"a": 0.2, "b": 0.1, FUSED: 0.3}, {"a": 0.1, "b": 0.2, FUSED: 0.3}
    clone = gblending()
    clone.load_state_dict(method.state_dict())
    assert clone.state_dict() == method.state_dict() and clone.weights == {"a": 0.5, "b": 0.25, FUSED: 0.25}
    model, batch = zero_head_model(), label_zero_batch()
    clone.training_step(model, batch, 0).loss.backward()
    torch.testing.assert_close(
        model.unimodal_heads["a"].bias.grad, 0.5 * torch.tensor([-2 / 3, 1 / 3, 1 / 3])
    )
    with pytest.raises(ValueError, match="weights for"):
        clone.load_state_dict({**method.state_dict(), "weights": {"a": 1.0, FUSED: 0.0}})


def test_requirements_and_parameter_errors():
    needs = METHODS.get("gblending").requires
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        needs.check("gblending", "concat", True, 1)
    needs.check("gblending", "film", False, 2)  # separate heads: any fusion head
    with pytest.raises(ConfigError, match=r"method\.params\.carve_fraction"):
        gblending(carve_fraction=1.0)
    with pytest.raises(ConfigError, match=r"method\.params\.mode"):
        gblending(mode="sometimes")
    with pytest.raises(ConfigError, match="reserves the branch name"):
        build_method(
            "gblending",
            {},
            MethodContext(modalities=("a", FUSED), num_classes=2, epochs=1, steps_per_epoch=1),
        )
    assert METHODS.get("gblending").fidelity == "reconstructed"
