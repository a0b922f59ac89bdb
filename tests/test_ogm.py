"""OGM-GE (``ogm_ge``, methods.md §6.1) and the journal OGM (``ogm``, §7.3): coefficients, the gradient edit,
the GE noise, the epoch window, which tensors are modulated, generator state, and the head requirement.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from tests_support_models import LinearEncoder as Linear
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method
from midasbench.methods.ogm_ge import (
    ge_noise_std,
    in_window,
    modulate_gradient,
    ogm_coefficients,
    score_ratios,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=100, steps_per_epoch=1, seed=3)


class TinyConv(nn.Module):
    """conv (4-D weight, 1-D bias) -> BN (1-D) -> mean pool -> linear (2-D weight, 1-D bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)
        self.out_dim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def conv_model() -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel({"a": TinyConv(), "b": TinyConv()}, ConcatFusion({"a": 3, "b": 3}, 3), 3)


def conv_batch() -> Batch:
    torch.manual_seed(1)
    x = {"a": torch.randn(6, 1, 5, 5), "b": torch.randn(6, 1, 5, 5)}
    return Batch(inputs=x, labels=torch.tensor([0, 1, 2, 0, 1, 2]), index=torch.arange(6))


def grads_after(name: str, params: dict, epoch: int, model=None, batch=None):
    """(model, grads before after_backward, grads after, logs) for one step at ``epoch``."""
    model = model or conv_model()
    batch = batch or conv_batch()
    method = build_method(name, params, CONTEXT)
    out = method.training_step(model, batch, epoch)
    model.zero_grad()
    out.loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.after_backward(model, epoch)
    after = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, before, after, out.logs


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


# ---------------------------------------------------------------------------------------- coefficients


def test_coefficient_when_the_first_modality_dominates():
    # S_a = 3, S_v = 1: ρ_v = 1/3 ≤ 1, so ρ_a = 3 and k_a = 1 − tanh(0.8·3) = 1 − tanh(2.4) ≈ 0.016325;
    # k_v = 1
    assert score_ratios([3.0, 1.0]) == pytest.approx([3.0, 1 / 3])
    k_a, k_v = ogm_coefficients([3.0, 1.0], alpha=0.8)
    assert k_a == pytest.approx(0.016325, abs=1e-6) and k_v == 1.0


def test_coefficient_when_the_second_modality_dominates():
    # S_a = 1, S_v = 2: ρ_v = 2 > 1, k_v = 1 − tanh(1.6) ≈ 1 − 0.921669 = 0.078331, k_a = 1
    k_a, k_v = ogm_coefficients([1.0, 2.0], alpha=0.8)
    assert k_a == 1.0 and k_v == pytest.approx(0.078331, abs=1e-6)


def test_coefficient_uses_relu_rho_not_relu_rho_minus_one_and_a_tie_slows_the_first():
    # S_a = S_v = 2: ρ_v = 1 is not > 1, so the official else-branch: k_a = 1 − tanh(0.8·1) ≈ 0.335963
    # (with relu(ρ − 1) it would be 1: the coefficient jumps at ρ = 1)
    k_a, k_v = ogm_coefficients([2.0, 2.0], alpha=0.8)
    assert k_a == pytest.approx(0.335963, abs=1e-6) and k_v == 1.0


def test_three_modalities_use_the_mean_pairwise_ratio():
    # S = (4, 2, 1): ρ_1 = (4/2 + 4/1)/2 = 3, ρ_2 = (2/4 + 2/1)/2 = 1.25, ρ_3 = (1/4 + 1/2)/2 = 0.375
    # k_1 = 1 − tanh(2.4) ≈ 0.016325, k_2 = 1 − tanh(1.0) ≈ 0.238406, k_3 = 1
    assert score_ratios([4.0, 2.0, 1.0]) == pytest.approx([3.0, 1.25, 0.375])
    assert ogm_coefficients([4.0, 2.0, 1.0], 0.8) == pytest.approx([0.016325, 0.238406, 1.0], abs=1e-6)


