"""InfoReg (methods-more.md §33 item 2): coefficients, the proximal gradient, the Fisher window, the anchor,
state round trip, evaluation and requirements."""

import pytest
import torch
from tests_support_models import leading_a_batch, leading_a_model

from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method
from midasbench.methods.inforeg import (
    InfoReg,
    add_proximal_gradient,
    regulation_coefficients,
    step_trace,
    window_growth,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=8, steps_per_epoch=2)


def inforeg(**params) -> InfoReg:
    return build_method("inforeg", params, CONTEXT)


def step(method: InfoReg, model: MultimodalModel, shift_a: float = 0.0):
    """One step: loss, backward, encoder a moved by ``shift_a`` (after backward), then after_backward.
    Returns (grads before the edit, grads after, logs)."""
    out = method.training_step(model, leading_a_batch(), 0)
    model.zero_grad()
    out.loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.encoders["a"].parameters():
            p.add_(shift_a)
    method.after_backward(model, 0)
    after = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return before, after, out.logs


# ---------------------------------------------------------------------------------------- coefficients


def test_coefficient_when_the_first_modality_leads():
    # S = (3, 1): β_1 = 0.95 exp(tanh 2) = 0.95 exp(0.96402758) = 0.95 · 2.62223650 = 2.49112468, β_2 = 0
    assert regulation_coefficients([3.0, 1.0], 0.95, 0.1) == pytest.approx([2.49112468, 0.0], abs=1e-8)


def test_coefficient_when_the_second_modality_leads_and_a_tie():
    # S = (1, 1.5): β_2 = 0.1 exp(tanh 0.5) = 0.1 exp(0.46211716) = 0.1 · 1.58743127 = 0.15874313, β_1 = 0
    assert regulation_coefficients([1.0, 1.5], 0.95, 0.1) == pytest.approx([0.0, 0.15874313], abs=1e-8)
    assert regulation_coefficients([2.0, 2.0], 0.95, 0.1) == [0.0, 0.0]


def test_scores_from_sliced_logits_give_the_logged_beta():
    # s^a_i = 5 e_{y_i}: true-class prob σ(5) = 0.99330715, S_a = 4 · 0.99330715 = 3.97322860
    # s^b_i = (0, 0.5): y = 0 → σ(−0.5) = 0.37754067, y = 1 → σ(0.5) = 0.62245933; S_b = 2 · 1 = 2
    # β_a = 0.95 exp(tanh(1.97322860)) = 0.95 exp(0.96208653) = 0.95 · 2.61715154 = 2.48629396
    _, _, logs = step(inforeg(), leading_a_model())
    assert logs["beta_a"] == pytest.approx(2.48629396, abs=1e-6)
    assert logs["beta_b"] == 0.0


# ------------------------------------------------------------------------------------ proximal gradient


def test_add_proximal_gradient_by_hand():
    # θ = (1, 2), θ̂ = (0.5, 2.5), g = (0.1, 0.1), β = 2: g + 2 (θ − θ̂) = (0.1 + 1, 0.1 − 1) = (1.1, −0.9)
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    theta.grad = torch.tensor([0.1, 0.1])
    add_proximal_gradient([("w", theta)], {"w": torch.tensor([0.5, 2.5])}, beta=2.0)
    torch.testing.assert_close(theta.grad, torch.tensor([1.1, -0.9]))
    fresh = torch.nn.Parameter(torch.tensor([1.0]))  # no gradient yet: the proximal gradient alone
    add_proximal_gradient([("w", fresh)], {"w": torch.tensor([0.0])}, beta=0.5)
    assert fresh.grad.tolist() == [0.5]


def test_edit_adds_beta_times_theta_minus_anchor_to_the_leading_encoder_only():
    # anchor at epoch start, encoder a then moved by 0.25: every a-gradient gains β_a · 0.25 (β_a above)
    model, method = leading_a_model(), inforeg()
    method.on_epoch_start(model, 0)
    before, after, logs = step(method, model, shift_a=0.25)
    for name in ("encoders.a.weight", "encoders.a.bias"):
        expected = before[name] + logs["beta_a"] * 0.25
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
    for name in before:
        if not name.startswith("encoders.a."):
            assert torch.equal(after[name], before[name]), name  # b's encoder and the head untouched
    # the step's Fisher trace of a reads the edited gradient: mean(g_w²) of its single Linear weight
    assert float(method.epoch_trace["a"]) == pytest.approx(float(after["encoders.a.weight"].pow(2).mean()))


def test_unimodal_heads_are_not_trained_and_the_loss_is_fused_plus_sliced():
    model, method = leading_a_model(), inforeg()
    out = method.training_step(model, leading_a_batch(), 0)
    logs = {k: float(v) for k, v in out.logs.items()}
    assert out.loss.item() == pytest.approx(logs["loss_fused"] + logs["loss_a"] + logs["loss_b"], abs=1e-6)
    names = {
        n for n, p in model.named_parameters() if any(p is q for q in method.trainable_parameters(model))
    }
    assert not any(n.startswith("unimodal_heads.") for n in names)


# ----------------------------------------------------------------------------------------- the window


