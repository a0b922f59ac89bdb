"""Typed, validated hyperparameters for registry entries (encoders, fusion heads, methods).

Each registry entry declares a pydantic model of its parameters; ``parse_params`` validates a plain dict
from the config against it and turns pydantic's errors into a ``ConfigError`` that names the full key
(``model.encoders.audio.params.hidden``) and the allowed values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from midasbench.harness.errors import ConfigError
from midasbench.harness.registry import Registry


class Params(BaseModel):
    """Base class of every entry's parameters: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class ComponentEntry:
    """A registry entry built from config: a factory, the schema of its params, a one-line description."""

    factory: Callable[..., Any]
    params: type[Params]
    description: str


def component_decorator(
    registry: Registry[ComponentEntry], name: str, params: type[Params], description: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a factory under ``name`` with its params schema; returns the factory."""

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(name)(ComponentEntry(factory=factory, params=params, description=description))
        return factory

    return decorator


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = ".".join(p for p in (prefix, loc) if p) or "(root)"
        detail = err["msg"]
        if err["type"] == "extra_forbidden":
            detail = "unknown key"
        if "ctx" in err and "expected" in err["ctx"] and str(err["ctx"]["expected"]) not in detail:
            detail = f"{detail} (allowed: {err['ctx']['expected']})"
        parts.append(
            f"{key}: {detail} (got {err.get('input')!r})" if err["type"] != "missing" else f"{key}: {detail}"
        )
    return "; ".join(parts)


def parse_params(model: type[P], values: dict[str, Any] | BaseModel | None, prefix: str) -> P:
    if isinstance(values, model):
        return values
    if isinstance(values, BaseModel):
        values = values.model_dump()
    try:
        return model.model_validate(values or {})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, prefix)) from None
