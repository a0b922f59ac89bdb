"""MBSD (methods-more.md §24): the §24.8 values, the correctness mask, gradients through the weights, the
M = 3 pair average, the full loss on a hand-set model, evaluation and requirements."""

import pytest
import torch
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method
from midasbench.methods.mbsd import MBSD, mbsd_loss, pair_terms

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=2, epochs=3, steps_per_epoch=1)

# §24.8: C = 2, s^a = (2, 0), s^v = (0, 1), y = 0
S_A, S_V, Y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
# p^a_0 = e²/(e² + 1) = 0.8807971 (a correct), p^v_0 = 1/(1 + e) = 0.2689414
# w = 0.8807971 − 0.2689414 = 0.6118557; RS = ((2 − 0)² + (0 − 1)²)/2 = 2.5; w·RS = 1.5296391
# K = pw (log pw − ps) = 0.2689414 (−1.3132617 − 0.8807971) = −0.5900733; w·K = −0.3610397
W_RS, W_K = 1.5296391, -0.3610397


def unit_model() -> MultimodalModel:
    """Identity encoders (d = 2 each), W = [I | I], c = 0: s^a = f^a, s^v = f^v, z = f^a + f^v."""
    model = MultimodalModel({"a": Identity(2), "v": Identity(2)}, ConcatFusion({"a": 2, "v": 2}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[1.0, 0, 1, 0], [0, 1.0, 0, 1]]))
        model.fusion.linear.bias.zero_()
    return model


def test_spec_unit_values():
    rs, k = pair_terms(S_A, S_V, Y)
    assert rs.item() == pytest.approx(W_RS, abs=1e-5)
    assert k.item() == pytest.approx(W_K, abs=1e-5)


def test_both_terms_vanish_when_neither_modality_is_correct():
    s_a = torch.tensor([[0.0, 2.0]], requires_grad=True)  # pred 1 ≠ y = 0
    s_v = torch.tensor([[0.0, 1.0]], requires_grad=True)  # pred 1 ≠ y = 0
    rs, k = pair_terms(s_a, s_v, Y)
    assert rs.item() == 0.0 and k.item() == 0.0
    (rs + k).backward()
    assert torch.equal(s_a.grad, torch.zeros(1, 2)) and torch.equal(s_v.grad, torch.zeros(1, 2))


def test_batch_mean_over_masked_and_unmasked_samples():
    # sample 1 is §24.8, sample 2 has neither modality right: (1/b) Σ with b = 2 halves the values
    s_a = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    s_v = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    rs, k = pair_terms(s_a, s_v, torch.tensor([0, 0]))
    assert rs.item() == pytest.approx(W_RS / 2, abs=1e-5) and k.item() == pytest.approx(W_K / 2, abs=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_flows_through_the_weights_unless_detached(detach):
    s_a = S_A.clone().requires_grad_()
    rs, _ = pair_terms(s_a, S_V, Y, detach_weights=detach)
    rs.backward()
    # ∂(w RS)/∂s^a = w ∂RS/∂s^a + RS ∂w/∂s^a; ∂RS/∂s^a = 2 (s^a − s^v)/C = (2, −1)
    # w (2, −1) = (1.2237113, −0.6118557); ∂w/∂s^a = ∂p^a_0/∂s^a = p0 (1 − p0) (1, −1) = 0.1049936 (1, −1)
    # RS ∂w/∂s^a = 2.5 · 0.1049936 (1, −1) = (0.2624840, −0.2624840)
    expected = [1.2237113, -0.6118557] if detach else [1.2237113 + 0.2624840, -0.6118557 - 0.2624840]
    torch.testing.assert_close(s_a.grad, torch.tensor([expected]), atol=1e-5, rtol=0)


def test_three_modalities_average_pairs_on_probabilities():
    # shares (a, v, a'): a' = a, so pair (a, a') has w = |p − p| = 0; pairs (a, v) and (a', v) are §24.8
    # RS on probabilities (BB M = 3): ((0.8807971 − 0.2689414)² + (0.1192029 − 0.7310586)²)/2
    #   = 0.6118557² = 0.3743673; w·RS = 0.6118557 · 0.3743673 = 0.2290588; mean over 3 pairs: ×2/3
    shares = {"a": S_A, "v": S_V, "c": S_A.clone()}
    fused = S_A + S_V + S_A
    _, logs = mbsd_loss(fused, shares, Y)
    assert logs["loss_rs"] == pytest.approx(2 / 3 * 0.2290588, abs=1e-5)
    assert logs["loss_kl"] == pytest.approx(2 / 3 * W_K, abs=1e-5)
    _, forced = mbsd_loss(fused, shares, Y, rs_space="logits")  # logits: 2/3 · 1.5296391
    assert forced["loss_rs"] == pytest.approx(2 / 3 * W_RS, abs=1e-5)


def test_training_step_loss_by_hand():
    # f^a = (2, 0), f^v = (0, 1): s^a = (2, 0), s^v = (0, 1), z = (2, 1), y = 0
    # CE(z) = log(1 + e^−1) = 0.3132617; CE(s^a) = log(1 + e^−2) = 0.1269280; CE(s^v) = log(1 + e) = 1.3132617
    # L = 0.3132617 + 0.1269280 + 1.3132617 + 1.5296391 − 0.3610397 = 2.9220508
    model = unit_model()
    method = build_method("mbsd", {}, CONTEXT)
    batch = Batch(inputs={"a": S_A, "v": S_V}, labels=Y, index=torch.arange(1))
    out = method.training_step(model, batch, epoch=0)
    assert out.loss.item() == pytest.approx(2.9220508, abs=1e-5)
    assert out.logs["loss_unimodal"] == pytest.approx(0.1269280 + 1.3132617, abs=1e-5)
    out.loss.backward()
    trained = list(method.trainable_parameters(model))
    assert all(torch.isfinite(p.grad).all() for p in trained)
    assert not any(p is q for p in trained for q in model.unimodal_heads.parameters())


def test_evaluation_is_the_fused_head_and_state_is_empty():
    model = unit_model()
    method = build_method("mbsd", {}, CONTEXT)
    features = {"a": S_A, "v": S_V}
    assert torch.equal(method.logits_from_features(model, features), model.fuse(features))
    assert method.state_dict() == {}
    method.load_state_dict({})


def test_requirements():
    with pytest.raises(ConfigError, match="decomposable"):
        MBSD.requires.check("mbsd", "concat_mlp", False, 2)
    with pytest.raises(ConfigError, match="at least 2"):
        MBSD.requires.check("mbsd", "concat", True, 1)
    MBSD.requires.check("mbsd", "concat", True, 3)
