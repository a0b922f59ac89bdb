"""MLA (methods-more §21): alternating sub-steps through the shared head, the GS projection variants
(§21.9 values), a_t and the first-step skip, the non-finite guard, DDP-shaped r, the entropy-gated fusion
and its coalitions, state, requirements. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from tests_support_models import IdentityEncoder as Identity
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.harness.training.trainer import TrainingRun
from midasbench.methods import MethodContext, build_method
from midasbench.methods.mla import (
    HEAD,
    MLA,
    gated_fusion,
    gs_alpha,
    project_gradient,
    update_projection,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=3, steps_per_epoch=4)
SQ202, SQ442 = math.sqrt(202), math.sqrt(442)


def identity_model() -> MultimodalModel:
    """d = 2, C = 2, identity encoders (f = x until an encoder steps)."""
    return MultimodalModel({"a": Identity(2), "b": Identity(2)}, ConcatFusion({"a": 2, "b": 2}, 2), 2)


def prepared(runtime: Runtime | None = None, **params) -> tuple[MLA, MultimodalModel]:
    """The method with its shared head attached (zero weight and bias), as the trainer builds it."""
    context = CONTEXT if runtime is None else MethodContext(**{**CONTEXT.__dict__, "runtime": runtime})
    method = build_method("mla", params, context)
    model = identity_model()
    model.attach_method_modules(method.build_modules(model))
    with torch.no_grad():
        for p in model.method_modules[HEAD].parameters():
            p.zero_()
    return method, model


def batch_of(x: list[list[float]], labels: list[int]) -> Batch:
    """The same inputs for both modalities."""
    t = torch.tensor(x)
    return Batch(
        inputs={"a": t.clone(), "b": t.clone()}, labels=torch.tensor(labels), index=torch.arange(len(x))
    )


def sgd(method: MLA, model: MultimodalModel, lr: float = 1.0) -> torch.optim.SGD:
    params = [p for g in method.param_groups(model) for p in g.params]
    return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)


def run_batch(method: MLA, model: MultimodalModel, batch: Batch, opt: torch.optim.Optimizer, epoch: int = 0):
    """The trainer's sub-step loop: zero_grad(set_to_none) → backward → after_backward → step → after."""
    for out in method.training_steps(model, batch, epoch):
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        method.after_backward(model, epoch)
        opt.step()
        method.after_optimizer_step(model, epoch)


@dataclass
class SubStep:
    grad_before: torch.Tensor  # the head weight's gradient before after_backward
    grad_after: torch.Tensor


def sub_steps(method: MLA, model: MultimodalModel, batch: Batch, opt, epoch: int = 0) -> list[SubStep]:
    """As ``run_batch``, recording the head weight's gradient around ``after_backward``."""
    seen = []
    weight = model.method_modules[HEAD].weight
    for out in method.training_steps(model, batch, epoch):
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        before = weight.grad.clone()
        method.after_backward(model, epoch)
        seen.append(SubStep(before, weight.grad.clone()))
        opt.step()
        method.after_optimizer_step(model, epoch)
    return seen


# ---- §21.9 (1) alternation


def test_the_second_sub_step_takes_its_gradient_at_the_head_the_first_one_moved():
    method, model = prepared(gs="off")
    batch = batch_of([[1.0, 0.0]], [0])
    batch.inputs["b"] = torch.tensor([[0.0, 1.0]])  # x^a = (1, 0), x^b = (0, 1)
    run_batch(method, model, batch, sgd(method, model, lr=1.0))
    # η = 1, W₀ = 0, c₀ = 0, y = 0.
    # step a: f = (1, 0), z = 0, p = (½, ½), ∂ℓ/∂z = p − e₀ = (−½, ½):
    #   ∇W = [[−½, 0], [½, 0]], ∇c = (−½, ½) → W₁ = [[½, 0], [−½, 0]], c₁ = (½, −½)
    # step b at W₁: f = (0, 1), z = W₁ f + c₁ = (½, −½), p₀ = σ(1) = 0.73105858, ∂ℓ/∂z = (−0.26894142, +):
    #   W₂ = W₁ − [[0, −0.26894142], [0, 0.26894142]] = [[½, 0.26894142], [−½, −0.26894142]]
    #   c₂ = (½ + 0.26894142, −½ − 0.26894142)
    # (a joint step would take step b's gradient at W₀: z = 0, column 2 = (½, −½) instead)
    head = model.method_modules[HEAD]
    q = 0.26894142
    torch.testing.assert_close(head.weight.detach(), torch.tensor([[0.5, q], [-0.5, -q]]))
    torch.testing.assert_close(head.bias.detach(), torch.tensor([0.5 + q, -0.5 - q]))
    assert method.steps == 2


