"""MCR (``mcr``, methods.md §10): JSD, the perturbed logits and which side gets gradient, the three games'
sign patterns, supervised NT-Xent, the permutation generator's state, requirements and evaluation.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.mcr import (
    draw_permutations,
    game_loss,
    jsd,
    perturbed_logits,
    supervised_nt_xent,
)

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=3, epochs=2, steps_per_epoch=1, seed=3)


def tiny(widths: tuple[int, int] = (3, 3)) -> tuple[MultimodalModel, Batch]:
    torch.manual_seed(0)
    wa, wv = widths
    model = MultimodalModel({"a": Linear(4, wa), "v": Linear(2, wv)}, ConcatFusion({"a": wa, "v": wv}, 3), 3)
    batch = Batch(
        inputs={"a": torch.randn(6, 4), "v": torch.randn(6, 2)},
        labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        index=torch.arange(6),
    )
    return model, batch


# --------------------------------------------------------------------------------------------- JSD


def test_jsd_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    reference = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    # row 0: p = (½, ½), q = (¾, ¼), m = (5/8, 3/8)
    #   KL(p‖m) = ½ ln(0.5/0.625) + ½ ln(0.5/0.375) = ½ ln 0.8 + ½ ln(4/3) = 0.032269
    #   KL(q‖m) = ¾ ln(0.75/0.625) + ¼ ln(0.25/0.375) = ¾ ln 1.2 + ¼ ln(2/3) = 0.035375
    #   JSD = ½ (0.032269 + 0.035375) = 0.033822
    # row 1: identical distributions → 0; batch mean = 0.033822 / 2 = 0.016911
    kl_pm = 0.5 * math.log(0.8) + 0.5 * math.log(4 / 3)
    kl_qm = 0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)
    expected = 0.5 * (0.5 * (kl_pm + kl_qm))
    assert jsd(logits, reference).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.016911, abs=1e-6)
    assert jsd(reference, logits).item() == pytest.approx(expected, rel=1e-6)  # symmetric
    assert jsd(logits, logits).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------ the perturbed logits


def leaf_shares() -> dict[str, torch.Tensor]:
    return {
        "a": torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True),
        "v": torch.tensor([[3.0, 3.0], [5.0, 1.0]], requires_grad=True),
    }


def test_perturbed_logits_by_hand_and_the_side_that_gets_gradient():
    perms = torch.tensor([[1, 0], [0, 1]])  # K = 2: a swap, then the identity
    shares = leaf_shares()
    own = perturbed_logits(shares, "a", perms, detach="rest")  # sa_detv
    # π_1 = (1, 0): row 0 = a_1 + v_0 = (0, 2) + (3, 3) = (3, 5); row 1 = a_0 + v_1 = (1, 0) + (5, 1) = (6, 1)
    # π_2 = identity: rows 2, 3 = a + v = (4, 3), (5, 3)
    assert own.tolist() == [[3.0, 5.0], [6.0, 1.0], [4.0, 3.0], [5.0, 3.0]]
    own.sum().backward()
    assert shares["a"].grad.tolist() == [[2.0, 2.0], [2.0, 2.0]]  # each a row used once per permutation
    assert shares["v"].grad is None  # detached: no gradient into the video side

    shares = leaf_shares()
    others = perturbed_logits(shares, "a", perms, detach="own")  # sa_deta: same values, other side
    assert others.tolist() == own.tolist()
    others.sum().backward()
    assert shares["a"].grad is None and shares["v"].grad.tolist() == [[2.0, 2.0], [2.0, 2.0]]

    shares = leaf_shares()
    perturbed_logits(shares, "v", perms, detach="none").sum().backward()  # sv: both sides
    assert shares["a"].grad is not None and shares["v"].grad is not None


def test_gradient_of_one_term_reaches_only_its_side_of_the_model():
    model, batch = tiny()
    features = model.encode(batch.inputs)
    shares = model.modality_logits(features)
    z = (shares["a"] + shares["v"]).detach()  # isolate the perturbed side
    perms = draw_permutations(3, 6, torch.Generator().manual_seed(0))
    jsd(perturbed_logits(shares, "a", perms, detach="rest"), z.repeat(3, 1)).backward()  # J_sa_detv
    assert model.encoders["a"].weight.grad.abs().max() > 0
    assert model.encoders["v"].weight.grad is None  # the video encoder gets nothing ...
    w = model.fusion.linear.weight.grad
    assert w[:, :3].abs().max() > 0 and w[:, 3:].abs().max() == 0  # ... nor W_v (its whole share detached)


# ------------------------------------------------------------------------------------------ the games


@pytest.mark.parametrize(
    ("reg_by", "expected"),
    [
        ("greedy", 0.02),  # 0.1 · (−0.1 + 0.2 − 0.3 + 0.4)
        ("ind", -0.04),  # 0.1 · (−0.1 − 0.3)
        ("colab", -0.11),  # 0.1 · (−0.5 − 0.6)
    ],
)
def test_game_sign_patterns_on_hand_chosen_values(reg_by, expected):
    # M = 2: own_a = J_sa_detv = 0.1, others_a = J_sa_deta = 0.2, own_v = J_sv_deta = 0.3,
    # others_v = J_sv_detv = 0.4, full: J_sa = 0.5, J_sv = 0.6; l = 0.1
    t = torch.tensor
    own, others, full = {"a": t(0.1), "v": t(0.3)}, {"a": t(0.2), "v": t(0.4)}, {"a": t(0.5), "v": t(0.6)}
    assert game_loss(own, others, full, reg_by, 0.1).item() == pytest.approx(expected, abs=1e-7)


# --------------------------------------------------------------------------------------------- NT-Xent


def test_supervised_nt_xent_on_a_two_sample_case_by_hand():
    # b = 2 samples (labels 0, 1): a_1 = (1, 0), a_2 = (0, 1), v_1 = (3, 4), v_2 = (0, 2); τ = 0.5
    # cosines: (a_1, v_1) = 0.6, (a_2, v_2) = 1, (v_1, a_2) = (v_1, v_2) = 0.8, the others 0; s = cos / 0.5
    # anchor a_1, positive v_1 (1.2), negatives a_2, v_2 (0, 0):   log(1 + 2 e^{−1.2})
    # anchor v_1, positive a_1 (1.2), negatives a_2, v_2 (1.6, 1.6): log(1 + 2 e^{0.4})
    # anchors a_2 and v_2, positive each other (2), negatives a_1 (0), v_1 (1.6): log(1 + e^{−2} + e^{−0.4})
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, 2.0]])  # [f^a; f^v]
    labels = torch.tensor([0, 1, 0, 1])  # labels tiled twice
    expected = (
        math.log(1 + 2 * math.exp(-1.2))
        + math.log(1 + 2 * math.exp(0.4))
        + 2 * math.log(1 + math.exp(-2) + math.exp(-0.4))
    ) / 4
    assert supervised_nt_xent(feats, labels, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_zero_without_negatives_or_positives():
    feats = torch.randn(4, 3, requires_grad=True)
    loss = supervised_nt_xent(feats, torch.tensor([1, 1, 1, 1]), 0.5)  # no negatives
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros(4, 3))
    assert supervised_nt_xent(feats, torch.tensor([0, 1, 2, 3]), 0.5).item() == 0.0  # no positives


# ------------------------------------------------------------------------------------------ the method


def test_identity_permutations_leave_only_the_supervised_terms():
    # b = 1: every permutation is the identity, so every J = 0; one label → no negatives → L_Con = 0
    model, batch = tiny()
    one = Batch(
        inputs={m: x[:1] for m, x in batch.inputs.items()}, labels=batch.labels[:1], index=torch.arange(1)
    )
    method = build_method("mcr", {"num_samples": 4, "unimodal_weight": 0.5}, CONTEXT)
    model.attach_method_modules(method.build_modules(model))
    out = method.training_step(model, one, 0)
    features = model.encode(one.inputs)
    uni = model.unimodal(features)
    expected = F.cross_entropy(model.fuse(features), one.labels) + 0.5 * sum(
        F.cross_entropy(uni[m], one.labels) for m in ("a", "v")
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["loss_mipd"] == pytest.approx(0.0, abs=1e-7) and out.logs["loss_con"] == 0.0


def test_every_game_trains_every_parameter_it_should():
    for reg_by in ("greedy", "ind", "colab"):
        model, batch = tiny()
        method = build_method("mcr", {"reg_by": reg_by, "num_samples": 3, "ceb_weight": 0.1}, CONTEXT)
        model.attach_method_modules(method.build_modules(model))
        out = method.training_step(model, batch, 0)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        kinds = {"greedy": {"own", "others"}, "ind": {"own"}, "colab": {"full"}}[reg_by]
        assert {k.split("_")[1] for k in out.logs if k.startswith("jsd_")} == kinds
        assert method.label == ("mcr" if reg_by == "greedy" else f"mcr[{reg_by}]")


def test_permutation_generator_state_round_trips_and_resumes_exactly():
    model, batch = tiny()
    method = build_method("mcr", {"num_samples": 2}, CONTEXT)
    method.training_step(model, batch, 0)  # advances the generator
    clone = build_method("mcr", {"num_samples": 2}, CONTEXT)
    assert not torch.equal(clone.state_dict()["generator"], method.state_dict()["generator"])
    clone.load_state_dict(method.state_dict())
    assert torch.equal(draw_permutations(2, 6, method.generator), draw_permutations(2, 6, clone.generator))


def test_perturb_in_eval_mode_restores_train_mode():
    model, batch = tiny()
    method = build_method("mcr", {"num_samples": 2, "perturb_in_eval_mode": True}, CONTEXT)
    model.train()
    out = method.training_step(model, batch, 0)
    assert model.encoders.training and torch.isfinite(out.loss)


def test_requirements_and_unequal_widths_are_refused():
    req = METHODS.get("mcr").requires
    with pytest.raises(ConfigError, match="decomposable"):
        req.check("mcr", "concat_mlp", False, 2)
    with pytest.raises(ConfigError, match="at least 2"):
        req.check("mcr", "concat", True, 1)
    model, _ = tiny(widths=(3, 2))
    with pytest.raises(ConfigError, match="contrastive_weight"):
        build_method("mcr", {}, CONTEXT).build_modules(model)
    assert build_method("mcr", {"contrastive_weight": 0}, CONTEXT).build_modules(model) == {}


def test_evaluation_is_the_fusion_head():
    model, batch = tiny()
    method = build_method("mcr", {}, CONTEXT)
    features = model.encode(batch.inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))
