"""Multimodal Mixup (spec §11) and PowMix (spec §12): the defining mechanism on tiny tensors, by hand."""

import dataclasses
import math

import pytest
import torch
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method, mixup
from midasbench.methods.mixup import draw_mixing, mix_features, mixed_targets, sample_beta, soft_cross_entropy
from midasbench.methods.powmix import (
    cross_modal_label_mixing,
    draw_mixing_weights,
    mix_embeddings,
    mixed_count_range,
    power_reweight,
    scatter_weights,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=1, steps_per_epoch=1, seed=3)


def hand_model() -> MultimodalModel:
    """f_a = x_a, f_b = 0 and fused logits z = (0, f_a)."""
    model = MultimodalModel({"a": Linear(1, 1), "b": Linear(1, 1)}, ConcatFusion({"a": 1, "b": 1}, 2), 2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.encoders["a"].weight.fill_(1.0)
        model.fusion.linear.weight[1, 0] = 1.0
    return model


def hand_batch() -> Batch:
    return Batch(
        inputs={"a": torch.tensor([[0.0], [2.0]]), "b": torch.tensor([[5.0], [7.0]])},
        labels=torch.tensor([0, 1]),
        index=torch.arange(2),
    )


def random_model_and_batch() -> tuple[MultimodalModel, Batch]:
    torch.manual_seed(0)
    model = MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 3)}, ConcatFusion({"a": 3, "b": 3}, 2), 2)
    batch = Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.tensor([0, 1, 1, 0, 1, 0]),
        index=torch.arange(6),
    )
    return model, batch


# --------------------------------------------------------------------------------------------- mixup


def test_mixed_features_are_the_stated_convex_combinations():
    features = {
        "a": torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]),
        "b": torch.tensor([[3.0], [6.0], [9.0]]),
    }
    perm = torch.tensor([2, 0, 1])
    out = mix_features(features, perm, torch.tensor(0.25))
    # a: 0.25·(1,0) + 0.75·(4,4) = (3.25, 3); 0.25·(0,2) + 0.75·(1,0) = (0.75, 0.5);
    #    0.25·(4,4) + 0.75·(0,2) = (1, 2.5)
    torch.testing.assert_close(out["a"], torch.tensor([[3.25, 3.0], [0.75, 0.5], [1.0, 2.5]]))
    # b, the same λ and π: 0.25·3 + 0.75·9 = 7.5; 0.25·6 + 0.75·3 = 3.75; 0.25·9 + 0.75·6 = 6.75
    torch.testing.assert_close(out["b"], torch.tensor([[7.5], [3.75], [6.75]]))
    # one λ per row (1, 0, 0.5): row 0 itself, row 1 its partner row 0, row 2 halfway between rows 2 and 1
    per_row = mix_features(features, perm, torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(per_row["a"], torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 3.0]]))
    torch.testing.assert_close(per_row["b"], torch.tensor([[3.0], [3.0], [7.5]]))


def test_mixed_targets_put_lambda_and_one_minus_lambda_on_the_right_classes():
    targets = mixed_targets(torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), torch.tensor(0.25), 3)
    # row 0: 0.25 on y_0 = 0, 0.75 on y_2 = 2; row 1: 0.25 on 1, 0.75 on y_0 = 0; row 2: 0.25 on 2, 0.75 on 1
    expected = torch.tensor([[0.25, 0.0, 0.75], [0.75, 0.25, 0.0], [0.0, 0.75, 0.25]])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))
    # a same-class pair keeps all its mass on that class
    same = mixed_targets(torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor(0.3), 3)
    torch.testing.assert_close(same, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))