def test_each_sub_step_reaches_its_own_encoder_and_the_head_only():
    method, model = prepared(gs="off")
    batch = batch_of([[1.0, 2.0], [3.0, 4.0]], [0, 1])
    grads = []
    for out in method.training_steps(model, batch, 0):
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        grads.append({m: model.encoders[m].weight.grad is not None for m in ("a", "b")})
    assert grads == [{"a": True, "b": False}, {"a": False, "b": True}]
    trainable = {id(p) for p in method.trainable_parameters(model)}
    assert not any(id(p) in trainable for p in model.fusion.parameters())
    assert not any(id(p) in trainable for p in model.unimodal_heads.parameters())
    assert all(id(p) in trainable for p in model.method_modules[HEAD].parameters())


def test_zero_grad_zeros_keeps_a_zero_gradient_on_the_encoder_stepped_earlier_in_the_batch():
    batch = batch_of([[1.0, 2.0]], [0])
    for flag, expected in ((False, None), (True, torch.zeros(2, 2))):
        method, model = prepared(gs="off", zero_grad_zeros=flag)
        steps = method.training_steps(model, batch, 0)
        for out in steps:
            model.zero_grad(set_to_none=True)
            out.loss.backward()
            method.after_backward(model, 0)
        # after the second sub-step's after_backward (the last one run), encoder a's gradient:
        grad = model.encoders["a"].weight.grad
        assert grad is None if expected is None else torch.equal(grad, expected)


# ---- §21.9 (2) the three projection variants


def test_projection_variants_match_the_spec_values():
    eye, r, g = torch.eye(2), torch.tensor([1.0, 1.0]), torch.tensor([[2.0, 3.0]])
    # owm_scalar: P' = I − 𝟙𝟙ᵀ/2.1 = [[11, −10], [−10, 11]]/21, ‖·‖_F = √442/21 → [[11, −10], [−10, 11]]/√442
    p = update_projection(eye, r, 0.1, "owm_scalar")
    torch.testing.assert_close(p, torch.tensor([[11.0, -10.0], [-10.0, 11.0]]) / SQ442)
    assert p[0, 0].item() == pytest.approx(0.5232, abs=1e-4) and p[0, 1].item() == pytest.approx(
        -0.4757, abs=1e-4
    )
    # replace: g' = g P'ᵀ = [22 − 30, −20 + 33]/√442 = [−8, 13]/√442 = [−0.3805, 0.6183]
    torch.testing.assert_close(project_gradient(g, p, "owm_scalar"), torch.tensor([[-8.0, 13.0]]) / SQ442)
    # code_v1: denominator 0.1 + k r = 1.1 everywhere: P' = I − 𝟙𝟙ᵀ/1.1 = [[1, −10], [−10, 1]]/11,
    # ‖·‖_F = √202/11 → [[1, −10], [−10, 1]]/√202 = [[0.0704, −0.7036], [−0.7036, 0.0704]]
    p = update_projection(eye, r, 0.1, "code_v1")
    torch.testing.assert_close(p, torch.tensor([[1.0, -10.0], [-10.0, 1.0]]) / SQ202)
    # g' = [2 − 30, −20 + 3]/√202 = [−28, −17]/√202 = [−1.9701, −1.1961]
    g_code = project_gradient(g, p, "code_v1")
    torch.testing.assert_close(g_code, torch.tensor([[-28.0, -17.0]]) / SQ202)
    assert g_code.tolist()[0] == pytest.approx([-1.9701, -1.1961], abs=1e-4)
    # bb: the same P', add mode: g + g P'ᵀ = [2 − 1.9701, 3 − 1.1961] = [0.0299, 1.8039]
    torch.testing.assert_close(update_projection(eye, r, 0.1, "bb"), p)
    assert project_gradient(g, p, "bb").tolist()[0] == pytest.approx([0.0299, 1.8039], abs=1e-4)


def test_a_t_decays_within_the_epoch():
    # a_t = 0.1^(1 + i/N_b): i = 0 → 0.1; i = 1 of 4 → 0.1^1.25 = 0.0562341; i = 2 of 4 → 0.1^1.5 = 0.0316228
    assert gs_alpha(0, 4) == pytest.approx(0.1)
    assert gs_alpha(1, 4) == pytest.approx(0.0562341, rel=1e-6)
    assert gs_alpha(2, 4) == pytest.approx(0.0316228, rel=1e-6)


