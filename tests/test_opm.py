"""OPM (methods.md §7.1, §7.2): drop probabilities, the θ rescale, detached scores, warm-up, state."""

import math

import pytest
import torch
from tests_support_models import leading_a_batch, leading_a_model

from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion, SumFusion
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.opm import detached_scores, drop_features, drop_probabilities

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=8, steps_per_epoch=2)


def opm(runtime: Runtime | None = None, **params):
    context = CONTEXT if runtime is None else MethodContext(**{**CONTEXT.__dict__, "runtime": runtime})
    return build_method("opm", params, context)


# ---- §7.2 drop probabilities


def test_drop_probabilities_by_hand():
    # P = (3, 1): ρ_1 = tanh(relu(3/1 − 1)) = tanh 2, ρ_2 = tanh(relu(1/3 − 1)) = 0
    # q_1 = 0.5 (1 + 0.5 tanh 2) = 0.5 (1 + 0.5 · 0.96402758) = 0.74100690, q_2 = 0
    q = drop_probabilities(torch.tensor([3.0, 1.0]), q_base=0.5, lam=0.5)
    torch.testing.assert_close(q, torch.tensor([0.5 * (1 + 0.5 * math.tanh(2.0)), 0.0], dtype=q.dtype))
    assert q[0].item() == pytest.approx(0.7410069, abs=1e-7)
    # equal scores: ρ = tanh(relu(0)) = 0 for both, so nothing is dropped
    assert drop_probabilities(torch.tensor([2.0, 2.0]), 0.5, 0.5).tolist() == [0.0, 0.0]


def test_drop_probabilities_are_clipped_to_one():
    # P = (10, 1), q_base 0.8, λ 1: q_1 = 0.8 (1 + tanh 9) ≈ 1.6 → 1
    assert drop_probabilities(torch.tensor([10.0, 1.0]), q_base=0.8, lam=1.0).tolist() == [1.0, 0.0]


def test_more_than_two_modalities_compare_each_to_the_sum_of_the_others():
    # [BB] P = (6, 2, 1): ρ_1 = tanh(6/3 − 1) = tanh 1; ρ_2 = tanh(relu(2/7 − 1)) = 0; ρ_3 = 0
    q = drop_probabilities(torch.tensor([6.0, 2.0, 1.0]), q_base=0.5, lam=0.5)
    expected = torch.tensor([0.5 * (1 + 0.5 * math.tanh(1.0)), 0.0, 0.0], dtype=q.dtype)
    torch.testing.assert_close(q, expected)


# ---- §7.2 feature drop: θ, the 1/(1 − θ) rescale, removal of empty samples


def test_theta_rescale_with_unequal_dims_forward_and_backward():
    a = torch.arange(1.0, 13.0).reshape(4, 3).requires_grad_()
    b = torch.tensor([[1.0], [2.0], [3.0], [4.0]], requires_grad=True)
    # q = (1, 0): every a dropped, every b kept; θ = (3·1 + 1·0) / 4 = 0.75, so b is scaled by 1/0.25 = 4
    dropped, kept = drop_features(
        {"a": a, "b": b}, torch.tensor([1.0, 0.0]), torch.Generator().manual_seed(0)
    )
    assert torch.equal(dropped["a"], torch.zeros(4, 3))
    assert torch.equal(dropped["b"], 4 * b.detach())
    assert kept.tolist() == [True] * 4
    (dropped["a"].sum() + dropped["b"].sum()).backward()  # the same factor in the backward pass
    assert torch.equal(a.grad, torch.zeros(4, 3)) and torch.equal(b.grad, torch.full((4, 1), 4.0))
    # q = (0, 0): θ = 0, features unchanged
    same, kept = drop_features({"a": a, "b": b}, torch.zeros(2), torch.Generator().manual_seed(0))
    assert torch.equal(same["a"], a.detach()) and torch.equal(same["b"], b.detach()) and kept.all()


def test_samples_that_lose_every_modality_are_removed():
    a, b = torch.ones(400, 3), torch.ones(400, 1)
    # q = (1, 0.5): a always dropped, b kept with probability 1/2; θ = (3 + 0.5) / 4 = 0.875 → scale 8
    dropped, kept = drop_features(
        {"a": a, "b": b}, torch.tensor([1.0, 0.5]), torch.Generator().manual_seed(3)
    )
    assert torch.equal(dropped["a"], torch.zeros(400, 3))
    assert set(dropped["b"].flatten().tolist()) == {0.0, 8.0}
    assert torch.equal(kept, dropped["b"][:, 0] == 8.0)  # kept exactly where b survived
    assert 0.4 < kept.float().mean().item() < 0.6


# ---- §7.1 detached scores


