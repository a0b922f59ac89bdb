"""LFM (``lfm``, methods.md §9): the fitted α schedule and its rescaling, the code's and the textbook
JSD, the loss, late-fusion evaluation, the sliced and InfoNCE options, the learnable HVP rule on a tiny
quadratic and its per-epoch update on held-out probe rows, state and requirements. Expected values are
computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion, ConcatMLPFusion, ConcatMLPParams
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.lfm import (
    divergence,
    fitted_alpha_cls,
    fitted_epoch,
    hvp_alpha_gradient,
    learnable_alpha_step,
    pairwise_mean,
    symmetric_infonce,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=200, steps_per_epoch=1, seed=1)
LN3 = math.log(3)
# p = softmax(ln 3, 0) = (3/4, 1/4), q = softmax(0, 0) = (1/2, 1/2), m = (5/8, 3/8)
KL_M_P = 0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25)  # = 0.0380984
KL_M_Q = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)  # = 0.0315840
KL_P_M = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)  # = 0.0353749
KL_Q_M = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)  # = 0.0322693
CODE_JSD = 0.5 * (KL_M_P + KL_M_Q)  # = 0.0348412
TEXTBOOK_JSD = 0.5 * (KL_P_M + KL_Q_M)  # = 0.0338221


def identity_model(fusion: torch.nn.Module | None = None) -> MultimodalModel:
    """Identity encoders (d = 2) and identity unimodal heads: o_a = f^a = x^a, o_b = x^b."""
    fusion = ConcatFusion({"a": 2, "b": 2}, 2) if fusion is None else fusion
    model = MultimodalModel({"a": Identity(2), "b": Identity(2)}, fusion, 2)
    with torch.no_grad():
        for head in model.unimodal_heads.values():
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
    return model


def one_row() -> Batch:
    return Batch(
        inputs={"a": torch.tensor([[LN3, 0.0]]), "b": torch.zeros(1, 2)},
        labels=torch.tensor([0]),
        index=torch.arange(1),
    )


def lfm(context: MethodContext = CONTEXT, **params):
    return build_method("lfm", params, context)


# ---- §9.1 fitted schedule


def test_fitted_schedule_values_of_the_spec():
    # α_1(30) = 0.2046237 + 0.0033547·30 + 1.2299e-4·900 − 2.9295e-6·27000 + 2.2384e-8·810000
    #          − 5.3972e-11·24300000 = 0.20462 + 0.10064 + 0.11069 − 0.07910 + 0.01813 − 0.00131 = 0.35368
    assert fitted_alpha_cls(0) == pytest.approx(0.204623704, abs=1e-9)
    assert fitted_alpha_cls(30) == pytest.approx(0.353679, abs=1e-5)
    for epoch, value in ((70, 0.484), (100, 0.539), (150, 0.821), (199, 0.916)):
        assert fitted_alpha_cls(epoch) == pytest.approx(value, abs=5e-4)
    # E = 200: no change; α_2 = 1 − α_1
    method = lfm()
    alpha_cls, alpha_align = method.alphas(30)
    assert alpha_cls == pytest.approx(0.353679, abs=1e-5) and alpha_cls + alpha_align == pytest.approx(1.0)


def test_fitted_schedule_is_rescaled_to_the_run_length():
    # E = 70: epoch 35 is read at e' = 35 · 200/70 = 100 → α_1 = 0.539; epoch 0 → 0.205
    assert fitted_epoch(35, 70, rescale=True) == pytest.approx(100.0)
    assert fitted_epoch(35, 70, rescale=False) == 35.0
    method = lfm(MethodContext(**{**CONTEXT.__dict__, "epochs": 70}))
    assert method.alphas(35)[0] == pytest.approx(0.539, abs=5e-4)
    assert method.alphas(0)[0] == pytest.approx(0.2046, abs=1e-4)
    official = lfm(MethodContext(**{**CONTEXT.__dict__, "epochs": 70}), rescale_fitted=False)
    assert official.alphas(35)[0] == pytest.approx(fitted_alpha_cls(35))


# ---- §9.1 alignment


def test_divergence_code_form_and_textbook_jsd_by_hand():
    a, b = torch.tensor([[LN3, 0.0]]), torch.zeros(1, 2)
    # code (F.kl_div(p.log(), m) = KL(m‖p)): ½ (0.0380984 + 0.0315840) = 0.0348412
    assert divergence(a, b, "code").item() == pytest.approx(CODE_JSD, rel=1e-5)
    # textbook: ½ (KL(p‖m) + KL(q‖m)) = ½ (0.0353749 + 0.0322693) = 0.0338221
    assert divergence(a, b, "textbook").item() == pytest.approx(TEXTBOOK_JSD, rel=1e-5)
    # batch mean: a second, identical-distribution row adds 0 → half the value; symmetric in its arguments
    two = divergence(torch.cat([a, torch.zeros(1, 2)]), torch.zeros(2, 2), "code")
    assert two.item() == pytest.approx(CODE_JSD / 2, rel=1e-5)
    assert divergence(b, a, "code").item() == pytest.approx(CODE_JSD, rel=1e-5)


def test_more_than_two_modalities_average_over_pairs():
    a, b, c = torch.tensor([[LN3, 0.0]]), torch.zeros(1, 2), torch.zeros(1, 2)
    # pairs (a, b) and (a, c): D = 0.0348412 each; (b, c): 0 → mean 2D/3
    mean = pairwise_mean([a, b, c], lambda x, y: divergence(x, y, "code"))
    assert mean.item() == pytest.approx(2 * CODE_JSD / 3, rel=1e-5)


def test_symmetric_infonce_by_hand():
    # a = b = I: S = I/0.4, each row (2.5, 0) with its positive first/second → CE = log(1 + e^−2.5) = 0.0789
    eye = torch.eye(2)
    assert symmetric_infonce(eye, eye, 0.4).item() == pytest.approx(math.log(1 + math.exp(-2.5)), rel=1e-6)
    # b rows swapped: the positive has cosine 0, the negative 1 → CE = log(1 + e^2.5) = 2.5789 both ways
    swapped = eye.flip(0)
    assert symmetric_infonce(eye, swapped, 0.4).item() == pytest.approx(math.log(1 + math.exp(2.5)), rel=1e-6)


# ---- §9.1 loss and prediction


def test_loss_by_hand_on_one_row():
    method, model = lfm(), identity_model()
    out = method.training_step(model, one_row(), epoch=0)
    # o_a = (ln 3, 0), o_b = 0: o = (ln 3 / 2, 0) → CE(o, 0) = log(1 + e^{−ln3/2}) = log(1 + 1/√3) = 0.45580
    cls = math.log(1 + 1 / math.sqrt(3))
    # e = 0, E = 200: α_1 = 0.204623704, α_2 = 0.795376296; L = 2 (α_1 · 0.45580 + α_2 · 0.0348412)
    expected = 2 * (0.204623704 * cls + 0.795376296 * CODE_JSD)  # = 2 (0.093268 + 0.027712) = 0.241960
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.logs["loss_cls"] == pytest.approx(cls, rel=1e-6)
    assert out.logs["loss_align"] == pytest.approx(CODE_JSD, rel=1e-5)
    infonce = lfm(align="infonce").training_step(model, one_row(), epoch=0)
    # one row: S is 1×1, InfoNCE = 0 → L = 2 α_1 · 0.45580
    assert infonce.loss.item() == pytest.approx(2 * 0.204623704 * cls, rel=1e-5)


def test_evaluation_is_the_average_of_the_unimodal_heads():
    method, model = lfm(), identity_model()
    batch = one_row()
    logits = method.logits_from_features(model, model.encode(batch.inputs))
    torch.testing.assert_close(logits, torch.tensor([[LN3 / 2, 0.0]]))  # ½ (o_a + o_b)
    with torch.no_grad():
        model.fusion.linear.weight.fill_(7.0)  # the fusion head plays no part
    torch.testing.assert_close(method.logits_from_features(model, model.encode(batch.inputs)), logits)
    trained = {id(p) for p in method.trainable_parameters(model)}
    assert not any(id(p) in trained for p in model.fusion.parameters())
    assert all(id(p) in trained for p in model.unimodal_heads.parameters())


def test_sliced_mode_uses_the_fused_logits_and_the_shares():
    model = identity_model()
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model.fusion.linear.bias.zero_()
    method = lfm(fusion="sliced")
    assert method.label == "lfm[sliced]"
    method.build_modules(model)
    out = method.training_step(model, one_row(), epoch=0)
    # z = s^a = (ln 3, 0), s^b = 0 → CE(z, 0) = log(4/3); the alignment is D(s^a, s^b) = 0.0348412
    assert out.logs["loss_cls"] == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert out.logs["loss_align"] == pytest.approx(CODE_JSD, rel=1e-5)
    trained = {id(p) for p in method.trainable_parameters(model)}
    assert all(id(p) in trained for p in model.fusion.parameters())
    assert not any(id(p) in trained for p in model.unimodal_heads.parameters())


def test_requirements_are_refused_clearly():
    mlp = identity_model(ConcatMLPFusion({"a": 2, "b": 2}, 2, ConcatMLPParams(hidden=4)))
    with pytest.raises(ConfigError, match="fusion=sliced needs a decomposable"):
        lfm(fusion="sliced").build_modules(mlp)
    lfm().build_modules(mlp)  # late fusion runs on any head
    unequal = MultimodalModel({"a": Identity(2), "b": Identity(3)}, ConcatFusion({"a": 2, "b": 3}, 2), 2)
    with pytest.raises(ConfigError, match="equal feature widths"):
        lfm(align="infonce").build_modules(unequal)
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        METHODS.get("lfm").requires.check("lfm", "concat", True, 1)
    assert METHODS.get("lfm").fidelity == "official-code"


# ---- §9.1 learnable schedule


def test_hvp_alpha_gradient_on_a_tiny_quadratic_by_hand():
    # θ = (w0 ∈ R², w1 ∈ R) = x = (1, 1, 2); L_cls = ½ (x0² + 2 x1² + x2²), L_align = x0 x2
    # g_cls = (x0, 2 x1, x2) = (1, 2, 2); H_total = α1 diag(1, 2, 1) + α2 (e0 e2ᵀ + e2 e0ᵀ)
    # H g_cls = (α1 + 2 α2, 4 α1, α2 + 2 α1); block of w0 = (α1 + 2 α2, 4 α1), mean = (5 α1 + 2 α2)/2
    # α = (0.05, 0.95): (0.25 + 1.9)/2 = 1.075
    w0 = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    w1 = torch.nn.Parameter(torch.tensor([2.0]))
    cls = 0.5 * (w0[0] ** 2 + 2 * w0[1] ** 2 + w1[0] ** 2)
    align = w0[0] * w1[0]
    grad = hvp_alpha_gradient(0.05 * cls + 0.95 * align, cls, [w0, w1])
    assert grad.item() == pytest.approx(1.075, rel=1e-6)
    assert w0.grad is None and w1.grad is None  # autograd.grad: no .grad is touched


def test_learnable_alpha_step_by_hand():
    # α_2 = 0.95 − 1e-4 · 1.075 = 0.9498925 at epoch 0 (η unchanged)
    alpha, lr = learnable_alpha_step(0.95, 1e-4, 1.075, epoch=0, halve_every=20)
    assert (alpha, lr) == (pytest.approx(0.9498925), 1e-4)
    # epoch 20: η halves first → 5e-5; α_2 = 0.5 − 5e-5 · 1000 = 0.45
    assert learnable_alpha_step(0.5, 1e-4, 1000.0, epoch=20, halve_every=20) == (pytest.approx(0.45), 5e-5)
    assert learnable_alpha_step(0.5, 1e-4, 1.0, epoch=19, halve_every=20)[1] == 1e-4
    # clipped to [0.05, 0.95]
    assert learnable_alpha_step(0.9, 1e-4, -1e4, epoch=1, halve_every=20)[0] == 0.95
    assert learnable_alpha_step(0.1, 1e-4, 1e4, epoch=1, halve_every=20)[0] == 0.05


class Column:
    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.values[rows].copy()


class Split:
    """A stand-in training split of 20 rows (only what ``gather_batch`` reads)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.columns = {m: Column(rng.normal(size=(20, 2)).astype(np.float32)) for m in ("a", "b")}
        self.labels = rng.integers(0, 2, size=20)
        self.lengths: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return 20