def test_the_first_step_of_training_is_never_projected_and_the_second_is():
    method, model = prepared()  # gs = code_v1
    batch = batch_of([[2.0, 0.0], [0.0, 2.0]], [0, 1])  # r = mean f = (1, 1) for both modalities
    first, second = sub_steps(method, model, batch, sgd(method, model))
    assert torch.equal(first.grad_after, first.grad_before)
    # second sub-step: batch 0 → a_t = 0.1, r = (1, 1) (encoder b has not stepped): P = code_v1's
    # [[1, −10], [−10, 1]]/√202 (test above), and the head-weight gradient becomes g Pᵀ
    expected_p = torch.tensor([[1.0, -10.0], [-10.0, 1.0]]) / SQ202
    torch.testing.assert_close(method.projection, expected_p)
    torch.testing.assert_close(second.grad_after, second.grad_before @ expected_p.T)
    assert not torch.equal(second.grad_after, second.grad_before)


def test_gs_off_never_projects():
    method, model = prepared(gs="off")
    for sub in sub_steps(method, model, batch_of([[2.0, 0.0], [0.0, 2.0]], [0, 1]), sgd(method, model)):
        assert torch.equal(sub.grad_after, sub.grad_before)
    assert torch.equal(method.projection, torch.eye(2))


def test_a_t_uses_the_batch_index_within_the_epoch_and_resets_each_epoch():
    method, model = prepared(gs="owm_scalar")
    # resume mid-run: 5 steps taken, batch 2 of epoch 0 next (i = 2, N_b = 4 → a = 0.1^1.5 = 0.0316228)
    method.load_state_dict({"projection": torch.eye(2), "steps": 5, "skipped": 0, "epoch": 0, "batch": 2})
    steps = method.training_steps(model, batch_of([[2.0, 0.0], [0.0, 2.0]], [0, 1]), 0)
    out = next(steps)
    out.loss.backward()
    method.after_backward(model, 0)
    # r = (1, 1), r k = 2: P' = I − 𝟙𝟙ᵀ/(2 + a) = [[1 + a, −1], [−1, 1 + a]]/(2 + a), normalised by
    # √(2(1 + a)² + 2)/(2 + a): diag (1 + a)/√(2(1+a)² + 2) = 0.5077211, off −1/√(…) = −0.4921577
    torch.testing.assert_close(
        method.projection, torch.tensor([[0.5077211, -0.4921577], [-0.4921577, 0.5077211]])
    )
    # a new epoch starts at i = 0 again
    list(method.training_steps(model, batch_of([[1.0, 0.0]], [0]), 1))
    assert method.state_dict()["epoch"] == 1 and method.state_dict()["batch"] == 1


def test_a_non_finite_update_is_skipped_counted_and_the_old_p_projects():
    method, model = prepared()
    method.load_state_dict({"projection": torch.eye(2), "steps": 1, "skipped": 0, "epoch": 0, "batch": 0})
    # r = (1, −0.1) in both sub-steps (encoder b has not stepped when b's r is taken): the code_v1
    # denominator a + k_i r_j has entry (0, 1) = 0.1 + 1·(−0.1) = 0 → −inf in P', so both updates skip
    subs = sub_steps(method, model, batch_of([[1.0, -0.1]], [0]), sgd(method, model))
    assert torch.equal(method.projection, torch.eye(2))  # kept
    for sub in subs:  # projected with the kept P = I: g Iᵀ = g
        torch.testing.assert_close(sub.grad_after, sub.grad_before)
    assert method.skipped == 2 and method.on_epoch_end(model, 0)["gs_skipped"] == 2
    assert method.on_epoch_end(model, 1)["gs_skipped"] == 0  # per-epoch count


class OtherRank(Runtime):
    """One simulated peer rank: its (Σ f, b) is added by the 'all-reduce'."""

    def __init__(self, feature_sum: list[float], count: float) -> None:
        super().__init__()
        self.peer = torch.tensor([*feature_sum, count])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.peer