@pytest.mark.parametrize("head", ["concat", "sum"])
def test_scores_use_a_detached_head_and_match_its_shares(head):
    torch.manual_seed(0)
    dims = {"a": 3, "b": 2}
    fusion = ConcatFusion(dims, 4) if head == "concat" else SumFusion(dims, 4)
    features = {m: torch.randn(5, d, requires_grad=True) for m, d in dims.items()}
    shares = detached_scores(fusion, features)
    if head == "concat":  # t^m = f^m W_m^T + c/2, W_a the first 3 columns
        w, c = fusion.linear.weight, fusion.linear.bias
        expected = {"a": features["a"] @ w[:, :3].T + c / 2, "b": features["b"] @ w[:, 3:].T + c / 2}
    else:  # each branch with its full bias
        expected = {m: features[m] @ fusion.branches[m].weight.T + fusion.branches[m].bias for m in dims}
    for m in dims:
        torch.testing.assert_close(shares[m], expected[m].detach())
    sum(s.sum() for s in shares.values()).backward()
    assert all(p.grad is None for p in fusion.parameters())  # nothing reaches the head through t
    assert all(f.grad is not None for f in features.values())  # the features keep their graph


def test_without_a_drop_the_step_is_joint_training_and_the_scores_add_no_gradient():
    model, batch = leading_a_model(), leading_a_batch()
    out = opm(warmup_epochs=0, p_exe=0.0).training_step(model, batch, epoch=0)
    assert out.logs["drop_executed"] == 0.0 and out.logs["q_a"] > 0
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    joint = build_method("joint", {}, CONTEXT).training_step(model, batch, epoch=0)
    assert out.loss.item() == joint.loss.item()
    joint.loss.backward()
    want = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# ---- the step


def test_a_drop_step_by_hand():
    model, batch = leading_a_model(), leading_a_batch()
    # t^a_i: logit 5 for y_i, 0 otherwise → softmax[y] = e^5 / (1 + e^5) ≈ 0.9933, P_a ≈ 3.973
    # t^b_i = (0, 0.5): softmax[y] = 0.3775 (y = 0) or 0.6225 (y = 1), P_b = 2
    # ρ_a = tanh(3.973/2 − 1) ≈ 0.756 → q_a = 1 · (1 + 1 · 0.756) → 1; ρ_b = 0 → q_b = 0
    out = opm(warmup_epochs=0, p_exe=1.0, q_base=1.0, lam=1.0).training_step(model, batch, epoch=0)
    assert {k: float(v) for k, v in out.logs.items()} == pytest.approx(
        {
            "q_a": 1.0,
            "q_b": 0.0,
            "drop_executed": 1.0,
            "kept_fraction": 1.0,
            "loss_fused": float(out.logs["loss_fused"]),
        }
    )
    # a dropped everywhere, θ = 3/4, b scaled by 4: logits (0, 0.5 · 4 · 1) = (0, 2) for every sample
    # CE = log(1 + e²) for y = 0 and log(1 + e⁻²) for y = 1; two of each
    expected = (math.log(1 + math.e**2) + math.log(1 + math.e**-2)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_warmup_is_plain_joint_and_draws_nothing():
    model, batch = leading_a_model(), leading_a_batch()
    method = opm()  # warm-up 6 epochs: 0-5
    before = method.generator.get_state()
    out = method.training_step(model, batch, epoch=5)
    joint = build_method("joint", {}, CONTEXT).training_step(model, batch, epoch=5)
    assert out.loss.item() == joint.loss.item() and set(out.logs) == {"loss_fused"}
    assert torch.equal(method.generator.get_state(), before)
    assert "q_a" in method.training_step(model, batch, epoch=6).logs  # epoch 6: modulated
    assert not opm(modulation_ends=6).modulating(7)


class TwoRanks(Runtime):
    """Stands in for a second rank whose batch leads with b exactly as much as ours leads with a."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + tensor.flip(0)


def test_scores_are_summed_over_ranks_unless_local_stats():
    model, batch = leading_a_model(), leading_a_batch()
    reduced = opm(TwoRanks(), warmup_epochs=0, p_exe=1.0).training_step(model, batch, 0)
    assert reduced.logs["q_a"] == 0.0 and reduced.logs["q_b"] == 0.0  # global P_a = P_b: no drop
    local = opm(TwoRanks(), warmup_epochs=0, p_exe=1.0, local_stats=True).training_step(model, batch, 0)
    assert local.logs["q_a"] > 0.5 and local.logs["q_b"] == 0.0


def test_generator_state_round_trips_and_comes_from_the_seed():
    model, batch = leading_a_model(), leading_a_batch()
    method = opm(warmup_epochs=0)
    method.training_step(model, batch, 0)
    clone = opm(warmup_epochs=0)
    assert not torch.equal(clone.generator.get_state(), method.generator.get_state())
    clone.load_state_dict(method.state_dict())
    for _ in range(5):  # identical draws from here on
        a, b = method.training_step(model, batch, 0), clone.training_step(model, batch, 0)
        assert a.logs == b.logs and a.loss.item() == b.loss.item()
    other_seed = build_method("opm", {}, MethodContext(**{**CONTEXT.__dict__, "seed": 1}))
    assert not torch.equal(other_seed.generator.get_state(), opm().generator.get_state())


def test_opm_refuses_film_and_accepts_sum(tiny_config):
    with pytest.raises(
        ConfigError,
        match=r"model\.fusion\.name: method 'opm' needs a decomposable fusion head .* 'film' is not",
    ):
        tiny_config("method.name=opm", "model.fusion.name=film")
    tiny_config("method.name=opm", "model.fusion.name=sum")