def test_soft_cross_entropy_matches_a_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # row 0: p = (1/4, 3/4), CE = −½ log ¼ − ½ log ¾ = log 4 − ½ log 3; row 1: p = (½, ½), CE = log 2
    expected = ((math.log(4) - 0.5 * math.log(3)) + math.log(2)) / 2
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_mixup_loss_for_a_given_draw_is_the_hand_computed_soft_cross_entropy(monkeypatch):
    monkeypatch.setattr(mixup, "draw_mixing", lambda b, a, s, g: (torch.tensor([1, 0]), torch.tensor(0.25)))
    model, batch = hand_model(), hand_batch()
    # f_a = (0, 2), labels (0, 1), π = (1, 0), λ = ¼: mixed f_a = (¾·2, ¼·2) = (1.5, 0.5), z_i = (0, f̄_a,i)
    # targets (¼, ¾) and (¾, ¼): CE_0 = log(1 + e^1.5) − ¾·1.5, CE_1 = log(1 + e^0.5) − ¼·0.5
    mixed = (math.log(1 + math.exp(1.5)) - 0.75 * 1.5 + math.log(1 + math.exp(0.5)) - 0.25 * 0.5) / 2
    out = build_method("mixup", {}, CONTEXT).training_step(model, batch, 0)
    assert out.loss.item() == pytest.approx(mixed, rel=1e-6)
    assert out.logs["lambda"] == pytest.approx(0.25)
    # add mode: plus the clean CE, z = (0, 0) and (0, 2): log 2 and log(1 + e²) − 2
    clean = (math.log(2) + math.log(1 + math.exp(2)) - 2) / 2
    added = build_method("mixup", {"mixup_mode": "add"}, CONTEXT).training_step(model, batch, 0)
    assert added.loss.item() == pytest.approx(clean + mixed, rel=1e-6)
    assert added.loss.dtype == torch.float32


def test_beta_draws_lie_in_the_unit_interval_with_mean_one_half():
    draws = sample_beta(0.4, (4000,), torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.03)  # Beta(α, α) is symmetric about ½


# -------------------------------------------------------------------------------------------- powmix


def test_powmix_defaults_follow_the_spec_and_ranges_are_checked():
    p = build_method("powmix", {}, CONTEXT).params
    assert (p.n_min_ratio, p.n_max_ratio) == (0.5, 2.0)  # §12 (1): n ∈ [b/2, 2b]
    assert p.dynamic_mixing and p.anisotropic and p.power == 2.0 and p.mix_weight == 1.0
    assert build_method("powmix", {}, CONTEXT).fidelity == "reconstructed"
    assert build_method("mixup", {}, CONTEXT).params.alpha == 1.0  # §18
    with pytest.raises(ConfigError, match="n_min_ratio"):
        build_method("powmix", {"n_min_ratio": 3.0}, CONTEXT)
    with pytest.raises(ConfigError, match="alpha_low"):
        build_method("powmix", {"alpha_low": 3.0}, CONTEXT)


def test_mixed_count_range():
    assert mixed_count_range(6, 0.5, 2.0) == (3, 12)
    assert mixed_count_range(5, 0.5, 2.0) == (3, 10)  # ⌈2.5⌉ = 3, ⌊10⌋ = 10
    assert mixed_count_range(1, 0.5, 0.5) == (1, 1)  # at least one mixed example


def test_power_reweighting_and_scattered_weights_by_hand():
    # squares 0.04, 0.09, 0.25 (sum 0.38)
    torch.testing.assert_close(
        power_reweight(torch.tensor([0.2, 0.3, 0.5]), 2.0), torch.tensor([0.04, 0.09, 0.25]) / 0.38
    )
    torch.testing.assert_close(power_reweight(torch.tensor([0.2, 0.8]), 1.0), torch.tensor([0.2, 0.8]))
    # subset (2, 0) with weights (¼, ¾): ¾ on row 0, nothing on row 1, ¼ on row 2
    dense = scatter_weights(torch.tensor([[2, 0]]), torch.tensor([[[0.25, 0.75]]]), 3)
    torch.testing.assert_close(dense, torch.tensor([[[0.75, 0.0, 0.25]]]))


def test_embeddings_and_labels_are_mixed_with_each_modalitys_weights():
    weights = torch.tensor([[[0.5, 0.5, 0.0]], [[0.0, 0.0, 1.0]]])  # (M = 2, n = 1, b = 3)
    features = {
        "a": torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]),
        "b": torch.tensor([[3.0], [6.0], [9.0]]),
    }
    out = mix_embeddings(features, weights)
    torch.testing.assert_close(out["a"], torch.tensor([[0.5, 0.5]]))  # ½ row 0 + ½ row 1
    torch.testing.assert_close(out["b"], torch.tensor([[9.0]]))  # row 2
    # labels (0, 1, 2): ỹ = ½[(½, ½, 0) + (0, 0, 1)] = (¼, ¼, ½)
    targets = cross_modal_label_mixing(weights, torch.tensor([0, 1, 2]), 3)
    torch.testing.assert_close(targets, torch.tensor([[0.25, 0.25, 0.5]]))


