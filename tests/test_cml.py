"""CML (methods-more.md §25): the §25.8 values (official and BB), trick 2's gradient, ε, the nested
removal masks, the loss on a hand-set model (sum/mean, ×W under DDP, BB form), state, evaluation."""

import pytest
import torch
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.cml import CML, bb_hinge, nested_keep_masks, official_hinge, removed_features

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=3, steps_per_epoch=1, seed=3)
TRUE = torch.tensor([True, True])


def cml(runtime: Runtime | None = None, **params):
    context = CONTEXT if runtime is None else MethodContext(**{**CONTEXT.__dict__, "runtime": runtime})
    return build_method("cml", params, context)


def test_spec_unit_values_official_and_bb():
    # §25.8: both full predictions right, conf(z) = (0.9, 0.6), conf(z_{−m}) = (0.7, 0.8)
    # official R = relu(0.7 − 0.9) + relu(0.8 − 0.6) = 0 + 0.2 = 0.2, λR = 0.1 · 0.2 = 0.02
    full, reduced = torch.tensor([0.9, 0.6]), torch.tensor([0.7, 0.8])
    r = official_hinge(full, reduced, TRUE, TRUE).sum()
    assert r.item() == pytest.approx(0.2, abs=1e-6)
    assert (0.1 * r).item() == pytest.approx(0.02, abs=1e-7)
    # BB: max(0, (0.7 − 0.9) + (0.8 − 0.6)) = max(0, 0) = 0
    assert bb_hinge(full, reduced).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("trick", [1, 2])
def test_trick_two_sends_the_gradient_to_the_reduced_confidence_only(trick):
    full = torch.tensor([0.9, 0.6], requires_grad=True)
    reduced = torch.tensor([0.7, 0.8], requires_grad=True)
    # trick 1: sample 2's full prediction right; trick 2: sample 2 wrong with and without the modality
    right_full = TRUE if trick == 1 else torch.tensor([True, False])
    right_reduced = TRUE if trick == 1 else torch.tensor([True, False])
    r = official_hinge(full, reduced, right_full, right_reduced).sum()
    assert r.item() == pytest.approx(0.2, abs=1e-6)  # relu(0.8 − 0.6) = 0.2 either way
    r.backward()
    # sample 1: relu(−0.2) has no gradient; sample 2: ∂/∂conf_reduced = 1, ∂/∂conf_full = −1 (trick 1) or
    # 0 (trick 2, sg(conf_full))
    assert reduced.grad.tolist() == [0.0, 1.0]
    assert full.grad.tolist() == ([0.0, -1.0] if trick == 1 else [0.0, 0.0])


def test_no_term_when_the_reduced_input_turns_right_or_eps_absorbs_the_gain():
    full, reduced = torch.tensor([0.6]), torch.tensor([0.8])
    # full wrong, reduced right: neither trick applies
    assert official_hinge(full, reduced, torch.tensor([False]), torch.tensor([True])).item() == 0.0
    # ε = 0.1 with the gain 0.2 (full right): relu(0.2 − 0.1) = 0.1
    eps = official_hinge(full, reduced, torch.tensor([True]), torch.tensor([True]), eps=0.1)
    assert eps.item() == pytest.approx(0.1, abs=1e-6)


def test_nested_masks_remove_one_more_modality_per_level_down_to_one():
    keep = nested_keep_masks(60, 3, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 60, 3)
    assert keep[0].all()  # level 0: every modality
    assert keep.sum(dim=2).tolist() == [[3] * 60, [2] * 60, [1] * 60]  # M − k modalities at level k
    assert (keep[1:] <= keep[:-1]).all()  # nested: S_{k+1} ⊂ S_k
    assert set((~keep[1]).float().argmax(dim=1).tolist()) == {0, 1, 2}  # per-sample orders differ
    again = nested_keep_masks(60, 3, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)  # a seeded generator: same draws on every rank


def test_removal_zeroes_the_encoder_feature():
    features = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[5.0], [6.0]])}
    out = removed_features(features, torch.tensor([[True, False], [False, True]]))
    assert out["a"].tolist() == [[1.0, 2.0], [0.0, 0.0]] and out["b"].tolist() == [[0.0], [6.0]]


