"""Typed run configuration: YAML files, presets, dotted ``key=value`` overrides, validation up front.

One ``RunConfig`` fully describes a run (dataset and split, seeds, encoders, fusion, method and its
hyperparameters, optimiser, schedule, epochs, batch size, device, tracking). Unknown keys, wrong types
and out-of-range values are rejected before any work starts, with the dotted key and the allowed values
in the message. Registry-backed sections (``method.params``, ``model.encoders.<m>.params``,
``model.fusion.params``) are validated against the entry's own schema and stored with defaults filled
in, so the saved resolved config reproduces the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from midasbench.harness.errors import ConfigError
from midasbench.harness.params import describe_validation_error


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Marks a field added after sweeps were already being run: at its default it stays out of the config
# fingerprint, so trials (and their checkpoints) of configs written before it keep their keys and resume.
OMIT_FROM_FINGERPRINT_AT_DEFAULT = {"fingerprint": "omit-at-default"}


class ComponentConfig(_Section):
    """A registry entry by name plus its parameters (validated by the entry's own schema)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModalityTransformsConfig(_Section):
    """One modality's transforms (``datasets/transforms.py``), applied in batch on the training device."""

    train: list[ComponentConfig] = Field(default_factory=list, description="on training batches, in order")
    eval: list[ComponentConfig] = Field(
        default_factory=list, description="on validation, test, extraction and methods' own passes"
    )
    normalize: dict[str, Any] | None = Field(
        default=None, description="normalize params (mean, std or preset: imagenet) appended to both lists"
    )


class DataConfig(_Section):
    """Which dataset, built how, split how. ``split_seed`` is independent of the init seed."""

    name: str | None = "synthetic"
    path: str | None = None
    root: str | None = None
    split: Literal["official", "midas70"] = "midas70"
    split_seed: int = Field(default=2, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)
    transforms: dict[str, ModalityTransformsConfig] = Field(
        default_factory=dict,
        json_schema_extra=OMIT_FROM_FINGERPRINT_AT_DEFAULT,
        description="per modality: train / eval transform lists and normalize (`midasbench list transforms`)",
    )


class ModelConfig(_Section):
    encoders: dict[str, ComponentConfig] = Field(default_factory=dict)
    default_encoder: ComponentConfig | None = Field(
        default_factory=lambda: ComponentConfig(name="mlp"),
        description="used for every modality not listed under encoders; null to require one per modality",
    )
    fusion: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="concat"))
    kind: str | None = Field(
        default=None,
        json_schema_extra=OMIT_FROM_FINGERPRINT_AT_DEFAULT,
        description="registered model architecture (late_fusion, mmtm); null: the one the method needs, "
        "else late_fusion",
    )
    kind_params: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of the model kind (e.g. mmtm: stages, ratio, gate_scale)",
        json_schema_extra=OMIT_FROM_FINGERPRINT_AT_DEFAULT,
    )
    init_encoders: dict[str, str] = Field(
        default_factory=dict,
        json_schema_extra=OMIT_FROM_FINGERPRINT_AT_DEFAULT,
        description="modality (name or 0-based position) -> an earlier unimodal run whose best encoder "
        "weights start this run's encoder: its checkpoint folder or best.pt, or its MLflow run id "
        "(runs:/<id> or <id>); checked against this run's data and split (harness/training/unimodal_runs.py)",
    )

    @field_validator("init_encoders", mode="before")
    @classmethod
    def _keys_and_sources_as_strings(cls, value: Any) -> Any:
        """A position may come as an int (``{0: ...}`` in YAML or Python), a folder as a ``Path``: both are
        stored as strings, so the resolved config and its fingerprint read the same after a JSON trip."""
        if not isinstance(value, dict):
            return value
        return {
            (str(k) if isinstance(k, int) and not isinstance(k, bool) else k): (
                os.fspath(v) if isinstance(v, os.PathLike) else v
            )
            for k, v in value.items()
        }


class OptimizerConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)


class SchedulerConfig(_Section):
    name: Literal["step", "cosine", "none"] = "step"
    step_size: int = Field(default=50, ge=1)
    gamma: float = Field(default=0.1, gt=0, le=1)


