"""PMR (methods-more.md §30): the §30.8 unit-test values, the β/γ rule, the prototype momentum rule (none at
the end of epoch 0, §34.2), the absent-class guard, the subset, the window and the state round trip.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.runtime import Runtime
from midasbench.methods import MethodContext, build_method
from midasbench.methods.pmr import (
    class_means,
    merge_prototypes,
    pmr_coefficients,
    prototype_logits,
    prototype_score,
    prototype_subset,
)

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=2, epochs=4, steps_per_epoch=10, seed=2)
ALL = torch.tensor([True, True])


class Constant(torch.nn.Linear):
    """A 1 → 2 encoder whose output is its bias (zero weight): a fixed feature per modality."""

    def __init__(self, value: tuple[float, float]) -> None:
        super().__init__(1, 2)
        self.out_dim = 2
        with torch.no_grad():
            self.weight.zero_()
            self.bias.copy_(torch.tensor(value))


def spec_model() -> MultimodalModel:
    """§30.8: f^a = (0, 0), f^v = (1, 0); a zero fusion head (z = 0, CE(z, y) = log 2)."""
    model = MultimodalModel(
        {"a": Constant((0.0, 0.0)), "v": Constant((1.0, 0.0))}, ConcatFusion({"a": 2, "v": 2}, 2), 2
    )
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.zero_()
    return model


SPEC_P = {"a": torch.tensor([[0.0, 0.0], [2.0, 0.0]]), "v": torch.tensor([[0.0, 0.0], [1.0, 0.0]])}


def one_row() -> Batch:
    return Batch(
        inputs={"a": torch.ones(1, 1), "v": torch.ones(1, 1)}, labels=torch.tensor([0]), index=torch.arange(1)
    )


# ---------------------------------------------------------------------------------- §30.8 values


def test_spec_unit_test_values():
    f_a, f_v, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    psi_a, psi_v = prototype_logits(f_a, SPEC_P["a"], ALL), prototype_logits(f_v, SPEC_P["v"], ALL)
    # ψ^a = −(0, 2): softmax_0 = 1/(1 + e^{−2}) = 0.880797; ψ^v = −(1, 0): softmax_0 = e^{−1}/(e^{−1} + 1)
    # = 0.268941; ρ = 0.880797/0.268941 = 3.27505 > 1, so (β, γ) = (0, α)
    s_a, s_v = prototype_score(psi_a, y).item(), prototype_score(psi_v, y).item()
    assert s_a == pytest.approx(0.8808, abs=1e-4) and s_v == pytest.approx(0.2689, abs=1e-4)
    assert s_a / s_v == pytest.approx(3.2751, abs=1e-4)
    assert pmr_coefficients([s_a, s_v], alpha=0.7) == [0.0, 0.7]
    # CE(ψ^v, 0) = −log 0.268941 = 1.313262
    assert F.cross_entropy(psi_v, y).item() == pytest.approx(1.3133, abs=1e-4)


def test_spec_step_adds_alpha_times_the_slower_modalitys_pce_and_nothing_reaches_p_or_audio():
    model = spec_model()
    method = build_method("pmr", {"alpha": 0.7}, CONTEXT)
    method.prototypes, method.valid = {m: p.clone() for m, p in SPEC_P.items()}, ALL.clone()
    out = method.training_step(model, one_row(), epoch=0)
    # L = CE(z) + γ CE(ψ^v) = log 2 + 0.7 · 1.313262
    assert out.loss.item() == pytest.approx(math.log(2) + 0.7 * 1.3132617, abs=1e-6)
    assert (out.logs["coef_a"], out.logs["coef_v"]) == (0.0, 0.7)
    assert out.logs["pce_v"] == pytest.approx(1.3132617, abs=1e-6)
    # the extra loss alone: no gradient on the audio encoder (β = 0) nor on the prototypes (constants)
    extra = out.loss - F.cross_entropy(model.fuse(model.encode(one_row().inputs)), torch.tensor([0]))
    extra.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoders["a"].parameters())
    assert model.encoders["v"].bias.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in method.prototypes.values())


def test_coefficients_of_the_two_modality_rule_and_the_m_gt_2_generalisation():
    # ρ < 1: β = α on the first; ρ = 1: none; M = 3: α for every modality below the best
    assert pmr_coefficients([1.0, 2.0], 1.0) == [1.0, 0.0]
    assert pmr_coefficients([2.0, 2.0], 1.0) == [0.0, 0.0]
    assert pmr_coefficients([3.0, 1.0, 3.0], 0.5) == [0.0, 0.5, 0.0]


# ------------------------------------------------------------------------------------- prototypes


def test_class_means_and_absent_classes():
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    means, present = class_means(features, torch.tensor([0, 0, 2]), num_classes=3)
    # class 0: ((1 + 3)/2, (0 + 2)/2) = (2, 1); class 1: absent (0, not NaN); class 2: (5, 5)
    assert means.tolist() == [[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]] and present.tolist() == [True, False, True]


def test_momentum_rule_and_absent_class_guard():
    old = torch.tensor([[0.0, 0.0], [10.0, 10.0], [4.0, 4.0]])
    old_valid = torch.tensor([True, True, False])
    new = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 2.0]])
    present = torch.tensor([True, False, True])
    # no momentum (end of epoch 0): the new prototype exactly where seen, the old where absent
    p, valid = merge_prototypes(old, old_valid, new, present, momentum=None)
    assert p.tolist() == [[5.0, 5.0], [10.0, 10.0], [1.0, 2.0]] and valid.all()
    # μ = 0.2: class 0 = 0.8·(5, 5) + 0.2·(0, 0) = (4, 4); class 1 absent keeps (10, 10); class 2 had no
    # prototype: the new one (1, 2)
    p, valid = merge_prototypes(old, old_valid, new, present, momentum=0.2)
    assert p.tolist() == [[4.0, 4.0], [10.0, 10.0], [1.0, 2.0]] and valid.all()
    # before any prototype: absent classes are invalid (and finite)
    p, valid = merge_prototypes(None, None, new, present, momentum=None)
    assert valid.tolist() == [True, False, True] and torch.isfinite(p).all()


def test_a_class_without_prototype_is_masked_and_its_rows_are_left_out():
    valid = torch.tensor([True, False])
    psi = prototype_logits(torch.tensor([[0.0, 0.0]]), SPEC_P["a"], valid)
    assert psi[0, 0].item() == 0.0 and psi[0, 1].item() == float("-inf")
    model = spec_model()
    method = build_method("pmr", {}, CONTEXT)
    method.prototypes, method.valid = {m: p.clone() for m, p in SPEC_P.items()}, valid
    batch = Batch(
        inputs={"a": torch.ones(2, 1), "v": torch.ones(2, 1)},
        labels=torch.tensor([0, 1]),
        index=torch.arange(2),
    )
    out = method.training_step(model, batch, 0)
    # only row 0 (class 0) counts: softmax over the one valid class is 1 for both modalities, S_a = S_v = 1,
    # ρ = 1: no PCE; L = CE(z) = log 2, finite
    assert out.logs["score_a"] == 1.0 and out.logs["score_v"] == 1.0
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(out.logs["pce_a"])
    method.valid = torch.tensor([False, True])
    only_0 = Batch(
        inputs={"a": torch.ones(1, 1), "v": torch.ones(1, 1)}, labels=torch.tensor([0]), index=torch.arange(1)
    )
    out = method.training_step(model, only_0, 0)  # no row with a prototype: a zero PCE, still finite
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and out.logs["pce_v"] == 0.0


def test_subset_is_the_first_tenth_of_batches_of_a_seeded_shuffle():
    # N = 100, N_b = 10: ⌊10 · 0.1⌋ = 1 batch = ⌈1 · 100/10⌉ = 10 rows; N_b = 4: ⌊0.4⌋ → at least 1 batch,
    # ⌈100/4⌉ = 25 rows; N = 103, N_b = 26 (batch 4): 2 batches → ⌈2 · 103/26⌉ = ⌈7.92⌉ = 8 rows
    assert len(prototype_subset(100, 10, 0.1, seed=0, stage=0)) == 10
    assert len(prototype_subset(100, 4, 0.1, seed=0, stage=0)) == 25
    assert len(prototype_subset(103, 26, 0.1, seed=0, stage=0)) == 8
    a, b = prototype_subset(100, 10, 0.1, 0, 1), prototype_subset(100, 10, 0.1, 0, 1)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10  # seeded, without repeats
    assert not np.array_equal(a, prototype_subset(100, 10, 0.1, 0, 2))  # re-drawn every pass


# --------------------------------------------------------------------------------- epoch passes


def epoch_method(params: dict | None = None, shift: list[float] | None = None):
    """A PMR whose ``encode_rows`` returns f^a_r = (r, 0) + shift, f^v_r = (0, r); rows 0-9, label r % 2.
    N_b = 10 steps with fraction 1.0: every pass averages all ten rows."""
    scale = shift if shift is not None else [0.0]

    def encode(model, split, rows, names):
        r = torch.as_tensor(rows, dtype=torch.float32)
        a = torch.stack([r + scale[0], torch.zeros_like(r)], 1)
        return {"a": a, "v": torch.stack([torch.zeros_like(r), r], 1)}, torch.as_tensor(rows) % 2

    runtime = Runtime(train_split=list(range(10)), encode_fn=encode)
    context = MethodContext(**{**CONTEXT.__dict__, "runtime": runtime})
    return build_method("pmr", {"prototype_fraction": 1.0, **(params or {})}, context), scale


def test_prototypes_before_epoch_0_then_no_momentum_after_epoch_0_then_momentum():
    method, shift = epoch_method({"momentum": 0.2})
    model = spec_model()
    method.on_epoch_start(model, 0)
    # class 0: rows 0, 2, 4, 6, 8 → mean 4; class 1: rows 1, …, 9 → mean 5. P_a = ((4, 0), (5, 0))
    assert method.prototypes["a"].tolist() == [[4.0, 0.0], [5.0, 0.0]]
    assert method.prototypes["v"].tolist() == [[0.0, 4.0], [0.0, 5.0]]
    shift[0] = 10.0  # the features move by (10, 0)
    metrics = method.on_epoch_end(model, 0)
    assert method.prototypes["a"].tolist() == [[14.0, 0.0], [15.0, 0.0]]  # P = P_new exactly (§34.2)
    assert metrics == {"prototype_classes": 2.0, "prototype_rows": 10.0}
    method.on_epoch_start(model, 1)  # prototypes exist: no recompute
    assert method.prototypes["a"].tolist() == [[14.0, 0.0], [15.0, 0.0]]
    shift[0] = 20.0
    method.on_epoch_end(model, 1)
    # P = 0.8 P_new + 0.2 P_old = 0.8 · (24, 25) + 0.2 · (14, 15) = (22, 23)
    torch.testing.assert_close(method.prototypes["a"], torch.tensor([[22.0, 0.0], [23.0, 0.0]]))


def test_state_round_trips_and_resumes_the_prototypes():
    method, _ = epoch_method()
    assert method.state_dict() == {"prototypes": None, "valid": None}
    method.on_epoch_start(spec_model(), 0)
    clone, _ = epoch_method()
    clone.load_state_dict(method.state_dict())
    assert repr(clone.state_dict()) == repr(method.state_dict())
    clone.on_epoch_start(spec_model(), 1)  # a resumed run does not recompute the initial prototypes
    torch.testing.assert_close(clone.prototypes["a"], method.prototypes["a"])


# ------------------------------------------------------------------------------------------ rules


def test_window_and_evaluation():
    model = spec_model()
    method = build_method("pmr", {"modulation_starts": 1, "modulation_ends": 2}, CONTEXT)
    method.prototypes, method.valid = {m: p.clone() for m, p in SPEC_P.items()}, ALL.clone()
    for epoch, pce in ((0, False), (1, True), (2, True), (3, False)):
        out = method.training_step(model, one_row(), epoch)
        assert ("coef_v" in out.logs) is pce
        assert out.loss.item() == pytest.approx(math.log(2) + (1.3132617 if pce else 0.0), abs=1e-6)
    features = model.encode(one_row().inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), model.fuse(features))
    no_prototypes = build_method("pmr", {}, CONTEXT).training_step(model, one_row(), 0)
    assert no_prototypes.loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_defaults_and_requirements(tiny_config):
    from midasbench.methods.pmr import PMR

    p = build_method("pmr", {}, CONTEXT).params
    assert (p.alpha, p.momentum, p.prototype_fraction, p.modulation_starts, p.modulation_ends) == (
        1.0,
        0.2,
        0.1,
        0,
        None,
    )
    assert not p.local_stats and PMR.dataset_defaults == {} and PMR.requires.min_modalities == 2
    with pytest.raises(ConfigError, match="modulation_ends"):
        build_method("pmr", {"modulation_starts": 3, "modulation_ends": 2}, CONTEXT)
    tiny_config("method.name=pmr", "model.fusion.name=film")  # features only: any fusion head


def test_a_short_run_keeps_a_prototype_for_every_class(tiny_config):
    from midasbench.harness.training.trainer import train

    history = train(tiny_config("method.name=pmr")).history
    # 240 rows, batch 32: N_b = 8 → at least one batch, ⌈1 · 240/8⌉ = 30 rows per pass; 4 classes
    assert all(h["method/prototype_rows"] == 30.0 for h in history)
    assert all(h["method/prototype_classes"] == 4.0 for h in history)
    assert all(math.isfinite(h["train/pce_strong"]) and math.isfinite(h["train/pce_weak"]) for h in history)
