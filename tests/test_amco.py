"""AMCo (``amco``, methods.md §8): the p_t schedules (§8.2 progress-based and §8.1 BB's l_t), the mask zero
counts, the dependence rule on the 2C-way softmax mass, the co-optimization loss with unmasked shares, the
BB logit-mask variant with L*, evaluation without masks, the window, state and requirements. Expected
values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.amco import (
    LINEAR_STAR,
    bb_level,
    dependent_modalities,
    keep_mask,
    mask_ratio,
    mass_sums,
    training_progress,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=10, steps_per_epoch=4, seed=5)
LOG_1_E1 = math.log(1 + math.exp(-1))  # CE of logits (1, 0) at label 0 = 0.31326169
LOG_1_E2 = math.log(1 + math.exp(-2))  # CE of logits (2, 0) at label 0 = 0.12692801


def model_ab(d_a: int = 2) -> MultimodalModel:
    """Identity encoders, two classes, zero bias: class 0 = Σ a_k (every a channel), class 1 = b."""
    fusion = ConcatFusion({"a": d_a, "b": 1}, 2)
    model = MultimodalModel({"a": Identity(d_a), "b": Identity(1)}, fusion, 2)
    with torch.no_grad():
        weight = torch.zeros(2, d_a + 1)
        weight[0, :d_a] = 1.0
        weight[1, d_a] = 1.0
        model.fusion.linear.weight.copy_(weight)
        model.fusion.linear.bias.zero_()
    return model


def batch_ab(d_a: int = 2) -> Batch:
    """Row 0: a = 1, b = 0, y = 0; row 1: a = 0, b = 1, y = 1. With d_a = 2 the shares are
    s^a = [(2, 0), (0, 0)] and s^b = [(0, 0), (0, 1)]."""
    a = torch.stack([torch.ones(d_a), torch.zeros(d_a)])
    return Batch(
        inputs={"a": a, "b": torch.tensor([[0.0], [1.0]])}, labels=torch.tensor([0, 1]), index=torch.arange(2)
    )


def amco(context: MethodContext = CONTEXT, **params):
    return build_method("amco", params, context)


def attached(method, model: MultimodalModel) -> MultimodalModel:
    model.attach_method_modules(method.build_modules(model))
    return model


def fused_inputs(model: MultimodalModel) -> list[dict[str, torch.Tensor]]:
    """Record the features every call of the fusion head sees."""
    seen: list[dict[str, torch.Tensor]] = []
    model.fusion.register_forward_pre_hook(
        lambda _m, args: seen.append({k: v.detach() for k, v in args[0].items()})
    )
    return seen


# ---- §8.2 / §8.1 schedules


def test_progress_schedule_by_hand():
    # E = 10, 4 steps per epoch, ε = 0.3, p_max = 0.5
    # epoch 0 step 0: τ = 0 → p = 0
    assert mask_ratio(training_progress(0, 0, 4, 10), 0.3, 0.5) == 0.0
    # epoch 1 step 2: τ = (1 + 2/4)/10 = 0.15 → 0.5 · sin(π/2 · 0.15/0.3) = 0.5 · sin(π/4) = 0.35355339
    assert training_progress(1, 2, 4, 10) == pytest.approx(0.15)
    assert mask_ratio(0.15, 0.3, 0.5) == pytest.approx(0.5 * math.sqrt(0.5), abs=1e-12)
    # epoch 3 step 0: τ = 0.3 = ε → 0.5 · sin(π/2) = 0.5; later epochs stay at p_max
    assert mask_ratio(training_progress(3, 0, 4, 10), 0.3, 0.5) == pytest.approx(0.5, abs=1e-12)
    assert mask_ratio(training_progress(8, 3, 4, 10), 0.3, 0.5) == pytest.approx(0.5, abs=1e-12)


def test_bb_schedule_by_hand():
    # l_t = k·e/10 at batch k of epoch e; p_t = sin(π/2 · min(0.3, l_t)/0.3); N = int(p_t · C), C = 6
    assert [bb_level(0, k) for k in (0, 5, 100)] == [0.0, 0.0, 0.0]  # epoch 0: p_t = 0 throughout (defect i)
    # epoch 1 batch 1: l = 0.1 → sin(π/6) = 0.5 → N = 3
    assert mask_ratio(bb_level(1, 1), 0.3) == pytest.approx(0.5, abs=1e-12)
    assert int(mask_ratio(bb_level(1, 1), 0.3) * 6) == 3
    # epoch 1 batch 3: l = 0.3 → p = 1 → N = 6 (every class logit zeroed, defect i)
    assert int(mask_ratio(bb_level(1, 3), 0.3) * 6) == 6
    # epoch 2 batch 1: l = 0.2 → sin(π/3) = 0.8660 → N = int(5.196) = 5
    assert mask_ratio(bb_level(2, 1), 0.3) == pytest.approx(math.sqrt(3) / 2, abs=1e-12)
    assert int(mask_ratio(bb_level(2, 1), 0.3) * 6) == 5


def test_keep_mask_zero_counts():
    g = torch.Generator().manual_seed(0)
    # ⌊0.5 · 512⌋ = 256 zeros; ⌊0.35355 · 8⌋ = 2; 0 and the full width
    for width, zeros in ((512, 256), (8, 2), (8, 0), (3, 3)):
        mask = keep_mask(width, zeros, g)
        assert mask.shape == (width,) and mask.dtype == torch.float32
        assert int((mask == 0).sum()) == zeros and int((mask == 1).sum()) == width - zeros


# ---- §8.1 dependence rule


def test_dependence_on_the_2c_way_softmax_mass_by_hand():
    # row 0: s^a = (ln 3, 0), s^b = (0, 0): exp = (3, 1, 1, 1) / 6 → mass a = 4/6, b = 2/6
    # row 1: all zero logits → 1/2 each. μ_a = (2/3 + 1/2)/2 = 7/12 > 0.5 → a dependent; μ_b = 5/12
    shares = {"a": torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]), "b": torch.zeros(2, 2)}
    sums = mass_sums(shares)
    torch.testing.assert_close(sums, torch.tensor([2 / 3 + 1 / 2, 1 / 3 + 1 / 2]))
    assert dependent_modalities(sums, 2, 0.5) == [True, False]
    # a 0.6 threshold: 7/12 = 0.583 is not above it, nobody is dependent; equal masses are never dependent
    assert dependent_modalities(sums, 2, 0.6) == [False, False]
    assert (
        dependent_modalities(mass_sums({"a": torch.zeros(3, 2), "b": torch.zeros(3, 2)}), 3, 0.5)
        == [False] * 2
    )


class OtherRank(Runtime):
    """A stand-in second rank: its two rows put all softmax mass on b (mass_a 0, mass_b 2, 2 rows)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + torch.tensor([0.0, 2.0, 2.0])