def test_r_is_the_all_reduced_feature_sum_over_the_all_reduced_count():
    method, model = prepared(runtime=OtherRank([-2.0, 1.0], 1.0))
    method.load_state_dict({"projection": torch.eye(2), "steps": 1, "skipped": 0, "epoch": 0, "batch": 0})
    steps = method.training_steps(model, batch_of([[2.0, 0.0], [0.0, 2.0]], [0, 1]), 0)
    out = next(steps)
    out.loss.backward()
    method.after_backward(model, 0)
    # r = ((2, 2) + (−2, 1)) / (2 + 1) = (0, 3)/3 = (0, 1); k = P rᵀ = rᵀ, k kᵀ = k r = [[0, 0], [0, 1]],
    # a + k r = [[0.1, 0.1], [0.1, 1.1]]: P' = [[1, 0], [0, 1 − 1/1.1]] = [[1, 0], [0, 1/11]], normalised by
    # √(1 + 1/121) = √122/11: [[11, 0], [0, 1]]/√122 = [[0.9958932, 0], [0, 0.0905357]] (the local mean
    # (1, 1) would give code_v1's [[1, −10], [−10, 1]]/√202)
    torch.testing.assert_close(method.projection, torch.tensor([[11.0, 0.0], [0.0, 1.0]]) / math.sqrt(122))


# ---- §21.9 (3) the fusion


def test_per_sample_gate_matches_the_spec_values():
    u = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}
    # H_a = H(softmax(2, 0)) = 0.3653, H_b = ln 2 = 0.6931; λ_a = e^{0.6931 − 0.3653}/(1 + e^{…}) = 0.5812
    # z = 0.5812 · (2, 0) = (1.1625, 0)
    z = gated_fusion(u, "dynamic_sample")
    torch.testing.assert_close(z, torch.tensor([[1.1624545, 0.0]]))


def test_batch_gate_uses_one_entropy_per_modality_per_batch():
    u = {"a": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}
    # softmax along the batch, entropy summed over all entries:
    # H_a = H(σ(2)) + ln 2 = 0.3653339 + 0.6931472 = 1.0584810; H_b = ln 2 + H(σ(1)) = 0.6931472 + 0.5822031
    # = 1.2753503; λ_a = 1/(1 + e^{H_a − H_b}) = 0.5540058, λ_b = 0.4459942
    # z = λ_a u^a + λ_b u^b = [[1.1080116, 0], [0, 0.4459942]]
    torch.testing.assert_close(
        gated_fusion(u, "dynamic_batch"), torch.tensor([[1.1080116, 0.0], [0.0, 0.4459942]])
    )
    # per sample instead, row 2: H_a = ln 2, H_b = H(σ(1)) = 0.5822031, λ_b = 1/(1 + e^{0.5822 − 0.6931})
    # = 0.5277076 → (0, 0.5277076): the batch gate's row-2 prediction depends on row 1
    torch.testing.assert_close(
        gated_fusion(u, "dynamic_sample"), torch.tensor([[1.1624545, 0.0], [0.0, 0.5277076]])
    )


def test_fixed_weights_and_the_method_s_evaluated_prediction():
    method, model = prepared(fusion="fixed")
    with torch.no_grad():
        model.method_modules[HEAD].weight.copy_(torch.eye(2))  # u^m = f^m
    features = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 4.0]])}
    # the official two-modality weights (0.55, 0.45): z = (1.1, 0) + (0, 1.8) = (1.1, 1.8)
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([[1.1, 1.8]]))
    method, model = prepared()
    with torch.no_grad():
        model.method_modules[HEAD].weight.copy_(torch.eye(2))
    features = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([[1.1624545, 0.0]]))


def three_modalities(**params) -> tuple[MLA, MultimodalModel]:
    context = MethodContext(modalities=("a", "b", "c"), num_classes=2, epochs=3, steps_per_epoch=4)
    method = build_method("mla", params, context)
    model = MultimodalModel(
        {m: Identity(2) for m in "abc"}, ConcatFusion({m: 2 for m in "abc"}, 2), num_classes=2
    )
    model.attach_method_modules(method.build_modules(model))
    with torch.no_grad():
        model.method_modules[HEAD].weight.copy_(torch.eye(2))
        model.method_modules[HEAD].bias.fill_(5.0)  # h(0) = (5, 5): a zeroed feature would still vote
    return method, model


