"""DGL (methods-more.md §33.1): the disentangled gradients by hand (head: fused CE only; encoders:
α × unimodal CE only), the zero-padded unimodal logits with a detached head, the clip at 40, evaluation,
requirements. Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion, ConcatMLPFusion, ConcatMLPParams
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method
from midasbench.methods.base import Requirements
from midasbench.methods.dgl import padded_logits

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=3, steps_per_epoch=1)
SIG1 = 1 / (1 + math.exp(-1.0))  # σ(1) = 0.7310586


class Scalar(nn.Linear):
    """f = w x + b with w = 1, b = 0 (d = 1)."""

    def __init__(self) -> None:
        super().__init__(1, 1)
        self.out_dim = 1
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()


def hand_model() -> MultimodalModel:
    """f_a = x_a, f_b = x_b; concat head W = I (class 0 reads f_a, class 1 reads f_b), c = 0."""
    model = MultimodalModel({"a": Scalar(), "b": Scalar()}, ConcatFusion({"a": 1, "b": 1}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.eye(2))
        model.fusion.linear.bias.zero_()
    return model


def hand_batch() -> Batch:
    return Batch(
        inputs={"a": torch.tensor([[1.0]]), "b": torch.tensor([[2.0]])},
        labels=torch.tensor([0]),
        index=torch.arange(1),
    )


def test_gradients_are_disentangled_by_hand():
    model, method = hand_model(), build_method("dgl", {"alpha": 4.0}, CONTEXT)
    out = method.training_step(model, hand_batch(), epoch=0)
    # fused z = (f_a, f_b) = (1, 2), y = 0: CE = log(e + e²) − 1 = log(1 + e) = 1.3132617
    # u^a = W[f_a; 0] = (1, 0): CE = log(1 + e) − 1 = 0.3132617; u^b = (0, 2): CE = log(1 + e²) = 2.1269280
    # L = 1.3132617 + 4 (0.3132617 + 2.1269280) = 11.0740205
    assert out.logs["loss_fused"] == pytest.approx(math.log(1 + math.e), abs=1e-6)
    assert out.logs["loss_uni_a"] == pytest.approx(0.3132617, abs=1e-6)
    assert out.logs["loss_uni_b"] == pytest.approx(2.1269280, abs=1e-6)
    assert out.loss.item() == pytest.approx(11.0740205, abs=1e-5)
    out.loss.backward()
    # head: fused CE only. ∂CE/∂z = softmax(1, 2) − e_0 = (−σ(1), σ(1)) = (−0.7310586, 0.7310586)
    # ∂/∂W = (∂CE/∂z) ⊗ (f_a, f_b) = [[−0.7311, −1.4621], [0.7311, 1.4621]], ∂/∂c = (−0.7311, 0.7311)
    w_grad = torch.tensor([[-SIG1, -2 * SIG1], [SIG1, 2 * SIG1]])
    torch.testing.assert_close(model.fusion.linear.weight.grad, w_grad)
    torch.testing.assert_close(model.fusion.linear.bias.grad, torch.tensor([-SIG1, SIG1]))
    # encoder a: α ∂CE(u^a)/∂f_a = 4 (softmax(1, 0) − e_0) · W[:, 0] = 4 (σ(1) − 1) = −1.0757656; x_a = 1
    torch.testing.assert_close(model.encoders["a"].weight.grad, torch.tensor([[4 * (SIG1 - 1)]]))
    torch.testing.assert_close(model.encoders["a"].bias.grad, torch.tensor([4 * (SIG1 - 1)]))
    # encoder b: 4 (softmax(0, 2)_1) · W[1, 1] = 4 · 0.8807971 = 3.5231884 (bias); × x_b = 2 → 7.0463768
    p1 = math.exp(2) / (1 + math.exp(2))
    torch.testing.assert_close(model.encoders["b"].weight.grad, torch.tensor([[8 * p1]]))
    torch.testing.assert_close(model.encoders["b"].bias.grad, torch.tensor([4 * p1]))
    assert all(p.grad is None for p in model.unimodal_heads.parameters())


def test_padded_logits_use_a_detached_head_for_any_head():
    torch.manual_seed(0)
    head = ConcatMLPFusion({"a": 3, "b": 2}, 4, ConcatMLPParams(hidden=5))  # not decomposable
    features = {"a": torch.randn(6, 3, requires_grad=True), "b": torch.randn(6, 2, requires_grad=True)}
    u = padded_logits(head, features, "a")
    torch.testing.assert_close(u, head({"a": features["a"], "b": torch.zeros(6, 2)}).detach())
    u.sum().backward()
    assert all(p.grad is None for p in head.parameters())  # the head's share is discarded
    assert features["a"].grad is not None and features["b"].grad is None  # b is zero-padded


def test_clip_at_the_given_norm_on_all_trained_parameters():
    model, method = hand_model(), build_method("dgl", {}, CONTEXT)
    assert (
        method.params.grad_clip == 40.0 and method.params.alpha == 4.0 and method.params.clip_scope == "all"
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.encoders["a"].weight.grad.fill_(30.0)
    model.fusion.linear.bias.grad.copy_(torch.tensor([40.0, 0.0]))  # norm √(30² + 40²) = 50 → × 40/50
    model.unimodal_heads["a"].bias.grad.fill_(100.0)  # not a DGL parameter: untouched
    method.after_backward(model, epoch=0)
    assert model.encoders["a"].weight.grad.item() == pytest.approx(24.0, rel=1e-5)
    torch.testing.assert_close(model.fusion.linear.bias.grad, torch.tensor([32.0, 0.0]), rtol=1e-5, atol=0)
    assert torch.equal(model.unimodal_heads["a"].bias.grad, torch.full((2,), 100.0))
    # below the norm nothing changes; null disables the clip
    build_method("dgl", {"grad_clip": None}, CONTEXT).after_backward(model, epoch=0)
    assert model.encoders["a"].weight.grad.item() == pytest.approx(24.0, rel=1e-5)


def test_trains_encoders_and_head_and_evaluates_with_the_fusion_head():
    model, method = hand_model(), build_method("dgl", {}, CONTEXT)
    names = {id(p) for p in method.trainable_parameters(model)}
    assert names == {id(p) for p in [*model.encoders.parameters(), *model.fusion.parameters()]}
    features = model.encode(hand_batch().inputs)
    # evaluation = W [f_a; f_b] + c = (1, 2)
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([[1.0, 2.0]]))
    assert method.state_dict() == {}
    assert method.fidelity == "official-code"


def test_needs_two_modalities():
    assert build_method("dgl", {}, CONTEXT).requires == Requirements(min_modalities=2)
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        build_method("dgl", {}, CONTEXT).requires.check("dgl", "concat", True, 1)


def test_fused_ce_never_reaches_the_encoders():
    model, method = hand_model(), build_method("dgl", {"alpha": 0.0}, CONTEXT)
    method.training_step(model, hand_batch(), epoch=0).loss.backward()
    # α = 0: only the fused CE on detached features remains, so the encoders get zero gradient
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.encoders.parameters())
