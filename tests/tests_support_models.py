"""Tiny models shared by unit tests (no dataset needed)."""

from __future__ import annotations

import torch

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
