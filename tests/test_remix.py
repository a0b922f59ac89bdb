"""Data Remixing (methods-more §33 item 3): the KL-to-uniform assignment on hand-made logits, the plan's
segments, tags and shuffle, the post-encoder zeroing and the per-row loss on a tiny batch, the warm-up
loss, and the state that rebuilds the plan. Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.remix import UNTAGGED, Remix, assign_rows, build_plan, kl_to_uniform

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=2, epochs=6, steps_per_epoch=1, seed=5)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def identity_model() -> MultimodalModel:
    """f^m = x^m (1-d); z = (0, f^a + f^v); u^m = (0, f^m); zero biases. So CE(·, 1) = softplus(−logit_1)
    and CE(·, 0) = softplus(logit_1)."""
    model = MultimodalModel({"a": Identity(1), "v": Identity(1)}, ConcatFusion({"a": 1, "v": 1}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        model.fusion.linear.bias.zero_()
        for head in model.unimodal_heads.values():
            head.weight.copy_(torch.tensor([[0.0], [1.0]]))
            head.bias.zero_()
    return model


# ------------------------------------------------------------------------------------ the assignment


def test_kl_to_uniform_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0]])
    kl = kl_to_uniform(logits)
    # (0, 0): p = (½, ½) = U → 0
    # (log 3, 0): p = (¾, ¼): ¾ log₂(¾·2) + ¼ log₂(¼·2) = ¾ · 0.5849625007 − ¼ = 0.1887218755
    # (100, 0): p = (1, ~e^−100) → the second clipped to 1e-9 (not renormalised):
    #   1 · log₂ 2 + 1e-9 · log₂(2e-9) = 1 + 1e-9 · (1 − 9 · 3.3219280949) = 1 − 2.8897352854e-8
    assert kl[0].item() == pytest.approx(0.0, abs=1e-12)
    assert kl[1].item() == pytest.approx(0.1887218755, abs=1e-6)  # softmax in float32
    assert kl[2].item() == pytest.approx(1 - 2.8897352854e-8, abs=1e-15)
    assert kl.dtype == torch.float64


def test_each_row_goes_to_the_modality_closest_to_uniform_ties_to_the_last():
    kl = torch.tensor([[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]], dtype=torch.float64)
    # row 0: a lower → 0; row 1: v lower → 1; row 2: tie → the last (official: audio only if KL_a < KL_v)
    assert assign_rows(kl).tolist() == [0, 1, 1]
    three = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.1, 0.4], [0.2, 0.2, 0.2]], dtype=torch.float64)
    # M = 3: argmin 1; tie of 0 and 1 → 1; three-way tie → 2
    assert assign_rows(three).tolist() == [1, 1, 2]


def fake_runtime(features: dict[str, torch.Tensor], labels: torch.Tensor) -> Runtime:
    """A runtime whose ``encode_rows`` returns the given features of the rows asked for."""

    def encode(model, split, rows, names):
        index = torch.as_tensor(rows)
        return {m: features[m][index] for m in names}, labels[index]

    return Runtime(train_split=list(range(len(labels))), encode_fn=encode)


def assigned_method(params: dict | None = None) -> tuple[Remix, MultimodalModel]:
    # u^m = (0, f^m): the smaller |f^m|, the closer softmax(u^m) is to uniform
    # rows (a, v): (1, 2) → a; (3, −1) → v; (2, 2) tie → v; (−0.5, 2) → a: assignment (0, 1, 1, 0)
    features = {
        "a": torch.tensor([[1.0], [3.0], [2.0], [-0.5]]),
        "v": torch.tensor([[2.0], [-1.0], [2.0], [2.0]]),
    }
    labels = torch.tensor([1, 0, 1, 0])
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": fake_runtime(features, labels)})
    method = build_method("remix", {"warmup_epochs": 2, **(params or {})}, context)
    return method, identity_model()


def test_assignment_after_warm_up_builds_the_next_epochs_segments():
    method, model = assigned_method()
    default = EpochPlan(np.array([2, 0, 3, 1]))
    assert method.on_epoch_end(model, 0) == {}  # epoch 0 < E_warm − 1 = 1: no assignment yet
    assert method.epoch_plan(1, default) is default
    metrics = method.on_epoch_end(model, 1)
    assert method.assignment.tolist() == [0, 1, 1, 0]
    assert (metrics["assigned_a"], metrics["assigned_v"]) == (2.0, 2.0)
    # mean KL of a: rows with f^a = 1, 3, 2, −0.5; p_1 = σ(f). KL(0, 3) > KL(0, 1): just check the order
    assert metrics["kl_a"] > 0 and metrics["kl_v"] > 0
    assert method.epoch_plan(1, default) is default  # still warm-up (epoch 1 < E_warm = 2)
    plan = method.epoch_plan(2, default)
    # reverse order: v's segment (rows 1, 2) first, then a's (rows 0, 3); tags = modality index
    assert plan.segments.tolist() == [2, 4]
    assert sorted(plan.rows[:2].tolist()) == [1, 2] and sorted(plan.rows[2:].tolist()) == [0, 3]
    assert plan.tags.tolist() == [1, 1, 0, 0]
    assert model.training  # the assignment left the model's mode alone


def test_forward_order_puts_the_first_modality_first():
    method, model = assigned_method({"segment_order": "forward"})
    method.on_epoch_end(model, 1)
    plan = method.epoch_plan(2, EpochPlan(np.arange(4)))
    assert plan.tags.tolist() == [0, 0, 1, 1] and sorted(plan.rows[:2].tolist()) == [0, 3]


def test_segments_are_shuffled_from_seed_and_epoch_and_hold_every_row_once():
    assignment = np.array([0, 1] * 10)  # even rows → a, odd rows → v
    plan = build_plan(assignment, [1, 0], seed=5, epoch=3)
    assert plan.segments.tolist() == [10, 20] and plan.tags.tolist() == [1] * 10 + [0] * 10
    assert sorted(plan.rows[:10].tolist()) == list(range(1, 20, 2))
    assert sorted(plan.rows[10:].tolist()) == list(range(0, 20, 2))
    again = build_plan(assignment, [1, 0], seed=5, epoch=3)
    assert np.array_equal(plan.rows, again.rows)
    assert plan.rows[:10].tolist() != sorted(plan.rows[:10].tolist())  # shuffled within the segment
    others = [build_plan(assignment, [1, 0], seed=5, epoch=e).rows.tolist() for e in range(4, 8)]
    assert all(o != plan.rows.tolist() for o in others)  # reshuffled every epoch
    assert build_plan(assignment, [1, 0], seed=6, epoch=3).rows.tolist() != plan.rows.tolist()


def test_an_empty_subset_gives_an_empty_segment():
    plan = build_plan(np.array([1, 1, 1]), [1, 0], seed=0, epoch=0)
    assert plan.segments.tolist() == [3, 3] and plan.segment_bounds() == [(0, 3)]


# ---------------------------------------------------------------------------------------- the step


def test_per_row_loss_zeroes_the_other_modalities_of_a_tagged_row():
    model = identity_model()
    method = build_method("remix", {"gamma": 2.0, "warmup_weight": 0.5}, CONTEXT)
    x = {"a": torch.tensor([[2.0], [2.0], [2.0]]), "v": torch.tensor([[-3.0], [-3.0], [-3.0]])}
    labels = torch.tensor([1, 1, 1])
    tags = torch.tensor([UNTAGGED, 0, 1])
    out = method.training_step(model, Batch(x, labels, torch.arange(3), tags), epoch=3)
    # CE(·, 1) = softplus(−logit_1); z_1 = f^a + f^v with the zeroing, u^m_1 = f^m
    # row 0 untagged: CE(z) = sp(1) (z_1 = −1); 0.5 (CE(u^a) + CE(u^v)) = 0.5 (sp(−2) + sp(3))
    # row 1 keeps a:  CE(z) = sp(−2) (z_1 = 2);  γ CE(u^a) = 2 sp(−2)
    # row 2 keeps v:  CE(z) = sp(3) (z_1 = −3);  γ CE(u^v) = 2 sp(3)
    fused = (softplus(1) + softplus(-2) + softplus(3)) / 3
    unimodal = (0.5 * (softplus(-2) + softplus(3)) + 2 * softplus(-2) + 2 * softplus(3)) / 3
    assert out.loss.item() == pytest.approx(fused + unimodal, rel=1e-6)
    assert out.logs["loss_fused"] == pytest.approx(fused, rel=1e-6)
    assert out.logs["loss_unimodal"] == pytest.approx(unimodal, rel=1e-6)
    assert out.logs["remix_fraction"] == pytest.approx(2 / 3)


def test_a_single_modality_batch_trains_only_its_own_branch():
    model = identity_model()
    method = build_method("remix", {}, CONTEXT)
    x = {"a": torch.tensor([[2.0], [1.0]]), "v": torch.tensor([[-3.0], [5.0]])}
    batch = Batch(x, torch.tensor([1, 0]), torch.arange(2), torch.tensor([0, 0]))
    out = method.training_step(model, batch, epoch=3)
    # v zeroed: z_1 = f^a = (2, 1); CE(z) = (sp(−2) + sp(1))/2, and γ = 1 · CE(u^a) is the same
    expected = 2 * (softplus(-2) + softplus(1)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    assert model.encoders["v"].weight.grad.abs().sum() == 0  # zeroed after the encoder: zero gradient
    assert model.unimodal_heads["v"].weight.grad is None  # its head is not in the loss
    assert model.fusion.linear.weight.grad[:, 1].abs().sum() == 0  # the v block of g_f sees 0
    assert model.encoders["a"].weight.grad.abs().sum() > 0
    assert model.unimodal_heads["a"].weight.grad.abs().sum() > 0


def test_warm_up_loss_is_fused_plus_half_of_each_unimodal_ce():
    model = identity_model()
    x = {"a": torch.tensor([[0.5]]), "v": torch.tensor([[0.25]])}
    out = build_method("remix", {}, CONTEXT).training_step(
        model, Batch(x, torch.tensor([0]), torch.arange(1)), 0
    )
    # label 0: CE = softplus(logit_1); z_1 = 0.75, u^a_1 = 0.5, u^v_1 = 0.25
    # sp(0.75) + 0.5 (sp(0.5) + sp(0.25)) = 1.13687 + 0.5 (0.97408 + 0.82594) = 2.03688
    assert out.loss.item() == pytest.approx(2.03688, abs=1e-5)
    assert out.logs["remix_fraction"] == 0.0


def test_evaluation_uses_all_features_unzeroed():
    model = identity_model()
    method = build_method("remix", {}, CONTEXT)
    features = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[-3.0]])}
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))


# ------------------------------------------------------------------------------------ state and rules


def test_equal_state_gives_an_identical_plan_and_the_state_round_trips():
    method, model = assigned_method()
    method.on_epoch_end(model, 1)
    clone, _ = assigned_method()
    clone.load_state_dict(method.state_dict())
    assert repr(clone.state_dict()) == repr(method.state_dict())
    default = EpochPlan(np.arange(4))
    a, b = method.epoch_plan(2, default), clone.epoch_plan(2, default)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.tags, b.tags)
    assert np.array_equal(a.segments, b.segments)
    fresh, _ = assigned_method()
    assert fresh.epoch_plan(2, default) is default  # nothing assigned: the default plan
    with pytest.raises(ValueError, match="assigned 4 rows"):
        method.epoch_plan(2, EpochPlan(np.arange(5)))


def test_defaults_and_requirements():
    p = build_method("remix", {}, CONTEXT).params
    assert (p.warmup_epochs, p.warmup_weight, p.gamma, p.segment_order) == (10, 0.5, 1.0, "reverse")
    assert Remix.fidelity == "official-code" and Remix.dataset_defaults == {}
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        Remix.requires.check("remix", "concat", True, 1)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_method("remix", {"warmup_epochs": 0}, CONTEXT)


def test_a_short_run_trains_on_the_remixed_segments_after_warm_up(tiny_config):
    from midasbench.harness.training.trainer import train

    history = train(tiny_config("method.name=remix", "method.params={warmup_epochs: 1}")).history
    # epoch 0 warm-up (untagged rows); assigned at its end, epochs 1-2 train every row tagged, once
    assert history[0]["train/remix_fraction"] == 0.0
    assert all(h["train/remix_fraction"] == 1.0 for h in history[1:])
    for h in history:
        assert h["method/assigned_strong"] + h["method/assigned_weak"] == 240
