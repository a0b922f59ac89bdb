"""LeMDA (``lemda``, methods.md §13): G is the identity at init, its own optimiser, the gradient reversal,
L_KL and L_cons by hand, what the main parameters receive, the clip, and evaluation without G.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method
from midasbench.methods.lemda import (
    AUGMENTER,
    FeatureVAE,
    Lemda,
    consistency_loss,
    kl_term,
    reverse_gradient,
    split_features,
    vae_hidden_dims,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=2, steps_per_epoch=1, seed=3)


def setup(**params) -> tuple[Lemda, MultimodalModel, Batch]:
    """A tiny two-modality model (widths 3 + 2) with G attached, as the trainer attaches it."""
    torch.manual_seed(0)
    model = MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 2)}, ConcatFusion({"a": 3, "b": 2}, 3), 3)
    method = build_method("lemda", params, CONTEXT)
    model.attach_method_modules(method.build_modules(model))
    batch = Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        index=torch.arange(6),
    )
    return method, model, batch


def groups_of(method: Lemda, model: MultimodalModel) -> dict[str, list[torch.nn.Parameter]]:
    out: dict[str, list[torch.nn.Parameter]] = {}
    for g in method.param_groups(model):
        out.setdefault(g.optimizer, []).extend(g.params)
    return out


def trainer_backward(method: Lemda, model: MultimodalModel, batch: Batch) -> None:
    """The trainer's backward: the loss into ``main``'s parameters, each extra loss into its own."""
    groups = groups_of(method, model)
    out = method.training_step(model, batch, 0)
    out.loss.backward(inputs=groups["main"], retain_graph=True)
    out.extra_losses[AUGMENTER].backward(inputs=groups[AUGMENTER])


# ------------------------------------------------------------------------------------------- G itself


def test_hidden_widths_follow_the_official_step_rule():
    # D = 1024, z = 8: step = int(1016 / 5) = 203 → 821, 618, 415, 212 (the CREMA-D 512 + 512 case)
    assert vae_hidden_dims(1024, 8, 4) == [821, 618, 415, 212]
    # D = 256: step = int(248 / 5) = 49 → 207, 158, 109, 60
    assert vae_hidden_dims(256, 8, 4) == [207, 158, 109, 60]
    # D = 18: step = 10 / 5 = 2 → 16, 14, 12, 10 (four widths; the official range stops at three)
    assert vae_hidden_dims(18, 8, 4) == [16, 14, 12, 10]
    # D = 5 < z: int(-3 / 5) = 0 → constant widths
    assert vae_hidden_dims(5, 8, 4) == [5, 5, 5, 5]


def test_augmenter_is_exactly_the_identity_at_init_in_train_and_eval_mode():
    torch.manual_seed(0)
    g = FeatureVAE(5, 8, 4, dropout=0.5)
    assert len(g.encoder) == 4 and len(g.decoder) == 5  # 4 encoder units, mirrored decoder ending in D
    assert g.decoder[-1].fc.out_features == 5 and g.decoder[0].fc.in_features == 8
    h = torch.randn(7, 5) * 3
    for train in (True, False):
        g.train(train)
        aug, mu, logvar = g(h)
        assert torch.equal(aug, h)  # the zero last layer adds exactly 0
        assert mu.shape == logvar.shape == (7, 8)


def test_kl_term_by_hand():
    # b = 1, z_dim = 2; μ = (1, 0), log σ² = (0, ln 2):
    # Σ (1 + log σ² − μ² − σ²) = (1 + 0 − 1 − 1) + (1 + ln 2 − 0 − 2) = −2 + ln 2
    # → −½ (−2 + ln 2) / (1 · 2) = (2 − ln 2) / 4 = 0.326713
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    assert kl_term(mu, logvar).item() == pytest.approx((2 - math.log(2)) / 4, rel=1e-6)
    # μ = 0, log σ² = 0 is the prior itself: 0, whatever b and z_dim
    assert kl_term(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_consistency_loss_by_hand_with_the_confidence_mask():
    aug = torch.tensor([[0.0, 0.0], [5.0, 0.0]], requires_grad=True)
    orig = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    # row 0: p = (½, ½), q = (¾, ¼), max q = 0.75 > 0.5 → KL(p‖q) = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3)
    # row 1: q = (½, ½), max q = 0.5 is not > 0.5 → masked to 0; the mean is over both rows
    loss = consistency_loss(aug, orig, threshold=0.5)
    assert loss.item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    loss.backward()
    assert orig.grad is None  # the original side is a constant
    assert aug.grad[1].abs().max() == 0  # the masked row gives no gradient
    assert aug.grad[0].abs().max() > 0


def test_gradient_reversal_by_hand():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)  # identity forward
    (y * torch.tensor([3.0, 4.0])).sum().backward()
    # d/dx of (3 y_0 + 4 y_1) is (3, 4), scaled by −0.5 on the way back: (−1.5, −2)
    assert x.grad.tolist() == [-1.5, -2.0]


def test_split_features_restores_the_modality_slices():
    h = torch.arange(10.0).reshape(2, 5)
    parts = split_features(h, {"a": 3, "b": 2})
    assert parts["a"].tolist() == [[0, 1, 2], [5, 6, 7]] and parts["b"].tolist() == [[3, 4], [8, 9]]


# --------------------------------------------------------------------------------------- the step


def test_groups_put_G_in_its_own_adam_and_leave_the_unimodal_heads_out():
    method, model, _ = setup()
    groups = groups_of(method, model)
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids[AUGMENTER] == {id(p) for p in model.method_modules[AUGMENTER].parameters()}
    assert ids["main"] == {id(p) for p in [*model.encoders.parameters(), *model.fusion.parameters()]}
    assert not any(id(p) in ids["main"] | ids[AUGMENTER] for p in model.unimodal_heads.parameters())
    spec = method.optimizers()[AUGMENTER]
    assert (spec.name, spec.lr, spec.weight_decay) == ("adam", 1e-4, 1e-5)


def test_G_gets_minus_adv_weight_times_the_task_gradient():
    # only L_task (the other weights 0): G's gradient must be −adv_weight × that of an unreversed copy
    params = {"regularizer_weight": 0, "kl_weight": 0, "consistency": False, "adv_weight": 0.25}
    method, model, batch = setup(**params)
    g = model.method_modules[AUGMENTER]
    torch.manual_seed(5)
    out = method.training_step(model, batch, 0)
    got = torch.autograd.grad(out.extra_losses[AUGMENTER], list(g.parameters()), allow_unused=True)
    torch.manual_seed(5)  # the same dropout masks and ε
    features = model.encode(batch.inputs)
    h = torch.cat([features["a"], features["b"]], 1)
    aug, _, _ = g(h.detach())
    logits = model.fuse(split_features(torch.cat([h, aug]), model.feature_dims))
    plain = F.cross_entropy(logits, batch.labels.repeat(2))
    want = torch.autograd.grad(plain, list(g.parameters()), allow_unused=True)
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-6)
    assert any(w is not None and w.abs().max() > 0 for w in want)  # the decoder's last layer
    for a, w in zip(got, want, strict=True):
        if w is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, -0.25 * w)


def test_main_params_get_the_task_gradient_through_h_only():
    method, model, batch = setup()
    torch.manual_seed(7)
    trainer_backward(method, model, batch)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(("encoders.", "fusion."))}
    for p in model.parameters():
        p.grad = None
    # reference: encoders see CE of the clean half only (ĥ is built from sg(h)); the fusion head gets
    # L_task over both halves (no reversal on its side) + 0.01 L_cons; nothing from L_reg or L_KL
    torch.manual_seed(7)
    features = model.encode(batch.inputs)
    h = torch.cat([features["a"], features["b"]], 1)
    aug, _, _ = model.method_modules[AUGMENTER](h.detach())
    dims = model.feature_dims
    task = F.cross_entropy(
        model.fuse(split_features(torch.cat([h, aug.detach()]), dims)), batch.labels.repeat(2)
    )
    with torch.no_grad():
        orig = model.fuse(split_features(h.detach(), dims))
    cons = consistency_loss(model.fuse(split_features(aug.detach(), dims)), orig, 0.5)
    names = list(got)
    params = [dict(model.named_parameters())[n] for n in names]
    want = torch.autograd.grad(task + 0.01 * cons, params)
    for n, w in zip(names, want, strict=True):
        torch.testing.assert_close(got[n], w, msg=n)
    assert all(p.grad is None for p in model.unimodal_heads.parameters())


def test_both_optimisers_step_and_G_leaves_the_identity():
    method, model, batch = setup()
    groups = groups_of(method, model)
    spec = method.optimizers()[AUGMENTER]
    aug_opt = torch.optim.Adam(groups[AUGMENTER], lr=spec.lr, weight_decay=spec.weight_decay)
    main_opt = torch.optim.SGD(groups["main"], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer_backward(method, model, batch)
    method.after_backward(model, 0)
    main_opt.step()
    aug_opt.step()
    after = dict(model.named_parameters())
    last = f"method_modules.{AUGMENTER}.decoder.4.fc.weight"
    assert after[last].abs().max() > 0  # G's last layer moved off zero: ĥ ≠ h from now on
    assert not torch.equal(after["fusion.linear.weight"], before["fusion.linear.weight"])
    assert all(torch.equal(after[n], before[n]) for n in before if n.startswith("unimodal_heads."))


def test_official_output_relu_keeps_G_the_identity_for_ever():
    # the official last unit ends in ReLU: zero pre-activation, zero ReLU gradient, so the decoder never moves
    method, model, batch = setup(output_relu=True)
    trainer_backward(method, model, batch)
    g = model.method_modules[AUGMENTER]
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in g.decoder.parameters())
    assert g.fc_mu.weight.grad.abs().max() > 0  # only L_KL reaches μ / log σ²


@pytest.mark.parametrize("scope", ["augmenter", "all"])
def test_clip_scope(scope):
    method, model, _ = setup(clip_scope=scope, grad_clip=1.0)
    groups = groups_of(method, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    method.after_backward(model, 0)
    norm = lambda ps: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps))  # noqa: E731
    n_main = sum(p.numel() for p in groups["main"])
    if scope == "augmenter":
        assert norm(groups[AUGMENTER]) == pytest.approx(1.0, rel=1e-4)  # G alone rescaled to norm 1
        assert norm(groups["main"]) == pytest.approx(math.sqrt(n_main))  # all-ones, untouched
    else:
        assert norm(groups[AUGMENTER] + groups["main"]) == pytest.approx(1.0, rel=1e-4)  # one joint norm
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.unimodal_heads.parameters())


def test_logs_the_four_losses_and_keeps_no_state():
    method, model, batch = setup()
    logs = method.training_step(model, batch, 0).logs
    assert {"loss_task", "loss_reg", "loss_kl", "loss_cons"} <= set(logs)
    assert logs["loss_reg"] == 0.0  # G is the identity at init: MSE(ĥ, h) = 0
    assert method.state_dict() == {}
    with pytest.raises(ValueError):
        method.load_state_dict({"x": 1})


def test_evaluation_ignores_G():
    method, model, batch = setup()
    with torch.no_grad():  # make G far from the identity
        for p in model.method_modules[AUGMENTER].parameters():
            p.normal_()
    model.eval()
    features = model.encode(batch.inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))