def test_dependence_uses_masses_and_counts_summed_over_ranks():
    model, batch = model_ab(), batch_ab()
    # local: mass_a = (e²+1)/(e²+3) + 2/(3+e) = 0.80748 + 0.34968 = 1.15716, mass_b = 0.84284, 2 rows
    # global: μ_a = 1.15716/4 = 0.289 (not dependent), μ_b = (0.84284 + 2)/4 = 0.711 → b dependent
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": OtherRank()})
    method = amco(context)
    out = method.training_step(model, batch, epoch=3)
    mass_a = (math.e**2 + 1) / (math.e**2 + 3) + 2 / (3 + math.e)
    assert out.logs["mass_a"] == pytest.approx(mass_a / 4, rel=1e-6)
    assert out.logs["mass_b"] == pytest.approx((2 - mass_a + 2) / 4, rel=1e-6)
    assert (out.logs["masked_a"], out.logs["masked_b"]) == (0.0, 1.0)


# ---- §8.2 feature mask and co-optimization


def test_feature_mask_loss_by_hand_with_unmasked_shares():
    model, batch = model_ab(), batch_ab()
    seen = fused_inputs(model)
    method = amco()
    # μ_a = ((e²+1)/(e²+3) + 2/(3+e))/2 = (0.80748 + 0.34968)/2 = 0.57858 > 0.5 → a dependent (this batch)
    # epoch 3 step 0: τ = 0.3 → p_t = 0.5 → ⌊0.5 · 2⌋ = 1 zero in a's channel mask
    out = method.training_step(model, batch, epoch=3)
    assert out.logs["p_t"] == pytest.approx(0.5)
    assert (out.logs["masked_a"], out.logs["masked_b"]) == (1.0, 0.0)
    masked_a = seen[0]["a"]
    assert masked_a[0].tolist() in ([1.0, 0.0], [0.0, 1.0]) and masked_a[1].tolist() == [0.0, 0.0]
    # masked z: row 0 (1, 0) at y 0 → log(1 + e⁻¹); row 1 (0, 1) at y 1 → log(1 + e⁻¹): CE(z) = log(1 + e⁻¹)
    # unmasked shares: CE(s^a) = (log(1 + e⁻²) + log 2)/2, CE(s^b) = (log 2 + log(1 + e⁻¹))/2
    # (masked s^a would give log(1 + e⁻¹) for row 0 instead of log(1 + e⁻²))
    # L = 1.5 log(1 + e⁻¹) + ½ log(1 + e⁻²) + log 2 = 0.46989 + 0.06346 + 0.69315 = 1.22650
    expected = 1.5 * LOG_1_E1 + 0.5 * LOG_1_E2 + math.log(2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.logs["loss_fused"] == pytest.approx(LOG_1_E1, rel=1e-6)
    # both a channels (the masked one too) get a gradient, through the unmasked co-optimization share
    out.loss.backward()
    assert (model.encoders["a"].weight.grad.abs().sum(1) > 0).all()


def test_feature_mask_zero_count_follows_p_t():
    model, batch = model_ab(d_a=8), batch_ab(d_a=8)
    seen = fused_inputs(model)
    method = amco()
    method.on_epoch_start(model, 1)
    method.step = 2  # epoch 1 step 2: τ = 0.15 → p_t = 0.35355 → ⌊0.35355 · 8⌋ = 2 zeros in a's mask
    out = method.training_step(model, batch, epoch=1)
    assert out.logs["masked_a"] == 1.0
    assert int((seen[0]["a"][0] == 0).sum()) == 2
    assert method.step == 3
    # epoch 0 step 0: p_t = 0 → no zero although a is dependent
    method.on_epoch_start(model, 0)
    method.training_step(model, batch, epoch=0)
    assert int((seen[1]["a"][0] == 0).sum()) == 0


def test_outside_the_window_is_fused_cross_entropy_only():
    model, batch = model_ab(), batch_ab()
    method = amco(modulation_starts=4)
    out = method.training_step(model, batch, epoch=3)
    # unmasked z: row 0 (2, 0) at y 0 → log(1 + e⁻²); row 1 (0, 1) at y 1 → log(1 + e⁻¹)
    assert out.loss.item() == pytest.approx((LOG_1_E2 + LOG_1_E1) / 2, rel=1e-6)
    assert "p_t" not in out.logs


def test_evaluation_is_unmasked_fusion():
    model, batch = model_ab(), batch_ab()
    method = amco()
    model = attached(method, model)
    assert not model.method_modules  # the feature variant owns no module
    method.training_step(model, batch, epoch=5)
    logits = method.logits_from_features(model, model.encode(batch.inputs))
    torch.testing.assert_close(logits, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))