def test_scores_are_batch_sums_of_the_sliced_softmax_at_the_label():
    model = MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 3)}, ConcatFusion({"a": 3, "b": 3}, 3), 3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.encoders["a"].bias[0] = 1.0  # f^a = (1, 0, 0) for every sample, f^b = 0
        model.fusion.linear.weight[0, 0] = math.log(4)  # s^a = (ln 4, 0, 0), s^b = (0, 0, 0)
    batch = Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.zeros(6, dtype=torch.long),
        index=torch.arange(6),
    )
    out = build_method("ogm_ge", {}, CONTEXT).training_step(model, batch, 0)
    # softmax(s^a)[0] = 4/6, S_a = 6·4/6 = 4; softmax(s^b)[0] = 1/3, S_b = 2; ρ_a = 2, k_a = 1 − tanh(1.6)
    assert out.logs["ratio_a"] == pytest.approx(2.0, rel=1e-6)
    assert out.logs["ratio_b"] == pytest.approx(0.5, rel=1e-6)
    assert out.logs["k_a"] == pytest.approx(0.078331, abs=1e-6) and out.logs["k_b"] == 1.0
    assert out.logs["modulated_tensors"] == 0  # Linear encoders: no conv weight to modulate


# ------------------------------------------------------------------------------------- gradient edit


def test_without_ge_the_gradient_is_exactly_k_times_grad():
    grad = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    assert torch.equal(modulate_gradient(grad, 0.25, None, use_ge=False), grad * 0.25)


def test_ge_noise_is_the_generators_draw_scaled_by_the_unscaled_gradients_std():
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # unbiased std: mean 2.5, Σ(x − 2.5)² = 5, σ = sqrt(5/3) ≈ 1.290994, + 1e-8
    assert ge_noise_std(grad) == pytest.approx(math.sqrt(5 / 3) + 1e-8, rel=1e-7)
    out = modulate_gradient(grad, 0.5, torch.Generator().manual_seed(11), use_ge=True)
    expected_noise = torch.randn(4, generator=torch.Generator().manual_seed(11)) * math.sqrt(5 / 3)
    assert torch.allclose(out - 0.5 * grad, expected_noise, atol=1e-6)


def test_ge_noise_std_matches_the_unscaled_gradient_statistically():
    grad = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3.0  # std ≈ 3
    noise = modulate_gradient(grad, 0.1, torch.Generator().manual_seed(1), use_ge=True) - 0.1 * grad
    assert noise.std().item() == pytest.approx(grad.std().item(), rel=0.01)
    assert abs(noise.mean().item()) < 0.03  # zero mean: 3 / sqrt(2e5) ≈ 0.0067 is one standard error


def test_window_boundaries_are_inclusive():
    assert in_window(2, 2, 5) and in_window(5, 2, 5)
    assert not in_window(1, 2, 5) and not in_window(6, 2, 5)
    assert in_window(10_000, 0, None)
    params = {"modulation_starts": 1, "modulation_ends": 2}
    for epoch, edits in ((0, False), (1, True), (2, True), (3, False)):
        _, before, after, logs = grads_after("ogm_ge", params, epoch)
        assert bool(changed(before, after)) is edits, epoch
        assert logs["modulated_tensors"] == (2 if edits else 0)


def test_conv_mode_modulates_only_the_4d_encoder_weights():
    _, before, after, logs = grads_after("ogm_ge", {}, 0)
    # GE adds noise to both encoders, k = 1 or not: exactly the two conv weights change
    assert changed(before, after) == {"encoders.a.conv.weight", "encoders.b.conv.weight"}
    assert logs["modulated_tensors"] == 2


def test_weights_mode_modulates_every_2d_encoder_tensor_and_nothing_else():
    _, before, after, logs = grads_after("ogm_ge", {"modulate": "weights"}, 0)
    expected = {f"encoders.{m}.{t}.weight" for m in "ab" for t in ("conv", "fc")}
    assert changed(before, after) == expected  # biases, BN and the fusion head untouched
    assert logs["modulated_tensors"] == 4


