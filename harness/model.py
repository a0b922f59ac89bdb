"""The multimodal model: per-modality encoders, a fusion head, and per-modality unimodal heads.

The unimodal heads ``g_m`` (MIDAS §3.1) exist on every model so that any method can use them; methods
that do not (``joint``) leave them out of the optimiser. Methods call ``encode``/``fuse``/``unimodal``
separately (e.g. MIDAS fuses misaligned feature pairs), so nothing here is specific to one method.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from midasbench.datasets.format import Manifest

from .config import ComponentConfig, ModelConfig
from .encoders import build_encoder
from .errors import ConfigError
from .fusion import build_fusion


class MultimodalModel(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.modalities = list(encoders)
        self.num_classes = num_classes
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.unimodal_heads = nn.ModuleDict(
            {m: nn.Linear(enc.out_dim, num_classes) for m, enc in encoders.items()}
        )

    def encode(
        self, inputs: dict[str, torch.Tensor], modalities: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        names = self.modalities if modalities is None else list(modalities)
        return {m: self.encoders[m](inputs[m]) for m in names}

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(features)

    def unimodal(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.unimodal_heads[m](f) for m, f in features.items()}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fuse(self.encode(inputs))


def encoder_config_for(model_cfg: ModelConfig, modality: str) -> ComponentConfig:
    if modality in model_cfg.encoders:
        return model_cfg.encoders[modality]
    if model_cfg.default_encoder is None:
        raise ConfigError(
            f"model.encoders: no encoder for modality {modality!r} and model.default_encoder is null"
        )
    return model_cfg.default_encoder


def build_model(model_cfg: ModelConfig, manifest: Manifest) -> MultimodalModel:
    """Build encoders for the dataset's modalities (in manifest order) and the heads on top."""
    unknown = sorted(set(model_cfg.encoders) - set(manifest.modalities))
    if unknown:
        raise ConfigError(
            f"model.encoders: {unknown} are not modalities of dataset {manifest.name!r} "
            f"(it has {manifest.modality_names})"
        )
    encoders = {}
    for modality, spec in manifest.modalities.items():
        component = encoder_config_for(model_cfg, modality)
        encoders[modality] = build_encoder(
            component.name, spec.shape, spec.dtype, component.params, key=f"model.encoders.{modality}.params"
        )
    fusion = build_fusion(
        model_cfg.fusion.name,
        {m: enc.out_dim for m, enc in encoders.items()},
        manifest.num_classes,
        model_cfg.fusion.params,
    )
    return MultimodalModel(encoders, fusion, manifest.num_classes)