def test_unimodal_heads_are_not_trained():
    model = model_ab()
    names = {id(p) for p in amco().trainable_parameters(model)}
    assert not any(id(p) in names for p in model.unimodal_heads.parameters())
    assert all(id(p) in names for p in model.fusion.parameters())


# ---- §8.1 BB logit-mask variant


def test_bb_variant_masks_logits_of_the_previous_batchs_dependent_modality():
    method = amco(variant="bb_logit_mask", linear_star_init="identity")
    model = attached(method, model_ab())
    batch = batch_ab()
    assert method.label == "amco[bb]"
    method.on_epoch_start(model, 1)
    first = method.training_step(model, batch, epoch=1)  # nothing dependent yet at an epoch's first batch
    assert (first.logs["masked_a"], first.logs["masked_b"]) == (0.0, 0.0)
    assert first.logs["p_t"] == 0.0  # l_t = 0 at batch 0
    assert method.dependent == [True, False]  # μ_a = 0.57858 > 0.5, applied to the next batch
    # unmasked: z = I (s^a + s^b) = [(2, 0), (0, 1)]; L = CE(z) + CE(s^a) + CE(s^b)
    # = (log(1+e⁻²) + log(1+e⁻¹))/2 + (log(1+e⁻²) + log 2)/2 + (log 2 + log(1+e⁻¹))/2
    expected = LOG_1_E2 + LOG_1_E1 + math.log(2)
    assert first.loss.item() == pytest.approx(expected, rel=1e-6)
    method.on_epoch_start(model, 2)
    assert method.dependent == [False, False] and method.step == 0  # BB resets per epoch