def test_drawn_weights_are_on_the_simplex_over_a_shared_subset():
    g = torch.Generator().manual_seed(0)
    w = draw_mixing_weights(2, 5, 8, 3, 1.0, 2.0, True, g)
    assert w.shape == (2, 5, 8) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    assert ((w > 0).sum(-1) <= 3).all()
    assert torch.equal(w[0] > 0, w[1] > 0) and not torch.equal(w[0], w[1])  # anisotropic: same rows
    iso = draw_mixing_weights(2, 5, 8, 3, 1.0, 2.0, False, g)
    assert torch.equal(iso[0], iso[1])
    tiny = draw_mixing_weights(2, 4, 1, 3, 1.0, 2.0, True, g)  # a batch of one: the row itself
    torch.testing.assert_close(tiny, torch.ones(2, 4, 1))


def test_powmix_loss_for_given_weights_is_clean_plus_soft_cross_entropy():
    model, batch = hand_model(), hand_batch()
    method = build_method("powmix", {}, CONTEXT)
    weights = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])  # one mixed example: a halves, b row 0
    method.draw = lambda b, m: (weights, {})  # type: ignore[method-assign]
    # clean: z = (0, 0), (0, 2) → log 2 and log(1 + e²) − 2; mixed f_a = 1, z = (0, 1)
    # ỹ = ½[(½, ½) + (1, 0)] = (¾, ¼): CE = log(1 + e) − ¼
    clean = (math.log(2) + math.log(1 + math.exp(2)) - 2) / 2
    expected = clean + math.log(1 + math.e) - 0.25
    out = method.training_step(model, batch, 0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------- state and eval


@pytest.mark.parametrize("name", ["mixup", "powmix"])
def test_generator_state_round_trips_and_determines_the_draws(name):
    model, batch = random_model_and_batch()
    method = build_method(name, {}, CONTEXT)
    state = method.state_dict()
    first = method.training_step(model, batch, 0).loss.item()
    assert not torch.equal(method.state_dict()["generator"], state["generator"])  # draws advance it
    second = method.training_step(model, batch, 0).loss.item()
    assert first != second
    other = build_method(name, {}, dataclasses.replace(CONTEXT, seed=4))
    assert other.training_step(model, batch, 0).loss.item() != first  # another seed, other draws
    other.load_state_dict(state)
    assert torch.equal(other.state_dict()["generator"], state["generator"])
    assert other.training_step(model, batch, 0).loss.item() == first
    twin = build_method(name, {}, CONTEXT)  # every rank builds the same generator from the run seed
    assert torch.equal(twin.state_dict()["generator"], state["generator"])


def test_the_same_state_gives_the_same_mixup_draws():
    method = build_method("mixup", {}, CONTEXT)
    state = method.state_dict()
    perm, lam = draw_mixing(7, 1.0, False, method.generator)
    method.load_state_dict(state)
    perm2, lam2 = draw_mixing(7, 1.0, False, method.generator)
    assert torch.equal(perm, perm2) and torch.equal(lam, lam2)


@pytest.mark.parametrize("name", ["mixup", "powmix"])
def test_evaluation_uses_the_plain_fused_logits(name):
    model, batch = random_model_and_batch()
    method = build_method(name, {}, CONTEXT)
    state = method.state_dict()["generator"].clone()
    features = model.encode(batch.inputs, method.eval_modalities(model))
    torch.testing.assert_close(
        method.logits_from_features(model, features), model.fuse(model.encode(batch.inputs))
    )
    assert torch.equal(method.state_dict()["generator"], state)  # evaluation draws nothing


@pytest.mark.parametrize("name", ["mixup", "powmix"])
def test_the_unused_unimodal_heads_are_left_out_of_the_optimiser(name):
    model, _ = random_model_and_batch()
    trained = {id(p) for p in build_method(name, {}, CONTEXT).trainable_parameters(model)}
    assert not any(id(p) in trained for p in model.unimodal_heads.parameters())
    assert all(id(p) in trained for p in [*model.encoders.parameters(), *model.fusion.parameters()])
