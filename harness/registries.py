"""Validation of the registry-backed parts of a config (methods, encoders, fusion heads).

Imported lazily by ``config.RunConfig`` so that reading a config pulls in torch only when it is checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from .errors import ConfigError
from .params import parse_params
from .registry import UnknownEntryError

if TYPE_CHECKING:
    from .config import ComponentConfig, RunConfig


def _resolve(component: ComponentConfig, schema: type[BaseModel], key: str) -> None:
    parsed = parse_params(schema, component.params, f"{key}.params")
    component.params = parsed.model_dump(mode="json")


def resolve_component_params(cfg: RunConfig) -> None:
    """Check every named entry exists and fill its params with validated values and defaults."""
    from midasbench.methods import METHODS

    from .encoders import ENCODERS
    from .fusion import FUSIONS

    preset_defaults = cfg.method_defaults.get(cfg.method.name, {})
    if preset_defaults:  # the dataset preset's values sit under what the user set
        cfg.method.params = {**preset_defaults, **cfg.method.params}
    try:
        _resolve(cfg.method, METHODS.get(cfg.method.name).Params, "method")
    except UnknownEntryError as exc:
        raise ConfigError(f"method.name: {exc}") from None
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
        _resolve(cfg.model.fusion, FUSIONS.get(cfg.model.fusion.name).params, "model.fusion")
    except UnknownEntryError as exc:
        raise ConfigError(f"model.fusion.name: {exc}") from None