def test_bb_variant_loss_by_hand_with_fully_masked_logits():
    method = amco(variant="bb_logit_mask", linear_star_init="identity")
    model = attached(method, model_ab())
    method.step, method.dependent = 3, [True, False]  # epoch 1 batch 3: l_t = 0.3 → p_t = 1 → N = C = 2
    out = method.training_step(model, batch_ab(), epoch=1)
    assert out.logs["p_t"] == pytest.approx(1.0) and out.logs["masked_a"] == 1.0
    # s^a ⊙ 0 = 0: z = I s^b = [(0, 0), (0, 1)] → CE(z) = (log 2 + log(1 + e⁻¹))/2
    # CE(masked s^a) = log 2 (defect iii kept); CE(s^b) = (log 2 + log(1 + e⁻¹))/2
    # L = 2 log 2 + log(1 + e⁻¹) = 1.38629 + 0.31326 = 1.69956
    assert out.loss.item() == pytest.approx(2 * math.log(2) + LOG_1_E1, rel=1e-6)
    # the dependence for the next batch comes from the masked shares: row 0 exp (1, 1, 1, 1) → a 1/2,
    # row 1 exp (1, 1, 1, e) → a 2/(3 + e) = 0.34968; μ_a = 0.42484 ≤ 0.5, μ_b = 0.57516 > 0.5 → b
    assert method.dependent == [False, True]
    assert out.logs["mass_a"] == pytest.approx((0.5 + 2 / (3 + math.e)) / 2, rel=1e-6)


def test_bb_linear_star_is_in_the_prediction_path_and_trained():
    method = amco(variant="bb_logit_mask")
    model = attached(method, model_ab())
    star = model.method_modules[LINEAR_STAR]
    assert not torch.equal(star.weight, torch.eye(2))  # BB: PyTorch's default nn.Linear init
    with torch.no_grad():
        star.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        star.bias.copy_(torch.tensor([1.0, -1.0]))
    batch = batch_ab()
    logits = method.logits_from_features(model, model.encode(batch.inputs))
    # z = [(2, 0), (0, 1)] → L* z = (z_1 + 1, 2 z_0 − 1) = [(1, 3), (2, −1)]
    torch.testing.assert_close(logits, torch.tensor([[1.0, 3.0], [2.0, -1.0]]))
    names = {id(p) for p in method.trainable_parameters(model)}
    assert all(id(p) in names for p in star.parameters())
    identity = amco(variant="bb_logit_mask", linear_star_init="identity").build_modules(model_ab())[
        LINEAR_STAR
    ]
    assert torch.equal(identity.weight, torch.eye(2)) and torch.equal(identity.bias, torch.zeros(2))


# ---- state, requirements


@pytest.mark.parametrize("variant", ["feature_mask", "bb_logit_mask"])
def test_state_round_trip_resumes_the_same_masks(variant):
    model, batch = model_ab(d_a=8), batch_ab(d_a=8)
    method = amco(variant=variant)
    model = attached(method, model)
    method.on_epoch_start(model, 2)
    for _ in range(2):
        method.training_step(model, batch, epoch=2)
    clone = amco(variant=variant)
    clone.load_state_dict(method.state_dict())
    assert clone.step == 2 and clone.dependent == method.dependent
    seen = fused_inputs(model)
    a, b = method.training_step(model, batch, 2), clone.training_step(model, batch, 2)
    assert a.loss.item() == b.loss.item()
    if variant == "feature_mask":
        assert torch.equal(seen[0]["a"], seen[1]["a"])
    assert repr(method.state_dict()) == repr(clone.state_dict())


def test_needs_a_decomposable_head_and_two_modalities():
    requires = METHODS.get("amco").requires
    with pytest.raises(ConfigError, match="decomposable"):
        requires.check("amco", "concat_mlp", False, 2)
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        requires.check("amco", "concat", True, 1)
    with pytest.raises(ConfigError, match="modulation_ends"):
        amco(modulation_starts=3, modulation_ends=2)
    assert METHODS.get("amco").fidelity == "reconstructed"
