"""AGM (``agm``, methods-more.md §29): the §29.8 coefficients and gradient test, the Shapley sum (M = 2, 3),
the eval-mode zero-input passes (train mode restored, BN statistics untouched), the running-mean order,
the window, the conditional clip, σ under data parallelism, state and requirements.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.agm import (
    AGM,
    agm_coefficients,
    coalition_outputs,
    floored_nll,
    proper_coalitions,
    relative_strengths,
    running_mean,
    shapley_contributions,
    shapley_weight,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=10, steps_per_epoch=1, seed=0)


class BiasFree(nn.Linear):
    """φ_m(x) = A_m x (§29.8's bias-free linear encoder)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o, bias=False)
        self.out_dim = o


class NormEncoder(nn.Module):
    """BatchNorm on the raw input, dropout, then a linear layer: train and eval passes differ."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(i)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(i, o)
        self.out_dim = o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(x)))


def linear_model(dims: dict[str, int], out: int = 3) -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {m: BiasFree(d, out) for m, d in dims.items()}
    return MultimodalModel(encoders, ConcatFusion(dict.fromkeys(dims, out), 3), 3)


def batch_for(dims: dict[str, int], n: int = 6) -> Batch:
    torch.manual_seed(1)
    return Batch(
        inputs={m: torch.randn(n, d) for m, d in dims.items()},
        labels=torch.arange(n) % 3,
        index=torch.arange(n),
    )


def context(modalities: tuple[str, ...], runtime: Runtime | None = None) -> MethodContext:
    return MethodContext(modalities, 3, 10, 1, 0, runtime or Runtime())


# ---------------------------------------------------------------------------------------- coefficients


def test_coefficients_are_the_spec_values():
    # §29.8: σ = (0.5, 1.0), σ̄ = (0.6, 0.8), α = 1.5
    # r_a = e^{0.5} = 1.6487, r̄_a = e^{0.2} = 1.2214, κ_a = exp(1.5 (1.2214 − 1.6487)) = e^{−0.6410} = 0.5268
    # r_v = e^{−0.5} = 0.6065, r̄_v = e^{−0.2} = 0.8187, κ_v = exp(1.5 (0.8187 − 0.6065)) = e^{0.3183} = 1.3748
    r, r_bar, kappa = agm_coefficients([0.5, 1.0], [0.6, 0.8], alpha=1.5)
    assert r == pytest.approx([1.6487, 0.6065], abs=1e-4)
    assert r_bar == pytest.approx([1.2214, 0.8187], abs=1e-4)
    assert kappa == pytest.approx([0.5268, 1.3748], abs=1e-4)


def test_the_exponent_is_capped_at_ten():
    # σ = (0, 0): r = 1; σ̄ = (0, 3): r̄_a = e^3 = 20.0855, r̄_a − r_a = 19.09 > 10
    # → κ_a = e^{1.5·10} = 3269017.37
    # r̄_v = e^{−3} = 0.0498, κ_v = exp(1.5 (0.0498 − 1)) = e^{−1.4253} = 0.24045
    _, _, kappa = agm_coefficients([0.0, 0.0], [0.0, 3.0], alpha=1.5)
    assert kappa[0] == pytest.approx(3269017.37, rel=1e-8)
    assert kappa[1] == pytest.approx(math.exp(1.5 * (math.exp(-3) - 1)), rel=1e-12)


def test_relative_strength_for_three_modalities_is_exp_of_the_others_mean_minus_own():
    # σ = (1, 2, 3): r_1 = e^{2.5 − 1} = 4.481689, r_2 = e^{2 − 2} = 1, r_3 = e^{1.5 − 3} = 0.223130
    assert relative_strengths([1.0, 2.0, 3.0]) == pytest.approx([4.481689, 1.0, 0.223130], abs=1e-6)
    with pytest.raises(ValueError, match="two modality scores"):
        relative_strengths([1.0])


def test_per_sample_score_is_floored_at_1e_minus_8():
    # logits (0, −100): p_0 = 1/(1 + e^{−100}) → −log ≈ 0; p_1 ≈ 3.7e−44 < 1e−8 → −log 1e−8 = 18.420681
    logits = torch.tensor([[0.0, -100.0], [0.0, -100.0]])
    assert floored_nll(logits, torch.tensor([0, 1])).tolist() == pytest.approx([0.0, 18.420681], abs=1e-5)


def test_running_mean_is_cumulative():
    # values 2, 4, 0 at t = 1, 2, 3: means 2, 3, 2
    mean = torch.zeros(1, dtype=torch.float64)
    for t, value, expected in ((1, 2.0, 2.0), (2, 4.0, 3.0), (3, 0.0, 2.0)):
        mean = running_mean(mean, torch.tensor([value], dtype=torch.float64), t)
        assert mean.item() == pytest.approx(expected)


# -------------------------------------------------------------------------------------------- Shapley


def test_shapley_weights():
    # M = 2: 0!1!/2! = 1/2, 1!0!/2! = 1/2; M = 3: 0!2!/3! = 1/3, 1!1!/3! = 1/6, 2!0!/3! = 1/3
    assert [shapley_weight(s, 2) for s in (0, 1)] == pytest.approx([0.5, 0.5])
    assert [shapley_weight(s, 3) for s in (0, 1, 2)] == pytest.approx([1 / 3, 1 / 6, 1 / 3])
    assert proper_coalitions(["a", "b", "c"]) == [frozenset(x) for x in ("a", "b", "c", "ab", "ac", "bc")]


def test_two_modality_contributions_are_the_official_formula():
    # F(a,0) = 2, F(0,v) = 5, F(a,v) = 10: m_a = ½(10 − 5 + 2) = 3.5, m_v = ½(10 − 2 + 5) = 6.5 (sum 10)
    outputs = {frozenset("a"): torch.tensor(2.0), frozenset("v"): torch.tensor(5.0)}
    outputs[frozenset("av")] = torch.tensor(10.0)
    m = shapley_contributions(outputs, ["a", "v"])
    assert (m["a"].item(), m["v"].item()) == (3.5, 6.5)


def test_three_modality_contributions_of_a_linear_model_are_its_sliced_logits():
    # linear head, F(S) = Σ_{m∈S} W_m f_m + c for S ≠ ∅, F(∅) = 0: F(S ∪ k) − F(S) = W_k f_k (+ c if S = ∅),
    # so m_k = W_k f_k + w(0)·c = W_k f_k + c/3: the concat head's sliced logits
    dims = {"a": 4, "b": 2, "c": 3}
    model, batch = linear_model(dims), batch_for(dims)
    outputs = coalition_outputs(model, batch.inputs, proper_coalitions(list(dims)))
    outputs[frozenset(dims)] = model(batch.inputs)
    m = shapley_contributions(outputs, list(dims))
    shares = model.modality_logits(model.encode(batch.inputs))
    for k in dims:
        torch.testing.assert_close(m[k], shares[k], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- gradient


def plain_gradients(model: MultimodalModel, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(batch.inputs), batch.labels).backward()
    return {m: model.encoders[m].weight.grad.clone() for m in model.modalities}


@pytest.mark.parametrize("dims", [{"a": 4, "b": 2}, {"a": 4, "b": 2, "c": 3}], ids=["M2", "M3"])
def test_each_encoder_gets_its_kappa_times_the_plain_gradient(dims):
    # §29.8: bias-free linear encoders, linear head: ∂L/∂A_m = κ_m ∂L_plain/∂A_m (to 1e-6). σ̄ is set so
    # that κ ≠ 1 differs between modalities.
    model, batch = linear_model(dims), batch_for(dims)
    plain = plain_gradients(model, batch)
    method = build_method("agm", {}, context(tuple(dims)))
    method.sigma_bar = torch.linspace(0.2, 1.4, len(dims), dtype=torch.float64)
    method.iteration = 3
    out = method.training_step(model, batch, epoch=0)
    kappa = {m: out.logs[f"kappa_{m}"] for m in dims}
    assert len({round(k, 6) for k in kappa.values()}) == len(dims) and all(k != 1 for k in kappa.values())
    torch.testing.assert_close(out.loss, F.cross_entropy(model(batch.inputs), batch.labels))  # o = F(a,v)
    model.zero_grad()
    out.loss.backward()
    for m in dims:
        torch.testing.assert_close(model.encoders[m].weight.grad, kappa[m] * plain[m], atol=1e-6, rtol=0)


def test_outside_the_window_the_gradient_is_plain():
    dims = {"a": 4, "b": 2}
    model, batch = linear_model(dims), batch_for(dims)
    plain = plain_gradients(model, batch)
    method = build_method("agm", {"modulation_starts": 1, "modulation_ends": 2}, CONTEXT)
    for epoch, modulated in ((0, False), (1, True), (2, True), (3, False)):
        method.load_state_dict({"sigma_bar": torch.tensor([0.2, 1.4], dtype=torch.float64), "iteration": 3})
        out = method.training_step(model, batch, epoch)
        kappa = {m: out.logs[f"kappa_{m}"] for m in dims}
        assert (kappa["a"] != 1.0) is modulated and (kappa["b"] != 1.0) is modulated, epoch
        model.zero_grad()
        out.loss.backward()
        for m in dims:
            torch.testing.assert_close(model.encoders[m].weight.grad, kappa[m] * plain[m], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="modulation_ends"):
        build_method("agm", {"modulation_starts": 3, "modulation_ends": 2}, CONTEXT)


# ------------------------------------------------------------------------------------ eval-mode passes


def norm_model() -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel(
        {"a": NormEncoder(4, 3), "b": NormEncoder(2, 3)}, ConcatFusion({"a": 3, "b": 3}, 3), 3
    )


def test_padded_passes_leave_batchnorm_statistics_to_the_real_pass():
    # one train-mode pass on the real batch x: running_mean = 0.9·0 + 0.1·mean(x), running_var =
    # 0.9·1 + 0.1·var_unbiased(x), one batch tracked; the zero-input passes (eval mode) add nothing
    model, batch = norm_model(), batch_for({"a": 4, "b": 2})
    model.train()
    build_method("agm", {}, CONTEXT).training_step(model, batch, 0)
    for m in ("a", "b"):
        x, bn = batch.inputs[m], model.encoders[m].bn
        torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))
        assert int(bn.num_batches_tracked) == 1


def test_train_mode_is_restored_even_when_a_padded_pass_raises():
    model, batch = norm_model(), batch_for({"a": 4, "b": 2})
    model.train()
    model.encoders["b"].drop.eval()  # a submodule's own flag is restored as it was
    build_method("agm", {}, CONTEXT).training_step(model, batch, 0)
    flags = {name: mod.training for name, mod in model.named_modules()}
    assert flags.pop("encoders.b.drop") is False and all(flags.values())

    def fail_in_eval(module: nn.Module, args: tuple) -> None:
        if not module.training:
            raise RuntimeError("eval pass")

    model.encoders["a"].register_forward_pre_hook(fail_in_eval)
    with pytest.raises(RuntimeError, match="eval pass"):
        build_method("agm", {}, CONTEXT).training_step(model, batch, 0)
    flags = {name: mod.training for name, mod in model.named_modules()}
    assert flags.pop("encoders.b.drop") is False and all(flags.values())


def test_evaluation_is_the_fused_logits_and_equals_the_training_output_in_eval_mode():
    model, batch = norm_model(), batch_for({"a": 4, "b": 2})
    method = build_method("agm", {}, CONTEXT)
    model.eval()
    features = model.encode(batch.inputs)
    logits = method.logits_from_features(model, features)
    torch.testing.assert_close(logits, model.fuse(features))
    out = method.training_step(model, batch, 0)  # in eval mode every pass is an eval pass: o = F(a, v)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch.labels))


# ------------------------------------------------------------------------------ running means and state


def zero_model() -> MultimodalModel:
    model = linear_model({"a": 4, "b": 2})
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_coefficients_use_the_running_means_before_this_steps_update():
    # all-zero model: every F(S) = 0, softmax uniform over 3 classes, σ_a = σ_v = log 3 = 1.098612, r = 1
    # σ̄ = (0.6, 0.8) after 4 steps: r̄_a = e^{0.2}, κ_a = exp(1.5 (e^{0.2} − 1)) = 1.393898;
    # κ_v = exp(1.5 (e^{−0.2} − 1)) = 0.761928. Then t = 5: σ̄_a = 0.6·4/5 + log 3/5 = 0.699722,
    # σ̄_v = 0.8·4/5 + log 3/5 = 0.859722 (updating first would give r̄_a = e^{0.16} and another κ)
    method = build_method("agm", {}, CONTEXT)
    method.load_state_dict({"sigma_bar": torch.tensor([0.6, 0.8], dtype=torch.float64), "iteration": 4})
    out = method.training_step(zero_model(), batch_for({"a": 4, "b": 2}), 0)
    assert out.logs["sigma_a"] == pytest.approx(math.log(3)) and out.logs["ratio_a"] == pytest.approx(1.0)
    assert out.logs["kappa_a"] == pytest.approx(1.393898, abs=1e-6)
    assert out.logs["kappa_b"] == pytest.approx(0.761928, abs=1e-6)
    state = method.state_dict()
    assert state["iteration"] == 5
    assert state["sigma_bar"].tolist() == pytest.approx([0.699722, 0.859722], abs=1e-6)


def test_a_fresh_run_starts_from_zero_running_means():
    # σ̄ = 0 → r̄ = 1; after the first step σ̄ = σ (t = 1)
    method = build_method("agm", {}, CONTEXT)
    assert method.state_dict()["sigma_bar"].tolist() == [0.0, 0.0] and method.iteration == 0
    out = method.training_step(linear_model({"a": 4, "b": 2}), batch_for({"a": 4, "b": 2}), 0)
    assert out.logs["target_a"] == 1.0 and out.logs["target_b"] == 1.0
    assert method.sigma_bar.tolist() == pytest.approx([out.logs["sigma_a"], out.logs["sigma_b"]])


def test_state_round_trip_resumes_exactly():
    dims = {"a": 4, "b": 2}
    model, batch = linear_model(dims), batch_for(dims)
    one = build_method("agm", {}, CONTEXT)
    one.training_step(model, batch, 0)
    one.training_step(model, batch, 0)
    clone = build_method("agm", {}, CONTEXT)
    clone.load_state_dict(one.state_dict())
    assert clone.iteration == 2 and torch.equal(clone.sigma_bar, one.sigma_bar)
    assert one.training_step(model, batch, 1).logs == clone.training_step(model, batch, 1).logs
    assert torch.equal(clone.sigma_bar, one.sigma_bar) and clone.iteration == one.iteration == 3


# ---------------------------------------------------------------------------------------------- clip


def grads_set(model: MultimodalModel, head: float, encoder: float) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.fusion.linear.weight.grad[0, 0] = head
    model.encoders["a"].weight.grad[0, 0] = encoder
    model.unimodal_heads["a"].weight.grad[0, 0] = 7.0  # not an AGM parameter


def test_clip_when_a_fusion_head_gradient_exceeds_one():
    # head 3, encoder 4: max |head grad| = 3 > 1 → norm 5 clipped to 1: (3, 4)·1/(5 + 1e−6) ≈ (0.6, 0.8)
    method, model = build_method("agm", {}, CONTEXT), linear_model({"a": 4, "b": 2})
    method.on_epoch_start(model, 0)
    grads_set(model, head=3.0, encoder=4.0)
    method.after_backward(model, 0)
    assert model.fusion.linear.weight.grad[0, 0].item() == pytest.approx(0.6, abs=1e-6)
    assert model.encoders["a"].weight.grad[0, 0].item() == pytest.approx(0.8, abs=1e-6)
    assert model.unimodal_heads["a"].weight.grad[0, 0].item() == 7.0
    # head 0.5 ≤ 1: untouched although the total norm is 4.03
    grads_set(model, head=0.5, encoder=4.0)
    method.after_backward(model, 0)
    assert model.encoders["a"].weight.grad[0, 0].item() == 4.0
    assert method.on_epoch_end(model, 0) == {"clip_fraction": 0.5}
    off = build_method("agm", {"clip": False}, CONTEXT)
    grads_set(model, head=3.0, encoder=4.0)
    off.after_backward(model, 0)
    assert model.fusion.linear.weight.grad[0, 0].item() == 3.0


# --------------------------------------------------------------------------------- DDP and requirements


@dataclass
class OtherRank(Runtime):
    """A stand-in for a second rank whose per-modality loss sums are (4, 1) over 2 samples."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + torch.tensor([4.0, 1.0, 2.0], dtype=tensor.dtype)


@pytest.mark.parametrize("local", [False, True])
def test_scores_sum_losses_and_counts_over_ranks_unless_local(local):
    # local: 2 samples with uniform logits over 3 classes, each −log(1/3): sums (2 log 3, 2 log 3), n = 2
    # global: σ_a = (2 log 3 + 4)/4 = 1.549306, σ_v = (2 log 3 + 1)/4 = 0.799306; local: log 3 = 1.098612
    method = AGM(AGM.Params(local_stats=local), context(("a", "b"), OtherRank()))
    contributions = {m: torch.zeros(2, 3) for m in ("a", "b")}
    sigma = method.scores(contributions, torch.tensor([0, 2])).tolist()
    assert sigma == pytest.approx([1.098612] * 2 if local else [1.549306, 0.799306], abs=1e-6)


def test_needs_two_modalities_and_accepts_any_fusion_head(tiny_config):
    with pytest.raises(ConfigError, match=r"method 'agm' needs at least 2 modalities"):
        AGM.requires.check("agm", "concat", True, 1)
    AGM.requires.check("agm", "film", False, 2)  # no sliced logits needed
    assert tiny_config("method.name=agm", "model.fusion.name=film").method.name == "agm"
    p = build_method("agm", {}, CONTEXT).params
    assert (p.alpha, p.modulation_starts, p.modulation_ends, p.ratio_cap, p.clip) == (
        1.5,
        0,
        None,
        10.0,
        True,
    )
    assert AGM.fidelity == "official-code"