def test_coalitions_drop_modalities_from_the_sum_and_renormalise():
    method, model = three_modalities(fusion="fixed")  # default (0.35, 0.25, 0.4)
    f = {
        "a": torch.tensor([[1.0, -5.0]]),
        "b": torch.tensor([[-5.0, -5.0]]),
        "c": torch.tensor([[-5.0, 1.0]]),
    }
    # u = f + 5: u^a = (6, 0), u^b = (0, 0), u^c = (0, 6)
    # kept {a, c}: (0.35 u^a + 0.4 u^c)/0.75 = (2.8, 3.2); kept {a}: u^a; kept ∅: zeros
    torch.testing.assert_close(method.coalition_logits(model, f, frozenset("ac")), torch.tensor([[2.8, 3.2]]))
    torch.testing.assert_close(method.coalition_logits(model, f, frozenset("a")), torch.tensor([[6.0, 0.0]]))
    assert torch.equal(method.coalition_logits(model, f, frozenset()), torch.zeros(1, 2))
    # all kept: 0.35 (6, 0) + 0.4 (0, 6) = (2.1, 2.4)
    torch.testing.assert_close(method.logits_from_features(model, f), torch.tensor([[2.1, 2.4]]))
    # the per-sample gate over the kept ones only: u^a = (2, 0), u^b = (0, 0) with c dropped → (1.1625, 0)
    method, model = three_modalities()
    g = {
        "a": torch.tensor([[-3.0, -5.0]]),
        "b": torch.tensor([[-5.0, -5.0]]),
        "c": torch.tensor([[9.0, 0.0]]),
    }
    torch.testing.assert_close(
        method.coalition_logits(model, g, frozenset("ab")), torch.tensor([[1.1624545, 0.0]])
    )


# ---- state, label, requirements


def test_state_round_trips_and_resumes_the_same_projection():
    method, model = prepared()
    batch = batch_of([[2.0, 0.5], [0.3, 2.0]], [0, 1])
    run_batch(method, model, batch, sgd(method, model, lr=0.1))
    state = method.state_dict()
    assert state["steps"] == 2 and state["batch"] == 1 and not torch.equal(state["projection"], torch.eye(2))
    clone, _ = prepared()
    clone.load_state_dict(state)
    assert torch.equal(clone.projection, method.projection) and clone.steps == 2
    state["projection"].zero_()  # the saved state is a copy
    assert not torch.equal(method.projection, state["projection"])
    assert repr(clone.state_dict()) == repr(method.state_dict())


def test_label_names_non_default_variants():
    assert build_method("mla", {}, CONTEXT).label == "mla"
    assert build_method("mla", {"gs": False}, CONTEXT).params.gs == "off"  # YAML's bare `off`
    assert build_method("mla", {"gs": "off", "fusion": "fixed"}, CONTEXT).label == "mla[gs=off,fusion=fixed]"


def test_unequal_feature_dims_are_refused_naming_the_modalities():
    method = build_method("mla", {}, CONTEXT)
    model = MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 2)}, ConcatFusion({"a": 3, "b": 2}, 2), 2)
    with pytest.raises(ConfigError, match=r"same feature dim, but they give a=3, b=2"):
        method.build_modules(model)


def test_requirements_and_bad_weights_are_refused():
    with pytest.raises(ConfigError, match="needs at least 2 modalities"):
        MLA.requires.check("mla", "concat", True, 1)
    with pytest.raises(ConfigError, match=r"fixed_weights: 3 weights for 2 modalities \(a, b\)"):
        build_method("mla", {"fixed_weights": [0.2, 0.3, 0.5]}, CONTEXT)
    with pytest.raises(ConfigError, match="fixed_weights must be ≥ 0"):
        build_method("mla", {"fixed_weights": [-1.0, 2.0]}, CONTEXT)
    with pytest.raises(ConfigError, match="gs"):
        build_method("mla", {"gs": "nope"}, CONTEXT)


def test_in_the_trainer_each_batch_takes_one_step_per_modality(tiny_config):
    run = TrainingRun(tiny_config("method.name=mla"))
    logs = run._step(next(iter(run.loader)).to(run.runtime.device), 0)
    assert set(logs) == {"loss", "loss_strong", "loss_weak"}
    assert logs["loss"] == pytest.approx(logs["loss_strong"] + logs["loss_weak"])
    assert run.method.steps == 2 and not torch.equal(run.method.projection, torch.eye(16))
    stepped = {id(p) for p in run.optimizers.main.state}
    assert not any(id(p) in stepped for p in run.model.fusion.parameters())
    with pytest.raises(ConfigError, match="strong=16, weak=8"):
        TrainingRun(tiny_config("method.name=mla", "model.encoders.weak={name: mlp, params: {out_dim: 8}}"))