def test_learnable_update_on_held_out_probe_rows_and_state():
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": Runtime(train_split=Split())})  # type: ignore[arg-type]
    method = lfm(context, schedule="learnable", probe_rows=8)
    assert method.label == "lfm[learnable]"
    torch.manual_seed(0)
    model = MultimodalModel(
        {"a": Identity(2), "b": Identity(2)}, ConcatFusion({"a": 2, "b": 2}, 2), 2
    )  # random unimodal heads
    assert method.alphas(0) == (pytest.approx(0.05), 0.95)  # official start (α_1, α_2) = (0.05, 0.95)
    probe = method.probe()
    assert len(probe) == 8 and len(set(probe.tolist())) == 8
    plan = method.epoch_plan(0, EpochPlan(np.arange(20)))
    assert sorted(plan.rows.tolist()) == sorted(set(range(20)) - set(probe.tolist()))  # held out
    model.train()
    method.on_epoch_start(model, 0)
    assert model.training  # the eval-mode probe pass restores the mode
    assert method.alpha_grad != 0.0
    assert method.alpha_align == pytest.approx(min(0.95, 0.95 - 1e-4 * method.alpha_grad))  # clip above
    assert method.on_epoch_end(model, 0)["alpha_align"] == method.alpha_align
    clone = lfm(context, schedule="learnable", probe_rows=8)
    clone.load_state_dict(method.state_dict())
    assert clone.alphas(1) == method.alphas(1) and clone.lr_alpha == method.lr_alpha
    method.on_epoch_start(model, 20)  # η halves at epoch 20
    assert method.lr_alpha == 5e-5


