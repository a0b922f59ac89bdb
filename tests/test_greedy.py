"""Greedy (``greedy``, methods.md §17; official ``Bias_Mitigation_Strong``): the learning-speed / BDR formula
by hand, the curation switch and its window, the warm-up, state round trip, evaluation and requirements.
Expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from tests_support_models import two_layer_model

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import build_encoder
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.mmtm import MMTMModel
from midasbench.harness.training.trainer import TrainingRun
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.greedy import bdr, cared_for, group_speed, speed_difference, squared_norms

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=4, steps_per_epoch=4)


def tiny_mmtm() -> MMTMModel:
    torch.manual_seed(0)
    encoders = {
        m: build_encoder("mlp", (d,), "float32", {"hidden": [3], "out_dim": 3})
        for m, d in (("a", 4), ("b", 2))
    }
    return MMTMModel(encoders, ConcatFusion({"a": 3, "b": 3}, 3), 3)


def tiny_batch() -> Batch:
    torch.manual_seed(1)
    x = {"a": torch.randn(6, 4), "b": torch.randn(6, 2)}
    return Batch(inputs=x, labels=torch.tensor([0, 1, 2, 0, 1, 2]), index=torch.arange(6))


def set_by_hand(model: MMTMModel, main_grad: dict[str, float]) -> None:
    """Every parameter 1; gradients 0.1 on the MMTM blocks, ``main_grad[m]`` on encoder m's parameters."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.full_like(p, 0.1)
        for m, g in main_grad.items():
            for p in model.main_parameters(m):
                p.grad = torch.full_like(p, g)


def step(method, model: MMTMModel, epoch: int, main_grad: dict[str, float]) -> str | None:
    """One training step with hand-set gradients; returns the modality curated in it."""
    method.training_step(model, tiny_batch(), epoch)
    curated = model.curated
    set_by_hand(model, main_grad)
    method.after_backward(model, epoch)
    return curated


# ------------------------------------------------------------------------------------- functional core


def test_squared_norms_and_group_speed_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w.grad = torch.tensor([0.5, 0.0])
    v = torch.nn.Parameter(torch.tensor([[3.0]]))  # no gradient: adds only to Σ‖θ‖²
    # Σ‖∇θ‖² = 0.25; Σ‖θ‖² = 1 + 4 + 9 = 14
    assert squared_norms([w, v]).tolist() == [0.25, 14.0]
    assert group_speed(0.25, 14.0) == pytest.approx(0.25 / 14)
    assert group_speed(1.0, 0.0) == 0.0


def test_bdr_and_speed_difference_by_hand():
    # BDR_0 = log10(0.02 / 0.2) = −1; BDR_1 = log10(0.001 / 0.1) = −2; d = −1 − (−2) = 1
    assert bdr(0.02, 0.2) == pytest.approx(-1.0)
    assert speed_difference([0.02, 0.001], [0.2, 0.1]) == pytest.approx(1.0)
    assert speed_difference([0.001, 0.02], [0.1, 0.2]) == pytest.approx(-1.0)
    assert speed_difference([0.0, 0.02], [0.1, 0.2]) is None  # M_bypass,0 = 0: undefined
    assert bdr(1.0, 0.0) is None


def test_the_cared_for_modality():
    # d > α: BDR_0 > BDR_1, re-balance modality 0; d < −α: modality 1; |d| ≤ α or undefined: none
    assert cared_for(0.5, 0.001) == 0 and cared_for(-0.5, 0.001) == 1
    assert (
        cared_for(0.001, 0.001) is None and cared_for(-0.0005, 0.001) is None and cared_for(None, 0.1) is None
    )


# ---------------------------------------------------------------------------------------------- method


def test_speeds_accumulate_from_the_gradients_and_trigger_curation():
    model, method = tiny_mmtm(), build_method("greedy", {"curation_starts": 0}, CONTEXT)
    method.build_modules(model)
    assert step(method, model, 0, {"a": 0.1, "b": 0.2}) is None
    # all weights 1: μ = Σ‖∇θ‖² / Σ‖θ‖² = g² for a group whose gradients are all g.
    # bypass (blocks, g = 0.1): μ = 0.01 for a and b; main: a g = 0.1 → 0.01, b g = 0.2 → 0.04
    assert method.sums == pytest.approx([0.01, 0.01, 0.01, 0.04])
    # BDR_a = log10(0.01/0.01) = 0; BDR_b = log10(0.01/0.04) = −0.60206; d = 0.60206 > α → curate a
    assert method.speed == pytest.approx(-math.log10(0.25))
    assert method.curated == 0
    logs = method.training_step(model, tiny_batch(), 0).logs
    assert model.curated == "a" and logs["curation"] == 1.0 and logs["curated_a"] == 1.0
    assert logs["bdr_b"] == pytest.approx(math.log10(0.25)) and logs["speed"] == pytest.approx(0.60206, 1e-4)


