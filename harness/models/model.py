"""The multimodal model: per-modality encoders, a fusion head, per-modality unimodal heads, and the
modules a method owns.

The unimodal heads ``g_m`` (MIDAS §3.1) exist on every model so that any method can use them; methods
that do not (``joint``) leave them out of the optimiser. Methods call ``encode``/``fuse``/``unimodal``
separately (e.g. MIDAS fuses misaligned feature pairs), so nothing here is specific to one method.

Precision contract: only the encoders run under autocast (bf16 on GPU); ``encode`` hands back float32
features, and every head, method module, loss, soft label and distance after it computes in float32
without a cast in the method. Modules a method declares (``Method.build_modules``) live under
``method_modules``, so they move to the device, switch train/eval, are reduced, clipped and checkpointed
with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from midasbench.datasets.format import Manifest
from midasbench.harness.config import ComponentConfig, ModelConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import build_encoder
from midasbench.harness.models.fusion import build_fusion
from midasbench.harness.params import ComponentEntry, Params, component_decorator, parse_params
from midasbench.harness.registry import Registry


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
        self.method_modules = nn.ModuleDict()
        self.autocast_dtype: torch.dtype | None = None
        # modalities whose rows are padded sequences: their encoders get each row's length (build_model)
        self.variable_length: frozenset[str] = frozenset()

    @property
    def feature_dims(self) -> dict[str, int]:
        return {m: int(enc.out_dim) for m, enc in self.encoders.items()}

    def attach_method_modules(self, modules: dict[str, nn.Module]) -> None:
        """Adopt a method's own modules (before the model moves to its device and the optimiser is built)."""
        for name, module in modules.items():
            if name in self.method_modules:
                raise ValueError(f"method module {name!r} is attached twice")
            self.method_modules[name] = module

    def set_statistics_reducer(self, reducer: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """How running statistics a model kind updates in training forwards are summed over ranks (the
        trainer passes ``runtime.all_reduce_sum``, so replicas stay equal); late fusion keeps none."""

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """The encoders' autocast dtype (None: float32 throughout)."""
        self.autocast_dtype = dtype

    def _encoder_autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def encode(
        self, inputs: Mapping[str, torch.Tensor], modalities: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Features per modality, float32 whatever precision the encoders ran in. A variable-length
        modality's encoder also gets its rows' lengths (``ModalityInputs.lengths``)."""
        names = self.modalities if modalities is None else list(modalities)
        out = {}
        for m in names:
            with self._encoder_autocast(inputs[m].device):
                feature = self.encoders[m](inputs[m], *self._lengths_of(inputs, m))
            out[m] = feature.float()
        return out

    def _lengths_of(self, inputs: Mapping[str, torch.Tensor], modality: str) -> tuple[torch.Tensor, ...]:
        """``(lengths,)`` for a variable-length modality, else ``()``; missing lengths are an error, never
        a sequence silently read with its padding."""
        if modality not in self.variable_length:
            return ()
        lengths = getattr(inputs, "lengths", {})
        if modality not in lengths:
            raise ValueError(
                f"modality {modality!r} holds variable-length sequences, but its inputs carry no lengths: "
                "build them with ModalityInputs (batch.inputs.rows(...) / .replace(...)), not a plain dict"
            )
        return (lengths[modality],)

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(features)

    @property
    def fusion_decomposable(self) -> bool:
        return bool(getattr(self.fusion, "decomposable", False))

    def modality_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's additive share of the fused logits (OGM-style sliced logits, methods.md §0.2);
        raises ``NotDecomposableError`` for a head whose logits do not split by modality."""
        return self.fusion.modality_logits(features)

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


# (encoders by modality, fusion head, number of classes, model config, the kind's params) -> model
MODEL_KINDS: Registry[ComponentEntry] = Registry("model kind")
DEFAULT_MODEL_KIND = "late_fusion"


def register_model_kind(name: str, params: type[Params], description: str) -> Callable:
    """``@register_model_kind("mmtm", MMTMParams, "...")``: a model architecture a config (``model.kind``,
    its settings under ``model.kind_params``) or a method (``Requirements.model_kind``) can ask for, built
    from the same encoders and fusion head."""
    return component_decorator(MODEL_KINDS, name, params, description)


@register_model_kind(DEFAULT_MODEL_KIND, Params, "independent encoders fused after their last layer")
def _late_fusion(
    encoders: dict[str, nn.Module],
    fusion: nn.Module,
    num_classes: int,
    model_cfg: ModelConfig,
    params: Params,
) -> MultimodalModel:
    """Independent encoders, features fused by the head after the last layer (MIDAS §3.1)."""
    return MultimodalModel(encoders, fusion, num_classes)


def build_model(
    model_cfg: ModelConfig, manifest: Manifest, kind: str = DEFAULT_MODEL_KIND
) -> MultimodalModel:
    """Build encoders for the dataset's modalities (in manifest order), the heads on top, and the model
    of the registered ``kind`` around them."""
    entry = MODEL_KINDS.get(kind)
    kind_params = parse_params(entry.params, model_cfg.kind_params, "model.kind_params")
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
        if spec.variable_length and not getattr(encoders[modality], "takes_lengths", False):
            raise ConfigError(
                f"model.encoders.{modality}: encoder {component.name!r} cannot read variable-length "
                f"sequences (modality {modality!r} of dataset {manifest.name!r} has a length per row); use "
                "an encoder that takes lengths (transformer, hf_text)"
            )
    fusion = build_fusion(
        model_cfg.fusion.name,
        {m: enc.out_dim for m, enc in encoders.items()},
        manifest.num_classes,
        model_cfg.fusion.params,
    )
    model = entry.factory(encoders, fusion, manifest.num_classes, model_cfg, kind_params)
    model.variable_length = frozenset(m for m, s in manifest.modalities.items() if s.variable_length)
    return model
