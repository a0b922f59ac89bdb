"""MMPareto (``mmpareto``, methods-more.md §31): the §31.8 values, the MinNorm clamps, the per-tensor edit
against a hand-written formula on a tiny model, untouched heads, probes that leave ``.grad`` alone, the
probe all-reduce, the constant-lr flag, state and requirements.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.mmpareto import (
    MMPareto,
    integrated_gradient,
    min_norm_weight,
    pareto_weights,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=4, steps_per_epoch=1, seed=0)


def tiny_model() -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 3)}, ConcatFusion({"a": 3, "b": 3}, 3), 3)


def tiny_batch() -> Batch:
    torch.manual_seed(1)
    return Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        index=torch.arange(6),
    )


def dots(u: torch.Tensor, w: torch.Tensor) -> tuple[float, float, float]:
    return float(u @ u), float(u @ w), float(w @ w)


# ----------------------------------------------------------------------------------- §31.8 and MinNorm


def test_conflicting_gradients_give_the_spec_values():
    # G_mm = (1, 0), G_a = (−1, 1): v11 = 1, v12 = −1, v22 = 2, cos = −1/√2 < 0 → MinNorm
    # w_mm = (2 + 1)/(1 + 2 + 2) = 0.6; ĝ = 2(0.6·(1, 0) + 0.4·(−1, 1)) = (0.4, 0.8), ‖ĝ‖ = 0.894427
    # g_sum = (0, 1), norm 1 > 0.894 → ĝ = (0.4, 0.8)/0.894427 = (0.447214, 0.894427); ×1.5 = (0.6708, 1.3416)
    g_mm, g_a, g_sum = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 1.0])
    weights = pareto_weights(*dots(g_mm, g_a))
    assert weights.conflict and weights.w_mm == pytest.approx(0.6) and weights.w_uni == pytest.approx(0.4)
    assert weights.cos == pytest.approx(-1 / math.sqrt(2))
    final = integrated_gradient(g_mm, g_a, g_sum, weights, gamma=1.5)
    assert final.tolist() == pytest.approx([0.6708, 1.3416], abs=1e-4)


def test_agreeing_gradients_give_the_spec_values():
    # G_mm = (1, 0), G_a = (1, 1): cos = 1/√2 > 0 → (½, ½); ĝ = (1, 0) + (1, 1) = (2, 1) = g_sum (no
    # rescale, ‖g_sum‖ is not larger); final = 1.5·(2, 1) = (3, 1.5)
    g_mm, g_a = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    weights = pareto_weights(*dots(g_mm, g_a))
    assert not weights.conflict and (weights.w_mm, weights.w_uni) == (0.5, 0.5)
    assert integrated_gradient(g_mm, g_a, g_mm + g_a, weights, 1.5).tolist() == pytest.approx([3.0, 1.5])


def test_min_norm_clamps():
    # v12 ≥ v11 → 0.999 (checked first); else v12 ≥ v22 → 0.001; else (v22 − v12)/(v11 + v22 − 2 v12)
    assert min_norm_weight(1.0, 1.0, 4.0) == 0.999
    assert min_norm_weight(1.0, 1.0, 1.0) == 0.999  # both hold: the first wins
    assert min_norm_weight(4.0, 1.0, 1.0) == 0.001
    assert min_norm_weight(1.0, -1.0, 2.0) == pytest.approx(0.6)
    # inside the conflict branch: a zero multimodal gradient (cos = 0, a conflict) → w_mm = 0.999
    zero_mm = pareto_weights(0.0, 0.0, 2.0)
    assert zero_mm.conflict and zero_mm.w_mm == 0.999 and zero_mm.w_uni == pytest.approx(0.001)
    assert pareto_weights(2.0, 0.0, 0.0).w_mm == 0.001  # a zero unimodal gradient → 0.001


def test_rescale_only_grows_and_skips_a_zero_combination():
    # ‖g_sum‖ = 0.5 < ‖ĝ‖ = 2: not shrunk, final = 1.5·(2, 0) = (3, 0)
    half = pareto_weights(1.0, 1.0, 1.0)  # v12 ≥ v11 but cos = 1 > 0: equal weights
    assert (half.w_mm, half.w_uni) == (0.5, 0.5)
    e = torch.tensor([1.0, 0.0])
    assert integrated_gradient(e, e, torch.tensor([0.5, 0.0]), half, 1.5).tolist() == [3.0, 0.0]
    zero = torch.zeros(2)  # ĝ = 0: no 0/0, the tensor stays 0
    assert integrated_gradient(zero, zero, torch.ones(2), half, 1.5).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------------ end to end


def trainer_step(method: MMPareto, model: MultimodalModel, batch: Batch):
    """training_step → zero_grad → backward → (all-reduce: none on one process) → after_backward."""
    out = method.training_step(model, batch, 0)
    assert all(p.grad is None for p in model.parameters())  # probes never touch .grad
    model.zero_grad()
    out.loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.after_backward(model, 0)
    return out, before, {n: p.grad.clone() for n, p in model.named_parameters()}


def hand_gradients(model: MultimodalModel, batch: Batch, probe_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The §31.2 formula written out: per-loss gradients of each encoder, cos/MinNorm on the concatenated
    tensors, per-tensor ĝ rescaled to ‖g_sum‖ when larger, ×1.5. ``probe_scale`` multiplies the probes (as
    a stand-in all-reduce would), not g_sum."""
    model = copy.deepcopy(model)
    f = model.encode(batch.inputs)
    l_mm = F.cross_entropy(model.fuse(f), batch.labels)
    out = {}
    for m in model.modalities:
        l_m = F.cross_entropy(model.unimodal_heads[m](f[m]), batch.labels)
        params = list(model.encoders[m].parameters())
        g_mm = [probe_scale * g for g in torch.autograd.grad(l_mm, params, retain_graph=True)]
        g_m = [probe_scale * g for g in torch.autograd.grad(l_m, params, retain_graph=True)]
        g_sum = torch.autograd.grad(l_mm + l_m, params, retain_graph=True)
        a, b = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_m])
        if torch.dot(a, b) / (a.norm() * b.norm()) > 0:
            w = 0.5
        else:
            w = float((b @ b - a @ b) / (a @ a + b @ b - 2 * a @ b))  # no clamp case on this model
        for name, gm, gu, gs in zip(("weight", "bias"), g_mm, g_m, g_sum, strict=True):
            g_hat = 2 * (w * gm + (1 - w) * gu)
            if gs.norm() > g_hat.norm():
                g_hat = g_hat * gs.norm() / g_hat.norm()
            out[f"encoders.{m}.{name}"] = 1.5 * g_hat
    return out