def test_window_growth_by_hand():
    assert window_growth([], 10) == 1.0  # epoch 0: k = 1 (official)
    # one epoch: padded (0 × 10, 2): new = 2/10, old = 0 → k = 1
    assert window_growth([2.0], 10) == pytest.approx(1.0)
    # H = 2, F = (1, 2, 3, 3): new = (3 + 3)/2 = 3, old = (2 + 3)/2 = 2.5 → k = 0.5/3 = 0.16666667
    assert window_growth([1.0, 2.0, 3.0, 3.0], 2) == pytest.approx(1 / 6)
    # ten epochs of 1 then 1.5: new = (9 + 1.5)/10 = 1.05, old = 1 → k = 0.05/1.05 = 0.04761905 (< 0.05)
    assert window_growth([1.0] * 10 + [1.5], 10) == pytest.approx(0.04761905, abs=1e-8)
    # then 1.6: new = 1.06, old = 1 → k = 0.06/1.06 = 0.05660377 (> 0.05)
    assert window_growth([1.0] * 10 + [1.6], 10) == pytest.approx(0.05660377, abs=1e-8)
    assert window_growth([0.0, 0.0], 10) == 0.0  # a zero trace closes the window


def test_step_trace_by_hand():
    # g_1 = [[1, 2], [3, 4]]: mean g² = (1 + 4 + 9 + 16)/4 = 7.5; g_2 = [[2]]: 4 → 11.5
    w1, w2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1, 1))
    w1.grad, w2.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0]])
    assert float(step_trace([w1, w2])) == 11.5


def test_window_opens_and_closes_from_hand_made_traces():
    model = leading_a_model()
    method = inforeg()
    method.history = {"a": [1.0] * 10 + [1.5], "b": [1.0] * 11}  # k_a = 0.0476 < 0.05: closed
    method.on_epoch_start(model, 11)
    before, after, logs = step(method, model, shift_a=0.25)
    assert logs["beta_a"] == 0.0 and all(torch.equal(after[n], before[n]) for n in before)

    method.history = {"a": [1.0] * 10 + [1.6], "b": [1.0] * 11}  # k_a = 0.0566 > 0.05: open
    method.on_epoch_start(model, 11)
    assert method.window_open("a") and method.window_open("b")  # official: a's trace gates both
    _, _, logs = step(method, model)
    assert logs["beta_a"] > 0

    each = inforeg(window_test="each")  # generalisation: b is gated by its own trace (k_b = 0)
    each.history = {"a": [1.0] * 10 + [1.6], "b": [1.0] * 11}
    each.on_epoch_start(model, 11)
    assert each.window_open("a") and not each.window_open("b")


def test_epoch_end_appends_the_trace_that_the_next_epoch_tests():
    model, method = leading_a_model(), inforeg()
    method.on_epoch_start(model, 0)
    step(method, model)
    trace = float(method.epoch_trace["a"])
    logs = method.on_epoch_end(model, 0)
    assert method.history["a"] == [trace] and logs["fisher_trace_a"] == trace and logs["window_k_a"] == 1.0
    method.on_epoch_start(model, 1)
    assert method.growth["a"] == pytest.approx(1.0)  # (trace/10 − 0)/(trace/10)
    assert float(method.epoch_trace["a"]) == 0.0


# ----------------------------------------------------------------------------------------- the anchor


def test_anchor_is_refreshed_at_each_epoch_start():
    model, method = leading_a_model(), inforeg()
    method.on_epoch_start(model, 0)
    with torch.no_grad():
        model.encoders["a"].weight.add_(1.0)
    assert torch.equal(method.anchors["a"]["weight"], torch.eye(3))  # a copy, not a view
    method.on_epoch_start(model, 1)
    assert torch.equal(method.anchors["a"]["weight"], torch.eye(3) + 1.0)
    assert set(method.anchors) == {"a", "b"} and set(method.anchors["a"]) == {"weight", "bias"}


# ------------------------------------------------------------------------------------ state, eval, refusals


def test_state_round_trip_resumes_exactly():
    model, method = leading_a_model(), inforeg()
    method.on_epoch_start(model, 0)
    step(method, model)
    method.on_epoch_end(model, 0)
    method.on_epoch_start(model, 1)
    with torch.no_grad():
        model.encoders["a"].bias.add_(0.5)  # the parameters moved since the anchor
    step(method, model)
    state = method.state_dict()
    resumed = inforeg()
    resumed.load_state_dict(state)
    assert resumed.history == method.history and resumed.growth == method.growth
    assert float(resumed.epoch_trace["a"]) == float(method.epoch_trace["a"])
    for m in ("a", "b"):
        for n, t in method.anchors[m].items():
            assert torch.equal(resumed.anchors[m][n], t)
    twin = leading_a_model()
    twin.load_state_dict(model.state_dict())
    _, after, _ = step(method, model)
    _, after_resumed, _ = step(resumed, twin)
    assert all(torch.equal(after[n], after_resumed[n]) for n in after)
    assert float(resumed.epoch_trace["a"]) == float(method.epoch_trace["a"])


def test_evaluation_is_the_fused_head():
    model, method = leading_a_model(), inforeg()
    features = model.encode(leading_a_batch().inputs)
    assert torch.equal(method.logits_from_features(model, features), model.fuse(features))


def test_requirements_two_modalities_and_a_decomposable_head(tiny_config):
    with pytest.raises(ConfigError, match="exactly 2 modalities"):
        InfoReg.requires.check("inforeg", "concat", True, 3)
    with pytest.raises(ConfigError, match=r"method 'inforeg' needs a decomposable fusion head"):
        tiny_config("method.name=inforeg", "model.fusion.name=film")
