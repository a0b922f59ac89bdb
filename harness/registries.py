"""Validation of the registry-backed parts of a config (methods, encoders, fusion heads).

Imported lazily by ``config.RunConfig`` so that reading a config pulls in torch only when it is checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from midasbench.harness.errors import ConfigError
from midasbench.harness.params import parse_params
from midasbench.harness.registry import UnknownEntryError

if TYPE_CHECKING:
    from midasbench.harness.config import ComponentConfig, RunConfig


def _resolve(component: ComponentConfig, schema: type[BaseModel], key: str) -> None:
    parsed = parse_params(schema, component.params, f"{key}.params")
    component.params = parsed.model_dump(mode="json")


def resolve_component_params(cfg: RunConfig) -> None:
    """Check every named entry exists and fill its params with validated values and defaults."""
    from midasbench.harness.models.encoders import ENCODERS
    from midasbench.harness.models.fusion import FUSIONS
    from midasbench.harness.models.model import MODEL_KINDS
    from midasbench.methods import METHODS

    try:
        method = METHODS.get(cfg.method.name)
    except UnknownEntryError as exc:
        raise ConfigError(f"method.name: {exc}") from None
    # the method's own per-dataset defaults, then the config's method_defaults, then what the user set
    own = method.dataset_defaults.get(cfg.data.name or "", {})
    configured = cfg.method_defaults.get(cfg.method.name, {})
    if own or configured:
        cfg.method.params = {**own, **configured, **cfg.method.params}
    _resolve(cfg.method, method.Params, "method")
    encoders = dict(cfg.model.encoders)
    if cfg.model.default_encoder is not None:
        encoders["(default_encoder)"] = cfg.model.default_encoder
    for modality, component in encoders.items():
        key = "model.default_encoder" if modality == "(default_encoder)" else f"model.encoders.{modality}"
        try:
            _resolve(component, ENCODERS.get(component.name).params, key)
        except UnknownEntryError as exc:
            raise ConfigError(f"{key}.name: {exc}") from None
    try:
        fusion = FUSIONS.get(cfg.model.fusion.name)
    except UnknownEntryError as exc:
        raise ConfigError(f"model.fusion.name: {exc}") from None
    _resolve(cfg.model.fusion, fusion.params, "model.fusion")
    # what the method needs of the head is known now; the modality count once the dataset is read
    method.requires.check(cfg.method.name, cfg.model.fusion.name, fusion.decomposable, None)
    kind = MODEL_KINDS.get(method.requires.resolve_model_kind(cfg.method.name, cfg.model.kind))
    parse_params(kind.params, cfg.model.kind_params, "model.kind_params")
    resolve_transform_params(cfg)


def resolve_transform_params(cfg: RunConfig) -> None:
    """Every ``data.transforms`` entry exists, with validated params and defaults (recorded with the run);
    shapes are checked against the dataset when the run builds its pipelines."""
    from midasbench.datasets.transforms import TRANSFORMS, NormalizeParams

    for modality, entry in cfg.data.transforms.items():
        for phase in ("train", "eval"):
            for position, component in enumerate(getattr(entry, phase)):
                key = f"data.transforms.{modality}.{phase}[{position}]"
                try:
                    _resolve(component, TRANSFORMS.get(component.name).params, key)
                except UnknownEntryError as exc:
                    raise ConfigError(f"{key}.name: {exc}") from None
        if entry.normalize is not None:
            key = f"data.transforms.{modality}.normalize"
            entry.normalize = parse_params(NormalizeParams, entry.normalize, key).model_dump(mode="json")
