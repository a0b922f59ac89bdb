"""MMCosine (methods-more.md §22): the §22.8 unit test, scale invariance, the ignored and frozen bias,
the evaluation rule and its official switch, the head requirement. Values by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from tests_support_models import IdentityEncoder as Identity

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion, SumFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import MethodContext, build_method
from midasbench.methods.mmcosine import cosine_logits

CONTEXT = MethodContext(modalities=("a", "v"), num_classes=2, epochs=3, steps_per_epoch=1)


def spec_model() -> MultimodalModel:
    """§22.8: W_a rows (1, 0), (0, 2); W_v rows (0, 1), (1, 1); a bias of 7 that must be ignored."""
    model = MultimodalModel({"a": Identity(2), "v": Identity(2)}, ConcatFusion({"a": 2, "v": 2}, 2), 2)
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 1], [0, 2, 1, 1]]))
        model.fusion.linear.bias.copy_(torch.tensor([7.0, -7.0]))
    return model


def spec_batch() -> Batch:
    return Batch(
        inputs={"a": torch.tensor([[3.0, 4.0]]), "v": torch.tensor([[0.0, 5.0]])},
        labels=torch.tensor([0]),
        index=torch.arange(1),
    )


# §22.8: cos_a = (3/5, 8/10) = (0.6, 0.8); cos_v = (5/5, 5/(5√2)) = (1, 0.70711)
# z = 10 (0.6 + 1, 0.8 + 0.70711) = (16, 15.07107); CE(y = 0) = log(1 + e^(15.07107 − 16)) = 0.33288
Z = [16.0, 10 * (0.8 + 1 / math.sqrt(2))]


def test_spec_unit_test_logits_and_loss():
    model, method = spec_model(), build_method("mmcosine", {}, CONTEXT)
    out = method.training_step(model, spec_batch(), epoch=0)
    assert out.loss.item() == pytest.approx(0.33288, abs=1e-5)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(Z[1] - Z[0])), abs=1e-6)
    features = model.encode(spec_batch().inputs)
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([Z]))
    # per-modality logits 10 cos: a = (6, 8) → predicts 1 (wrong), v = (10, 7.07) → predicts 0 (right)
    assert out.logs["acc_a"] == 0.0 and out.logs["acc_v"] == 1.0


def test_positive_rescaling_of_a_row_or_a_feature_leaves_the_logits_unchanged():
    model = spec_model()
    features = {"a": torch.tensor([[3.0, 4.0]]), "v": torch.tensor([[0.0, 5.0]])}
    with torch.no_grad():
        model.fusion.linear.weight[1, :2] *= 3.5  # row c = 1 of W_a
        model.fusion.linear.weight[0, 2:] *= 0.2  # row c = 0 of W_v
    scaled = {"a": 4 * features["a"], "v": 0.1 * features["v"]}
    torch.testing.assert_close(cosine_logits(model.fusion, scaled, 10.0), torch.tensor([Z]))


def test_zero_feature_gives_cosine_zero():
    model = spec_model()
    z = cosine_logits(model.fusion, {"a": torch.zeros(1, 2), "v": torch.tensor([[0.0, 5.0]])}, 10.0)
    torch.testing.assert_close(z, torch.tensor([[10.0, 10 / math.sqrt(2)]]))  # only v's cosines


def test_bias_is_frozen_and_ignored_weight_and_encoders_train():
    model, method = spec_model(), build_method("mmcosine", {}, CONTEXT)
    trainable = {id(p) for p in method.trainable_parameters(model)}
    assert id(model.fusion.linear.bias) not in trainable and id(model.fusion.linear.weight) in trainable
    assert trainable == {id(p) for p in [*model.encoders.parameters(), model.fusion.linear.weight]}
    out = method.training_step(model, spec_batch(), epoch=0)
    out.loss.backward()
    assert model.fusion.linear.bias.grad is None  # §22.2: no bias in the logits
    assert model.fusion.linear.weight.grad is not None and model.encoders["a"].weight.grad is not None


def test_raw_linear_switch_evaluates_with_the_official_head_output():
    model = spec_model()
    method = build_method("mmcosine", {"mmcos_eval": "raw_linear"}, CONTEXT)
    assert (
        method.label == "mmcosine[raw_linear]" and build_method("mmcosine", {}, CONTEXT).label == "mmcosine"
    )
    features = model.encode(spec_batch().inputs)
    # W [f_a; f_v] + c = (1·3 + 1·5 + 7, 2·4 + 1·0 + 1·5 − 7) = (15, 6)
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([[15.0, 6.0]]))
    # training still uses the cosine logits
    assert method.training_step(model, spec_batch(), 0).loss.item() == pytest.approx(0.33288, abs=1e-5)


def test_refuses_a_head_other_than_concat_and_is_stateless():
    model = MultimodalModel({"a": Identity(2), "v": Identity(2)}, SumFusion({"a": 2, "v": 2}, 2), 2)
    method = build_method("mmcosine", {}, CONTEXT)
    with pytest.raises(ConfigError, match=r"model\.fusion\.name: method 'mmcosine' needs the concat"):
        method.build_modules(model)
    with pytest.raises(ConfigError, match="decomposable"):
        method.requires.check("mmcosine", "gated", False, 2)
    assert method.state_dict() == {} and method.fidelity == "official-code"
    assert method.params.scale == 10.0
