"""Every registered method: forward/backward on tiny inputs, plus each method's defining mechanism."""

import math

import pytest
import torch
import torch.nn.functional as F
from method_cases import METHOD_CASES
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.config import ModelConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import build_encoder
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MODEL_KINDS, MultimodalModel
from midasbench.methods import METHODS, Method, MethodContext, build_method

MODALITIES = ("a", "b")
CONTEXT = MethodContext(modalities=MODALITIES, num_classes=3, epochs=4, steps_per_epoch=2)


def tiny_model() -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {"a": Linear(4, 3), "b": Linear(2, 3)}
    return MultimodalModel(encoders, ConcatFusion({"a": 3, "b": 3}, 3), num_classes=3)


def tiny_batch() -> Batch:
    torch.manual_seed(1)
    return Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        index=torch.arange(6),
    )


def eval_logits(method: Method, model: MultimodalModel, batch: Batch) -> torch.Tensor:
    """The evaluated prediction, as the evaluation computes it."""
    return method.logits_from_features(model, model.encode(batch.inputs, method.eval_modalities(model)))


def tiny_model_of_kind(kind: str) -> MultimodalModel:
    """The tiny model's shapes as a registered model kind, with ``mlp`` encoders (they have stages)."""
    torch.manual_seed(0)
    mlp = {"hidden": [], "out_dim": 3}
    encoders = {m: build_encoder("mlp", (d,), "float32", mlp) for m, d in (("a", 4), ("b", 2))}
    entry = MODEL_KINDS.get(kind)
    return entry.factory(encoders, ConcatFusion({"a": 3, "b": 3}, 3), 3, ModelConfig(), entry.params())


def prepared(name: str) -> tuple[Method, MultimodalModel]:
    """A method and a tiny model (of the kind it needs) with its own modules attached, as the trainer
    builds them."""
    kind = METHODS.get(name).requires.model_kind
    model = tiny_model() if kind is None else tiny_model_of_kind(kind)
    method = build_method(name, METHOD_CASES[name], CONTEXT)
    model.attach_method_modules(method.build_modules(model))
    return method, model


def test_every_method_has_a_case():
    assert set(METHOD_CASES) == set(METHODS.names())


def backward_all(method: Method, model: MultimodalModel, out, groups) -> None:
    """Back-propagate a step's losses as the trainer does (main params, then each extra optimiser's)."""
    main = [p for g in groups if g.optimizer == "main" for p in g.params]
    out.loss.backward(inputs=main, retain_graph=bool(out.extra_losses))
    for optimizer, loss in out.extra_losses.items():
        loss.backward(inputs=[p for g in groups if g.optimizer == optimizer for p in g.params])


@pytest.mark.parametrize("name", METHODS.names())
def test_forward_backward_gives_finite_gradients_to_every_trainable_parameter(name):
    """Over the sub-steps of one batch at each epoch (phase methods train parts of the model in turn),
    every trainable parameter gets a gradient, and every gradient and loss is finite."""
    (method, model), batch = prepared(name), tiny_batch()
    groups = method.param_groups(model)
    trainable = [p for g in groups for p in g.params]
    assert trainable
    reached: set[int] = set()
    for epoch in range(CONTEXT.epochs):
        for out in method.training_steps(model, batch, epoch=epoch):
            assert out.loss.ndim == 0 and torch.isfinite(out.loss)
            assert all(math.isfinite(v) for v in out.logs.values())
            model.zero_grad(set_to_none=True)
            backward_all(method, model, out, groups)
            for param in trainable:
                if param.grad is not None:
                    assert torch.isfinite(param.grad).all()
                    reached.add(id(param))
    assert all(id(p) in reached for p in trainable)
    logits = eval_logits(method, model, batch)
    assert logits.shape == (6, 3)