class TrainConfig(_Section):
    epochs: int = Field(default=70, ge=1)
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int = Field(default=512, ge=1)
    seed: int = Field(default=0, ge=0, description="init seed: weights, batch order, augmentation")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU")
    num_threads: int | None = Field(default=None, ge=1)
    deterministic: bool = True
    grad_clip: float | None = Field(default=None, gt=0)
    diagnostics: bool = Field(
        default=True, description="modality diagnostics on validation (each epoch) and test, every method"
    )
    diagnostics_seed: int = Field(
        default=0, ge=0, description="seed of the fixed misaligned evaluation pairing"
    )
    progress: bool | Literal["auto"] = Field(default="auto", description="progress bar; auto = on a terminal")
    checkpoint_dir: str | None = None
    resume: bool = True
    prefetch_batches: int = Field(
        default=2, ge=0, description="batches a background thread prepares ahead (0: in the training thread)"
    )


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(
        default=None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    experiment: str = "midasbench"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    flush_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="at the end of a run, how long to wait for an unreachable or saturated tracking store "
        "to take the run's journaled records before the run fails (they stay in its checkpoint folder and "
        "are sent by its next attempt)",
    )


class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: ComponentConfig = Field(default_factory=lambda: ComponentConfig(name="joint"))
    method_defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method parameter defaults for your own dataset, applied under method.params when "
        "method.name matches (the paper datasets' defaults live with each method: Method.dataset_defaults); "
        "not part of the fingerprint, whose method.params already hold the values that apply",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _validate_registry_entries(self) -> RunConfig:
        from midasbench.harness.registries import resolve_component_params

        resolve_component_params(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(
        self,
        exclude: tuple[str, ...] = (
            "tracking",
            "train.progress",
            "train.checkpoint_dir",
            "train.resume",
            "train.prefetch_batches",
            "method_defaults",
        ),
    ) -> str:
        """A short hash of everything that determines the run's numbers (not where it logs). Defaults meant
        for other methods do not enter it: the ones that apply are already in ``method.params``."""
        data = self.to_dict()
        _drop_late_defaults(self, data)
        for key in exclude:
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _drop_late_defaults(section: BaseModel, data: dict[str, Any]) -> None:
    """Remove, in place, every field marked ``OMIT_FROM_FINGERPRINT_AT_DEFAULT`` that holds its default."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel) and isinstance(data.get(name), dict):
            _drop_late_defaults(value, data[name])
        elif info.json_schema_extra == OMIT_FROM_FINGERPRINT_AT_DEFAULT and value == info.get_default(
            call_default_factory=True
        ):
            data.pop(name, None)


# --------------------------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    folder = resources.files("midasbench.harness") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("midasbench.harness") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset: unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return _load_yaml_text(path.read_text(), f"preset {name}")


def _load_yaml_text(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` wins; nested mappings merge key by key (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_presets(data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config may name ``preset: NAME``; the preset is merged underneath it (presets may chain)."""
    preset = data.pop("preset", None)
    if preset is None:
        return data
    if not isinstance(preset, str):
        raise ConfigError(f"{source}: key 'preset' must be a preset name, got {preset!r}")
    if preset in seen:
        raise ConfigError(f"{source}: presets form a cycle: {' -> '.join((*seen, preset))}")
    base = _resolve_presets(load_preset(preset), f"preset {preset}", (*seen, preset))
    return deep_merge(base, data)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value``; the value is parsed as YAML, so ``0.1``, ``true``, ``[1, 2]`` and ``null`` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-2" (no dot) as a string
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a value ({child!r}), not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from a YAML path or a preset name, apply presets and overrides, validate."""
    if config is None:
        data: dict[str, Any] = {}
        source = "defaults"
    else:
        path = Path(config)
        if path.is_file():
            data = _load_yaml_text(path.read_text(), str(path))
            source = str(path)
        elif path.suffix in {".yaml", ".yml"} or "/" in str(config):
            raise ConfigError(f"{config}: no such config file")
        else:
            data = {"preset": str(config)}
            source = f"preset {config}"
    data = _resolve_presets(data, source)
    # Overrides land on the full default tree, so `model.default_encoder.params.hidden=[64]` works even
    # where the file leaves that section to its default. Registry params stay unresolved here ({}), so
    # switching `method.name` never inherits another method's defaults.
    data = deep_merge(RunConfig.model_construct().model_dump(mode="json"), data)
    data = apply_overrides(data, overrides or [])
    if "preset" in data:
        raise ConfigError(f"{source}: 'preset' can only be set in a config file, not as an override")
    return build_config(data, source)