def test_learnable_gradient_equals_an_independent_hvp():
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": Runtime(train_split=Split())})  # type: ignore[arg-type]
    method = lfm(context, schedule="learnable", probe_rows=8)
    torch.manual_seed(0)
    model = MultimodalModel({"a": Identity(2), "b": Identity(2)}, ConcatFusion({"a": 2, "b": 2}, 2), 2)
    method.on_epoch_start(model, 0)
    # the same quantity with torch.autograd.functional.hvp over the flat parameter vector
    split, rows = context.runtime.train_split, np.sort(method.probe()[:4])
    x = {m: torch.from_numpy(split.columns[m].values[rows]) for m in ("a", "b")}
    y = torch.from_numpy(split.labels[rows])
    params = list(method.trainable_parameters(model))
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(v):
        out, start = [], 0
        for s in shapes:
            out.append(v[start : start + s.numel()].reshape(s))
            start += s.numel()
        return out

    def split_losses(v):
        values = dict(
            zip(
                [n for n, _ in model.named_parameters() if not n.startswith("fusion.")],
                unflatten(v),
                strict=True,
            )
        )
        fa = x["a"] @ values["encoders.a.weight"].T + values["encoders.a.bias"]
        fb = x["b"] @ values["encoders.b.weight"].T + values["encoders.b.bias"]
        oa = fa @ values["unimodal_heads.a.weight"].T + values["unimodal_heads.a.bias"]
        ob = fb @ values["unimodal_heads.b.weight"].T + values["unimodal_heads.b.bias"]
        return torch.nn.functional.cross_entropy((oa + ob) / 2, y), divergence(oa, ob, "code")

    def total(v):
        cls, align = split_losses(v)
        return 0.05 * cls + 0.95 * align

    g_cls = torch.autograd.grad(split_losses(flat.requires_grad_())[0], flat)[0]
    _, hv = torch.autograd.functional.hvp(total, flat.detach(), g_cls)
    expected = hv[: shapes[0].numel()].mean().item()  # the first tensor: encoders.a.weight
    assert method.alpha_grad == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_fitted_schedule_keeps_no_state():
    method = lfm()
    assert method.state_dict() == {}
    method.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        method.load_state_dict({"alpha_align": 0.5})
    assert method.epoch_plan(0, EpochPlan(np.arange(5))).rows.tolist() == list(range(5))