def symmetric_model() -> tuple[MultimodalModel, Batch]:
    """f^a = f^b = 1, W = [[1, 1], [0, 0]], c = (0, 1.8), y = 0, two identical samples. Removing either
    modality gives the same logits: z = (2, 1.8), z_{−m} = (1, 1.8)."""
    model = MultimodalModel({"a": Identity(1), "b": Identity(1)}, ConcatFusion({"a": 1, "b": 1}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        model.fusion.linear.bias.copy_(torch.tensor([0.0, 1.8]))
    ones = torch.ones(2, 1)
    return model, Batch(inputs={"a": ones, "b": ones}, labels=torch.tensor([0, 0]), index=torch.arange(2))


# By hand: conf(z) = σ(0.2) = 0.5498340 (pred 0, right); conf(z_{−m}) = σ(0.8) = 0.6899745 (pred 1, wrong)
# trick 1 per sample: 0.6899745 − 0.5498340 = 0.1401405; R (sum, b = 2) = 0.2802810, R (mean) = 0.1401405
# CE(z) = log(1 + e^−0.2) = 0.5981389; CE(z_{−m}) = log(1 + e^0.8) = 1.1711007; L_CE = 0.8846198
@pytest.mark.parametrize(
    ("params", "world", "expected"),
    [
        ({}, 1, 0.8846198 + 0.1 * 0.2802810),  # official, sum: 0.9126479
        ({"reduction": "mean"}, 1, 0.8846198 + 0.1 * 0.1401405),  # 0.8986339
        ({}, 2, 0.8846198 + 0.1 * 2 * 0.2802810),  # ×W = 2 under DDP (§25.9): 0.9406760
        ({"reduction": "mean"}, 2, 0.8846198 + 0.1 * 0.1401405),  # mean: no factor
        ({"form": "bb"}, 1, 0.8846198 + 0.1 * 0.2802810),  # ½[CE + CE] + λ max(0, Σ gains)
    ],
)
def test_training_step_loss_by_hand(params, world, expected):
    model, batch = symmetric_model()
    method = cml(Runtime(world_size=world), **params)
    out = method.training_step(model, batch, epoch=0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.logs["loss_ce"] == pytest.approx(0.8846198, abs=1e-5)


def test_three_modalities_run_every_nested_level():
    torch.manual_seed(0)
    dims = {"a": 2, "b": 3, "c": 1}
    model = MultimodalModel({m: Identity(d) for m, d in dims.items()}, ConcatFusion(dims, 3), 3)
    method = build_method(
        "cml", {}, MethodContext(modalities=tuple(dims), num_classes=3, epochs=1, steps_per_epoch=1)
    )
    calls = []
    model.fusion.register_forward_hook(lambda mod, inp, out: calls.append(out))
    batch = Batch(
        inputs={m: torch.randn(4, d) for m, d in dims.items()},
        labels=torch.tensor([0, 1, 2, 0]),
        index=torch.arange(4),
    )
    out = method.training_step(model, batch, epoch=0)
    assert len(calls) == 3  # full, two left, one left; the encoders ran once
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.trainable_parameters(model))


@pytest.mark.parametrize("form", ["official", "bb"])
def test_state_round_trip_resumes_the_draws(form):
    model, batch = symmetric_model()
    batch = Batch(
        inputs={m: torch.randn(5, 1) for m in "ab"},
        labels=torch.tensor([0, 1, 0, 1, 0]),
        index=torch.arange(5),
    )
    first = cml(form=form)
    first.on_epoch_start(model, 0)
    first.training_step(model, batch, epoch=0)
    saved = first.state_dict()
    resumed = cml(form=form)
    resumed.load_state_dict(saved)
    for epoch in (1, 2):  # the uninterrupted and the resumed run draw the same removals and losses
        first.on_epoch_start(model, epoch)
        resumed.on_epoch_start(model, epoch)
        assert first.removed == resumed.removed
        a, b = first.training_step(model, batch, epoch), resumed.training_step(model, batch, epoch)
        assert a.loss.item() == b.loss.item()
    assert repr(first.state_dict()) == repr(resumed.state_dict())
    if form == "bb":
        assert first.removed in (0, 1)


def test_evaluation_is_the_full_fused_head_and_requirements():
    model, batch = symmetric_model()
    features = model.encode(batch.inputs)
    assert torch.equal(cml().logits_from_features(model, features), model.fuse(features))
    with pytest.raises(ConfigError, match="at least 2"):
        CML.requires.check("cml", "concat", True, 1)
    CML.requires.check("cml", "concat_mlp", False, 2)  # post-encoder zeroing works with any head