def test_curation_lasts_window_steps_without_accumulating_then_d_is_recomputed():
    model = tiny_mmtm()
    method = build_method("greedy", {"window_size": 2, "curation_starts": 0}, CONTEXT)
    method.build_modules(model)
    grads = {"a": 0.2, "b": 0.1}  # main_b learns slower: BDR_b > BDR_a, d < 0 → curate b
    assert step(method, model, 0, grads) is None
    sums = list(method.sums)
    assert method.curated == 1
    assert [step(method, model, 0, grads) for _ in range(2)] == ["b", "b"]  # window = 2 steps
    assert method.sums == sums  # not accumulated while re-balancing
    assert step(method, model, 0, {"a": 0.1, "b": 0.1}) is None  # regular step: d again
    # M_bypass = 0.02 for both; M_main,a = 0.04 + 0.01, M_main,b = 0.01 + 0.01
    # d = log10(0.02/0.05) − log10(0.02/0.02) = −0.39794 → b again
    assert method.sums == pytest.approx([0.02, 0.02, 0.05, 0.02])
    assert method.speed == pytest.approx(math.log10(0.4)) and method.curated == 1


def test_no_curation_before_curation_starts_but_speeds_accumulate():
    model, method = tiny_mmtm(), build_method("greedy", {"curation_starts": 1}, CONTEXT)
    method.build_modules(model)
    assert step(method, model, 0, {"a": 0.1, "b": 0.2}) is None and method.curated is None
    assert method.sums == pytest.approx([0.01, 0.01, 0.01, 0.04])
    step(method, model, 1, {"a": 0.1, "b": 0.2})
    assert method.curated == 0  # epoch 1: |d| > α starts re-balancing
    with_big_alpha = build_method("greedy", {"alpha": 1.0, "curation_starts": 0}, CONTEXT)
    step(with_big_alpha, model, 0, {"a": 0.1, "b": 0.2})
    assert with_big_alpha.curated is None  # |d| = 0.602 ≤ α


def test_state_round_trip_resumes_the_window_exactly():
    model = tiny_mmtm()
    method = build_method("greedy", {"window_size": 3, "curation_starts": 0}, CONTEXT)
    method.build_modules(model)
    step(method, model, 0, {"a": 0.1, "b": 0.2})
    step(method, model, 0, {"a": 0.1, "b": 0.2})  # first of three curated steps
    clone = build_method("greedy", {"window_size": 3, "curation_starts": 0}, CONTEXT)
    clone.load_state_dict(method.state_dict())
    assert clone.state_dict() == method.state_dict()
    assert clone.state_dict()["curated"] == 0 and clone.state_dict()["curation_step"] == 1
    for run in (method, clone):  # two more curated steps, then a regular one
        assert [step(run, model, 0, {"a": 0.1, "b": 0.1}) for _ in range(3)] == ["a", "a", None]
    assert clone.state_dict() == method.state_dict()


def test_evaluation_is_the_normal_forward():
    model = tiny_mmtm()
    method = build_method("greedy", {}, CONTEXT)
    method.build_modules(model)
    batch = tiny_batch()
    model.eval()
    plain = method.logits_from_features(model, model.encode(batch.inputs))
    model.set_curation("a")  # curation acts in training forwards only
    torch.testing.assert_close(method.logits_from_features(model, model.encode(batch.inputs)), plain)
    torch.testing.assert_close(plain, model.fuse(model.encode(batch.inputs)))


def test_branches_objective_is_the_official_blend_loss_and_mean_prediction():
    model = tiny_mmtm().eval()
    method = build_method("greedy", {"objective": "branches"}, CONTEXT)
    assert method.label == "greedy[branches]" and build_method("greedy", {}, CONTEXT).label == "greedy"
    batch = tiny_batch()
    features = model.encode(batch.inputs)
    heads = model.unimodal(features)
    loss = method.training_step(model, batch, 0).loss
    expected = sum(torch.nn.functional.cross_entropy(z, batch.labels) for z in heads.values())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(method.logits_from_features(model, features), (heads["a"] + heads["b"]) / 2)
    names = {id(p) for p in method.trainable_parameters(model)}
    assert not any(id(p) in names for p in model.fusion.parameters())
    assert all(id(p) in names for p in model.unimodal_heads.parameters())


def test_requirements_and_the_model_kind():
    cls = METHODS.get("greedy")
    assert cls.requires.model_kind == "mmtm" and cls.requires.max_modalities == 2
    assert cls.requires.resolve_model_kind("greedy", None) == "mmtm"
    with pytest.raises(ConfigError, match=r"model\.kind: method 'greedy' needs model kind 'mmtm'"):
        cls.requires.resolve_model_kind("greedy", "late_fusion")
    with pytest.raises(ConfigError, match="exactly 2 modalities"):
        cls.requires.check("greedy", "concat", True, 3)
    late = two_layer_model(3)
    with pytest.raises(ConfigError, match="needs model kind 'mmtm', got MultimodalModel"):
        build_method("greedy", {}, CONTEXT).build_modules(late)


def test_the_trainer_builds_the_mmtm_kind_and_sums_its_running_means_over_ranks(tiny_config):
    run = TrainingRun(tiny_config("method.name=greedy", "model.kind_params={ratio: 2.0, gate_scale: 1.0}"))
    assert isinstance(run.model, MMTMModel)
    assert run.model.statistics_reducer == run.runtime.all_reduce_sum  # running means over all ranks
    block = next(iter(run.model.mmtm.values()))
    assert block.gate_scale == 1.0  # model.kind_params reach the kind
    with pytest.raises(ConfigError, match=r"model\.kind_params\.ratios: unknown key"):
        tiny_config("method.name=greedy", "model.kind_params={ratios: 2.0}")