def test_a_step_edits_each_encoder_tensor_by_the_hand_formula_and_leaves_the_heads_alone():
    model, batch = tiny_model(), tiny_batch()
    expected = hand_gradients(model, batch)
    out, before, after = trainer_step(build_method("mmpareto", {}, CONTEXT), model, batch)
    # this model and batch conflict on a (MinNorm) and agree on b (equal weights): both branches run
    assert out.logs["conflict_a"] == 1.0 and out.logs["conflict_b"] == 0.0
    assert out.logs["w_mm_b"] == 0.5 and out.logs["w_mm_a"] + out.logs["w_uni_a"] == pytest.approx(1.0)
    assert out.logs["cos_a"] < 0 < out.logs["cos_b"]
    for name, grad in after.items():
        if name in expected:
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5)
        else:  # fusion head and unimodal heads keep g_sum, bit for bit
            assert name.startswith(("fusion.", "unimodal_heads.")) and torch.equal(grad, before[name])
    assert set(expected) == {n for n in after if n.startswith("encoders.")}
    # the trained loss is ℓ_mm + ℓ_a + ℓ_b
    assert out.loss.item() == pytest.approx(
        float(out.logs["loss_fused"] + out.logs["loss_uni_a"] + out.logs["loss_uni_b"]), rel=1e-6
    )


@dataclass
class HalvingRuntime(Runtime):
    """Two ranks where the other one's probes are zero: the mean halves them (one collective expected)."""

    sizes: tuple[int, ...] = ()

    @property
    def distributed(self) -> bool:
        return True

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sizes = (*self.sizes, tensor.numel())
        return tensor * 0.5


def test_the_weights_and_the_edit_use_the_all_reduced_probes():
    # 2 × (4·3 + 3 + 2·3 + 3) = 48 probe values in one flat all-reduce; ĝ is built from the halved
    # probes (then rescaled to the local g_sum where that is larger)
    model, batch = tiny_model(), tiny_batch()
    runtime = HalvingRuntime()
    method = MMPareto(MMPareto.Params(), MethodContext(("a", "b"), 3, 4, 1, 0, runtime))
    expected = hand_gradients(model, batch, probe_scale=0.5)
    _, _, after = trainer_step(method, model, batch)
    assert runtime.sizes == (48,)
    for name, grad in expected.items():
        torch.testing.assert_close(after[name], grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ flags and rules


def test_constant_lr_flag_stops_the_scheduler():
    default = build_method("mmpareto", {}, CONTEXT)
    assert default.scheduler_should_step(0) and default.label == "mmpareto"
    constant = build_method("mmpareto", {"constant_lr": True}, CONTEXT)
    assert not constant.scheduler_should_step(0) and constant.label == "mmpareto[constant lr]"
    assert default.params.gamma == 1.5 and MMPareto.fidelity == "official-code"


def test_evaluation_is_the_fusion_head_and_there_is_no_state():
    model, batch = tiny_model(), tiny_batch()
    method = build_method("mmpareto", {}, CONTEXT)
    features = model.encode(batch.inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))
    assert method.state_dict() == {}
    method.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        method.load_state_dict({"x": 1})


def test_needs_two_modalities_and_accepts_any_fusion_head(tiny_config):
    with pytest.raises(ConfigError, match=r"method 'mmpareto' needs at least 2 modalities"):
        MMPareto.requires.check("mmpareto", "concat", True, 1)
    assert tiny_config("method.name=mmpareto", "model.fusion.name=film").method.name == "mmpareto"
