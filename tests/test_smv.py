"""SMV (methods.md §5): Shapley values and copy counts by hand, the re-sampled plan and its tags, the
post-encoder zeroing of tagged rows, the modality-level count, and the state that rebuilds the plan.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.smv import (
    UNTAGGED,
    build_plan,
    coalition_correct,
    copy_counts,
    modality_level_copies,
    sample_level_copies,
    shapley_values,
)

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=2, epochs=6, steps_per_epoch=1, seed=5)


def identity_model() -> MultimodalModel:
    """f^a = x^a, f^v = x^v (1-d each); z = (0, f^a + f^v) with zero bias: class 1 iff f^a + f^v > 0."""
    model = MultimodalModel({"a": Identity(1), "v": Identity(1)}, ConcatFusion({"a": 1, "v": 1}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        model.fusion.linear.bias.zero_()
    return model


def correct_from(patterns: list[tuple[int, int, int]]) -> torch.Tensor:
    """(N, 4) coalition correctness from (full, a-only, v-only); columns are bit masks: 1 = {a}, 2 = {v}."""
    rows = [[False, bool(a), bool(v), bool(full)] for full, a, v in patterns]
    return torch.tensor(rows)


# ---------------------------------------------------------------------------------- Shapley values


def test_two_modality_shapley_values_and_copies_by_hand():
    # φ_a = (v_a + v_av − v_v)/2 with v_av = 2·1[full], v_a = 1[a-only], v_v = 1[v-only]
    patterns = [
        (1, 1, 1),  # φ_a = (1 + 2 − 1)/2 = 1,    φ_v = 1          → copies (0, 0)
        (1, 1, 0),  # φ_a = (1 + 2 − 0)/2 = 1.5,  φ_v = (0 + 2 − 1)/2 = 0.5 → (0, 1)
        (0, 1, 0),  # φ_a = (1 + 0 − 0)/2 = 0.5,  φ_v = (0 + 0 − 1)/2 = −0.5 → (1, 3)
        (0, 0, 0),  # φ_a = φ_v = 0                                          → (2, 2)
        (1, 0, 0),  # φ_a = φ_v = (0 + 2 − 0)/2 = 1                          → (0, 0)
        (0, 1, 1),  # φ_a = φ_v = (1 + 0 − 1)/2 = 0                          → (2, 2)
    ]
    phi = shapley_values(correct_from(patterns))
    expected = [[1, 1], [1.5, 0.5], [0.5, -0.5], [0, 0], [1, 1], [0, 0]]
    assert phi.tolist() == expected
    assert copy_counts(phi).tolist() == [[0, 0], [0, 1], [1, 3], [2, 2], [0, 0], [2, 2]]
    # efficiency: φ_a + φ_v = v({a, v}) = 2·1[full]
    assert (phi.sum(1) == 2 * torch.tensor([p[0] for p in patterns], dtype=torch.float64)).all()


def test_three_modality_shapley_values_by_hand():
    # weights |S|!(M − |S| − 1)!/M! for M = 3: |S| = 0 → 1/3, 1 → 1/6, 2 → 1/3
    # only the full coalition correct (v(abc) = 3): φ_m = 1/3 · (3 − 0) = 1 for each m
    only_full = torch.zeros(1, 8, dtype=torch.bool)
    only_full[0, 7] = True
    assert shapley_values(only_full)[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # only {a} correct (v(a) = 1): φ_a = 1/3 · 1 = 1/3; φ_b = 1/6 · (v(ab) − v(a)) = −1/6 = φ_c
    only_a = torch.zeros(1, 8, dtype=torch.bool)
    only_a[0, 1] = True
    phi = shapley_values(only_a)
    assert phi[0].tolist() == pytest.approx([1 / 3, -1 / 6, -1 / 6])
    # copies: 1/3 ∈ (−0.1, 0.4] → 2; −1/6 ≤ −0.1 → 3
    assert copy_counts(phi).tolist() == [[2, 3, 3]]


def test_copy_band_boundaries():
    # φ ≥ 1 → 0; 0.4 < φ < 1 → 1; −0.1 < φ ≤ 0.4 → 2; φ ≤ −0.1 → 3 (the code's gaps at 0.4, −0.1 closed)
    phi = torch.tensor([[1.0, 0.95], [0.41, 0.4], [-0.09, -0.1]], dtype=torch.float64)
    assert copy_counts(phi).tolist() == [[0, 1], [1, 2], [2, 3]]
    assert copy_counts(phi, full=0.9).tolist() == [[0, 0], [1, 2], [2, 3]]  # the official upper bound


def test_coalitions_zero_the_features_after_the_encoders():
    model = identity_model()
    # f = (a, v): full z_1 = a + v; {a}: a; {v}: v. Labels: class 1 iff the relevant sum > 0 (ties: class 0)
    features = {"a": torch.tensor([[1.0], [1.0], [-1.0]]), "v": torch.tensor([[1.0], [-2.0], [2.0]])}
    labels = torch.tensor([1, 1, 1])
    correct = coalition_correct(model, features, labels)
    # row 0: a=1, v=1: {a} 1>0 ✓, {v} ✓, full 2>0 ✓; row 1: {a} ✓, {v} −2 ✗, full −1 ✗;
    # row 2: {a} ✗, {v} ✓, full 1 ✓; ∅ never correct
    assert correct.tolist() == [
        [False, True, True, True],
        [False, True, False, False],
        [False, False, True, True],
    ]


# --------------------------------------------------------------------------------------- the plan


def test_sample_level_copies_carry_the_kept_modality():
    counts = torch.tensor([[0, 1], [2, 0], [1, 3]])
    rows, kept = sample_level_copies(counts)
    # modality 0 (a): row 1 twice, row 2 once; modality 1 (v): row 0 once, row 2 three times
    pairs = sorted(zip(rows.tolist(), kept.tolist(), strict=True))
    assert pairs == [(0, 1), (1, 0), (1, 0), (2, 0), (2, 1), (2, 1), (2, 1)]


def test_plan_holds_every_row_untagged_plus_the_tagged_copies_and_is_seeded():
    rows, kept = np.array([1, 1, 2]), np.array([0, 0, 1])
    plan = build_plan(4, rows, kept, seed=5, epoch=3)
    pairs = sorted(zip(plan.rows.tolist(), plan.tags.tolist(), strict=True))
    assert pairs == [(0, UNTAGGED), (1, UNTAGGED), (1, 0), (1, 0), (2, UNTAGGED), (2, 1), (3, UNTAGGED)]
    again = build_plan(4, rows, kept, seed=5, epoch=3)
    assert np.array_equal(plan.rows, again.rows) and np.array_equal(plan.tags, again.tags)
    other = [build_plan(4, rows, kept, seed=5, epoch=e).rows.tolist() for e in range(4, 12)]
    assert any(o != plan.rows.tolist() for o in other)  # reshuffled every epoch


def fake_runtime(features: dict[str, torch.Tensor], labels: torch.Tensor) -> Runtime:
    """A runtime whose ``encode_rows`` returns the given features of the rows asked for."""

    def encode(model, split, rows, names):
        index = torch.as_tensor(rows)
        return {m: features[m][index] for m in names}, labels[index]

    return Runtime(train_split=list(range(len(labels))), encode_fn=encode)


def valued_method(params: dict | None = None) -> tuple:
    # rows: (a, v) → full / {a} / {v} correct (label 1, class 1 iff the sum > 0)
    # row 0: (1, 1) all correct → φ = (1, 1) → no copy; row 1: (1, −2) → (0, 1, 0) → φ = (0.5, −0.5)
    # → 1 copy keeping a, 3 keeping v; row 2: (−1, −1) all wrong → φ = (0, 0) → 2 + 2 copies
    features = {"a": torch.tensor([[1.0], [1.0], [-1.0]]), "v": torch.tensor([[1.0], [-2.0], [-1.0]])}
    labels = torch.tensor([1, 1, 1])
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": fake_runtime(features, labels)})
    method = build_method("smv", {"warmup_epochs": 2, **(params or {})}, context)
    return method, identity_model()


def test_valuation_after_warm_up_builds_the_next_epochs_plan():
    method, model = valued_method()
    default = EpochPlan(np.array([2, 0, 1]))
    assert method.on_epoch_end(model, 0) == {}  # epoch 0 < E_warm − 1 = 1: no valuation
    assert method.epoch_plan(1, default) is default
    metrics = method.on_epoch_end(model, 1)
    # mean φ_a = (1 + 0.5 + 0)/3 = 0.5, φ_v = (1 − 0.5 + 0)/3 = 1/6; copies keeping a: 1 + 2, v: 3 + 2
    assert metrics["phi_a"] == pytest.approx(0.5) and metrics["phi_v"] == pytest.approx(1 / 6)
    assert (metrics["copies_a"], metrics["copies_v"], metrics["plan_rows"]) == (3.0, 5.0, 11.0)
    plan = method.epoch_plan(2, default)
    pairs = sorted(zip(plan.rows.tolist(), plan.tags.tolist(), strict=True))
    originals = [(0, UNTAGGED), (1, UNTAGGED), (2, UNTAGGED)]
    copies = [(1, 0), (1, 1), (1, 1), (1, 1), (2, 0), (2, 0), (2, 1), (2, 1)]
    assert pairs == sorted(originals + copies)
    assert model.training  # the valuation ran in eval mode and restored the mode


def test_equal_state_gives_an_identical_plan_and_the_state_round_trips():
    method, model = valued_method()
    method.on_epoch_end(model, 1)
    clone, _ = valued_method()
    clone.load_state_dict(method.state_dict())
    assert repr(clone.state_dict()) == repr(method.state_dict())
    default = EpochPlan(np.arange(3))
    a, b = method.epoch_plan(2, default), clone.epoch_plan(2, default)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.tags, b.tags)
    fresh, _ = valued_method()
    assert fresh.epoch_plan(2, default) is default  # no valuation in its state: the default plan


def test_training_step_zeroes_the_features_of_every_modality_but_the_tagged_one():
    model = identity_model()
    method = build_method("smv", {}, CONTEXT)
    x = {"a": torch.tensor([[2.0], [2.0], [2.0]]), "v": torch.tensor([[-3.0], [-3.0], [-3.0]])}
    labels = torch.tensor([1, 1, 1])
    tags = torch.tensor([UNTAGGED, 0, 1])
    out = method.training_step(model, Batch(x, labels, torch.arange(3), tags), epoch=3)
    # z_1 per row: untagged a + v = −1; keep a: 2; keep v: −3 (z_0 = 0). CE(z, 1) = log(1 + e^{−z_1})
    expected = (np.log1p(np.exp(1.0)) + np.log1p(np.exp(-2.0)) + np.log1p(np.exp(3.0))) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.logs["copy_fraction"] == pytest.approx(2 / 3)
    untagged = method.training_step(model, Batch(x, labels, torch.arange(3)), epoch=3)
    assert untagged.loss.item() == pytest.approx(np.log1p(np.exp(1.0)), rel=1e-6)


def test_a_zeroed_modality_gets_no_gradient_from_its_copy():
    model = identity_model()
    method = build_method("smv", {}, CONTEXT)
    x = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[-3.0]])}
    out = method.training_step(model, Batch(x, torch.tensor([1]), torch.arange(1), torch.tensor([0])), 3)
    out.loss.backward()
    assert model.encoders["v"].weight.grad.abs().sum() == 0  # v zeroed: no gradient reaches its encoder
    assert model.encoders["a"].weight.grad.abs().sum() > 0


def test_evaluation_uses_all_features_unzeroed():
    model = identity_model()
    method = build_method("smv", {}, CONTEXT)
    features = {"a": torch.tensor([[2.0]]), "v": torch.tensor([[-3.0]])}
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))


# ------------------------------------------------------------------------------------ modality level


def test_modality_level_resamples_int_d_n_rows_keeping_the_larger_gap():
    # every row (full ✓, a ✓, v ✗): φ = (1.5, 0.5), so any subset's mean is exact: g_a = −0.5, g_v = 0.5;
    # d = α·|g_a − g_v|·2/3 = 0.5 · 1 · 2/3 = 1/3; int(d·N) = int(30/3) = 10 rows, all keeping v (index 1)
    phi = torch.tensor([[1.5, 0.5]] * 30, dtype=torch.float64)
    rows, kept, gaps, d = modality_level_copies(phi, 0.2, 0.5, "linear", np.random.default_rng(0))
    assert gaps.tolist() == [-0.5, 0.5] and d == pytest.approx(1 / 3)
    assert len(rows) == 10 and set(kept.tolist()) == {1} and rows.min() >= 0 and rows.max() < 30
    # tanh: tanh(1/3) ≈ 0.32151 → int(9.645) = 9; square: (2/3)^1.5 · 0.5 ≈ 0.27217 → int(8.165) = 8
    assert len(modality_level_copies(phi, 0.2, 0.5, "tanh", np.random.default_rng(0))[0]) == 9
    assert len(modality_level_copies(phi, 0.2, 0.5, "square", np.random.default_rng(0))[0]) == 8


def test_modality_level_method_is_seeded_by_seed_and_epoch():
    method, model = valued_method({"level": "modality", "alpha": 1.0})
    assert method.label == "smv[modality]"
    metrics = method.on_epoch_end(model, 1)
    again, _ = valued_method({"level": "modality", "alpha": 1.0})
    again.on_epoch_end(model, 1)
    assert repr(again.state_dict()) == repr(method.state_dict())
    gaps = metrics["gap_a"], metrics["gap_v"]
    expected = int(abs(gaps[0] - gaps[1]) / 3 * 2 * 1.0 * 3)
    assert metrics["copies_a"] + metrics["copies_v"] == expected == metrics["plan_rows"] - 3


# ------------------------------------------------------------------------------------------- rules


def test_defaults_requirements_and_dataset_defaults():
    from midasbench.methods.smv import SMV

    p = build_method("smv", {}, CONTEXT).params
    assert (p.level, p.warmup_epochs, p.threshold_full, p.threshold_high, p.threshold_low) == (
        "sample",
        5,
        1.0,
        0.4,
        -0.1,
    )
    assert (p.alpha, p.part_ratio, p.gap_func) == (1.0, 0.2, "linear")
    assert SMV.dataset_defaults == {"ucf101": {"warmup_epochs": 10}, "food101": {"warmup_epochs": 2}}
    assert SMV.requires.min_modalities == 2 and not SMV.requires.decomposable_fusion
    with pytest.raises(ConfigError, match="thresholds"):
        build_method("smv", {"threshold_high": -0.2}, CONTEXT)


def test_film_fusion_is_accepted(tiny_config):
    tiny_config("method.name=smv", "model.fusion.name=film")  # zero-feature valuation: any head


def test_plain_step_without_tags_is_fused_cross_entropy():
    model = identity_model()
    x = {"a": torch.tensor([[0.5]]), "v": torch.tensor([[0.25]])}
    out = build_method("smv", {}, CONTEXT).training_step(
        model, Batch(x, torch.tensor([0]), torch.arange(1)), 0
    )
    # z = (0, 0.75): CE(z, 0) = log(1 + e^0.75)
    assert out.loss.item() == pytest.approx(F.softplus(torch.tensor(0.75)).item(), rel=1e-6)


def test_a_short_run_trains_on_the_resampled_plan_from_the_epoch_after_warm_up(tiny_config):
    from midasbench.harness.training.trainer import train

    history = train(tiny_config("method.name=smv", "method.params={warmup_epochs: 1}")).history
    # epoch 0 warm-up: the default plan (240 rows, no copies); valued at its end, epochs 1-2 re-sampled
    assert history[0]["train/copy_fraction"] == 0.0
    assert all(h["train/copy_fraction"] > 0 for h in history[1:])
    for h in history:  # plan rows = 240 + copies, copies counted per kept modality
        assert h["method/plan_rows"] == 240 + h["method/copies_strong"] + h["method/copies_weak"]