def test_without_ge_the_selected_tensors_are_scaled_by_their_modalitys_k():
    _, before, after, logs = grads_after("ogm_ge", {"use_ge": False, "modulate": "weights"}, 0)
    for name in before:
        parts = name.split(".")
        k = logs[f"k_{parts[1]}"] if parts[0] == "encoders" and before[name].ndim >= 2 else 1.0
        assert (
            torch.equal(after[name], before[name] * k) if k != 1.0 else torch.equal(after[name], before[name])
        )


def test_encoders_without_conv_weights_run_unmodulated():
    model = MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 3)}, ConcatFusion({"a": 3, "b": 3}, 3), 3)
    batch = Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        index=torch.arange(6),
    )
    _, before, after, logs = grads_after("ogm_ge", {}, 0, model=model, batch=batch)
    assert not changed(before, after) and logs["modulated_tensors"] == 0


# ------------------------------------------------------------------------------------ state and rules


def test_generator_is_seeded_from_the_run_seed_and_round_trips_through_state_dict():
    one, two = build_method("ogm_ge", {}, CONTEXT), build_method("ogm_ge", {}, CONTEXT)
    assert torch.equal(one.state_dict()["generator"], two.state_dict()["generator"])  # same on every rank
    torch.randn(17, generator=one.generator)  # advance, as a step's noise would
    clone = build_method("ogm_ge", {}, CONTEXT)
    clone.load_state_dict(one.state_dict())
    assert torch.equal(torch.randn(5, generator=one.generator), torch.randn(5, generator=clone.generator))
    other = build_method(
        "ogm_ge", {}, MethodContext(modalities=("a", "b"), num_classes=3, epochs=1, steps_per_epoch=1, seed=4)
    )
    assert not torch.equal(other.state_dict()["generator"], two.state_dict()["generator"])


def test_journal_ogm_is_unmodulated_during_warm_up_and_after_epoch_60():
    # defaults: warm-up epochs 0-5 (warmup_epochs=6), window 0-60, conv weights, GE on, α = 0.8
    method = build_method("ogm", {}, CONTEXT)
    assert (method.params.alpha, method.params.warmup_epochs, method.params.modulation_ends) == (0.8, 6, 60)
    for epoch, edits in ((0, False), (5, False), (6, True), (60, True), (61, False)):
        _, before, after, _ = grads_after("ogm", {}, epoch)
        assert changed(before, after) == (
            {"encoders.a.conv.weight", "encoders.b.conv.weight"} if edits else set()
        )


def test_defaults_and_per_dataset_alpha():
    from midasbench.methods.ogm import Ogm
    from midasbench.methods.ogm_ge import OgmGe

    p = build_method("ogm_ge", {}, CONTEXT).params
    assert (p.alpha, p.modulation_starts, p.modulation_ends, p.use_ge, p.modulate) == (
        0.8,
        0,
        None,
        True,
        "conv",
    )
    assert OgmGe.dataset_defaults == {"kinetics_sounds": {"alpha": 0.3}} and Ogm.dataset_defaults == {}
    with pytest.raises(ConfigError, match="modulation_ends"):
        build_method("ogm_ge", {"modulation_starts": 5, "modulation_ends": 4}, CONTEXT)


@pytest.mark.parametrize("name", ["ogm_ge", "ogm"])
def test_refuses_a_non_decomposable_head(tiny_config, name):
    with pytest.raises(
        ConfigError,
        match=rf"model\.fusion\.name: method '{name}' needs a decomposable fusion head .* 'film' is not; "
        r"use one of: concat, sum",
    ):
        tiny_config(f"method.name={name}", "model.fusion.name=film")
    tiny_config(f"method.name={name}", "model.fusion.name=sum")  # decomposable: accepted