@pytest.mark.parametrize("name", METHODS.names())
def test_state_round_trips_and_fidelity_is_declared(name):
    method = build_method(name, METHOD_CASES[name], CONTEXT)
    assert method.fidelity in {"paper", "official-code", "inferred", "reconstructed", "baseline"}
    clone = build_method(name, METHOD_CASES[name], CONTEXT)
    clone.load_state_dict(method.state_dict())
    assert repr(clone.state_dict()) == repr(method.state_dict())


def test_joint_loss_is_fused_cross_entropy_computed_by_hand():
    # Two modalities with 1-d identity-like encoders and a hand-set fusion head:
    # z = [1, 2] for sample 0 (label 1), z = [0, 0] for sample 1 (label 0).
    model = tiny_model()
    with torch.no_grad():
        for enc in model.encoders.values():
            enc.weight.zero_()
            enc.bias.zero_()
        model.encoders["a"].weight[0, 0] = 1.0
        model.fusion.linear.weight.zero_()
        model.fusion.linear.bias.zero_()
        model.fusion.linear.weight[1, 0] = 1.0  # class-1 logit = feature a0
        model.fusion.linear.weight[2, 0] = 2.0  # class-2 logit = 2 * a0
    batch = Batch(
        inputs={"a": torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]), "b": torch.zeros(2, 2)},
        labels=torch.tensor([1, 0]),
        index=torch.arange(2),
    )
    out = build_method("joint", {}, CONTEXT).training_step(model, batch, 0)
    # sample 0: logits (0, 1, 2) → CE = log(1 + e + e²) − 1; sample 1: logits 0 → CE = log 3
    expected = (math.log(1 + math.e + math.e**2) - 1 + math.log(3)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_joint_without_unimodal_weight_leaves_the_unimodal_heads_out():
    model = tiny_model()
    names = {id(p) for p in build_method("joint", {}, CONTEXT).trainable_parameters(model)}
    assert not any(id(p) in names for p in model.unimodal_heads.parameters())
    with_heads = {
        id(p) for p in build_method("joint", {"unimodal_weight": 1}, CONTEXT).trainable_parameters(model)
    }
    assert all(id(p) in with_heads for p in model.unimodal_heads.parameters())


def test_unimodal_trains_and_predicts_with_one_modality_only():
    model, batch = tiny_model(), tiny_batch()
    method = build_method("unimodal", {"modality": "b"}, CONTEXT)
    assert method.label == "unimodal[b]"
    out = method.training_step(model, batch, 0)
    expected = F.cross_entropy(
        model.unimodal_heads["b"](model.encoders["b"](batch.inputs["b"])), batch.labels
    )
    assert out.loss.item() == pytest.approx(expected.item())
    out.loss.backward()
    assert model.encoders["a"].weight.grad is None and model.fusion.linear.weight.grad is None
    # the modality-a input does not influence its predictions
    changed = Batch(inputs={**batch.inputs, "a": torch.randn(6, 4)}, labels=batch.labels, index=batch.index)
    torch.testing.assert_close(eval_logits(method, model, batch), eval_logits(method, model, changed))


def test_unimodal_rejects_a_modality_the_dataset_lacks():
    with pytest.raises(ConfigError, match=r"method\.params\.modality: 'c' is not a modality .*allowed: a, b"):
        build_method("unimodal", {"modality": "c"}, CONTEXT)
    with pytest.raises(ConfigError, match="allowed: a, b"):
        build_method("unimodal", {}, CONTEXT)


def test_unimodal_takes_a_modality_position_and_labels_it_by_name():
    method = build_method("unimodal", {"modality": 1}, CONTEXT)
    assert method.modality == "b" and method.label == "unimodal[b]"
    assert build_method("unimodal", {"modality": 0}, CONTEXT).label == "unimodal[a]"
    with pytest.raises(ConfigError, match=r"position 2 is out of range.*\(a, b\), positions 0-1"):
        build_method("unimodal", {"modality": 2}, CONTEXT)
