"""Fusion heads: map the per-modality features (in the model's modality order) to class logits.

``concat`` is the head of the MIDAS paper and code (methods.md §0.2, §2.1): one ``Linear(Σ d_m → C)`` on
the concatenation, no hidden layer. Its weight splits by columns per modality, which the sliced-logit
baselines (OGM-GE and relatives) rely on. ``concat_mlp`` adds a hidden layer for users who want one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from .params import ComponentEntry, Params, component_decorator, parse_params
from .registry import Registry

FUSIONS: Registry[ComponentEntry] = Registry("fusion")


def register_fusion(name: str, params: type[Params], description: str) -> Callable:
    """Decorator for a factory ``(feature_dims, num_classes, params) -> nn.Module`` giving logits."""
    return component_decorator(FUSIONS, name, params, description)


def build_fusion(
    name: str, feature_dims: dict[str, int], num_classes: int, params: dict[str, Any] | None
) -> nn.Module:
    entry = FUSIONS.get(name)
    return entry.factory(
        dict(feature_dims), num_classes, parse_params(entry.params, params, "model.fusion.params")
    )


class ConcatParams(Params):
    pass


class ConcatFusion(nn.Module):
    """``z = W [f^1; …; f^M] + c`` (MIDAS §3.1 and its code's ``task_net``)."""

    def __init__(self, feature_dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.modalities = list(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.linear = nn.Linear(sum(feature_dims.values()), num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat([features[m] for m in self.modalities], dim=1))


@register_fusion("concat", ConcatParams, "concatenation + one linear layer (the MIDAS paper's head)")
def _concat(feature_dims: dict[str, int], num_classes: int, params: ConcatParams) -> nn.Module:
    return ConcatFusion(feature_dims, num_classes)


class ConcatMLPParams(Params):
    hidden: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)


class ConcatMLPFusion(nn.Module):
    """Concatenation followed by one hidden ReLU layer."""

    def __init__(self, feature_dims: dict[str, int], num_classes: int, params: ConcatMLPParams) -> None:
        super().__init__()
        self.modalities = list(feature_dims)
        self.net = nn.Sequential(
            nn.Linear(sum(feature_dims.values()), params.hidden),
            nn.ReLU(),
            nn.Dropout(params.dropout),
            nn.Linear(params.hidden, num_classes),
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([features[m] for m in self.modalities], dim=1))


@register_fusion("concat_mlp", ConcatMLPParams, "concatenation + hidden ReLU layer + linear")
def _concat_mlp(feature_dims: dict[str, int], num_classes: int, params: ConcatMLPParams) -> nn.Module:
    return ConcatMLPFusion(feature_dims, num_classes, params)
