"""Tiny models shared by unit tests (no dataset needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midasbench.datasets.loader import Batch
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel


class LinearEncoder(torch.nn.Linear):
    """A linear encoder that reports its output width as the model expects."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.out_dim = o


class IdentityEncoder(torch.nn.Linear):
    """A d → d encoder that starts as the identity (weight I, bias 0): features equal inputs, so the
    tests' expected values can be computed by hand from the inputs."""

    def __init__(self, d: int) -> None:
        super().__init__(d, d)
        self.out_dim = d
        with torch.no_grad():
            self.weight.copy_(torch.eye(d))
            self.bias.zero_()


def two_layer_model(num_classes: int = 2) -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {"a": LinearEncoder(4, 3), "b": LinearEncoder(2, 3)}
    return MultimodalModel(encoders, ConcatFusion({"a": 3, "b": 3}, num_classes), num_classes=num_classes)


def leading_a_model() -> MultimodalModel:
    """Identity encoders, d_a = 3, d_b = 1, two classes, zero bias: the sliced logits are
    s^a = (5 a_0, 5 a_1) (a strong) and s^b = (0, 0.5 b) (b weak), for hand-computed modulation tests."""
    model = MultimodalModel(
        {"a": IdentityEncoder(3), "b": IdentityEncoder(1)}, ConcatFusion({"a": 3, "b": 1}, 2), 2
    )
    with torch.no_grad():
        model.fusion.linear.weight.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0.5]]))
        model.fusion.linear.bias.zero_()
    return model


def leading_a_batch() -> Batch:
    """Four rows for ``leading_a_model``: a_i = e_{y_i} in R^3, b_i = 1."""
    labels = torch.tensor([0, 1, 0, 1])
    a = F.pad(F.one_hot(labels, 2).float(), (0, 1))
    return Batch(inputs={"a": a, "b": torch.ones(4, 1)}, labels=labels, index=torch.arange(4))
