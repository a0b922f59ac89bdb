"""``synthetic``: a controllable multimodal generator with ground-truth informativeness masks.

Design from datasets.md §7.C. Each modality m has a dimension ``dim``, a class separation ``separation``
(the norm of each class mean, against unit Gaussian noise), a fraction ``drop`` of samples whose modality
carries no class signal, a fraction ``flip`` carrying a wrong class's signal, and an optional fixed random
non-linear warp ``tanh(xW) + 0.1 x`` that slows learning. Corruption events are drawn independently per
modality, so fusion helps. The masks ``informative_<m>`` (modality m carries the true class) and
``only_<m>`` (m is the only informative modality) are stored as subsets, so the trainer reports accuracy
on the samples where, e.g., only the weak modality carries signal.

Modality imbalance comes from an easy, memorisable dominant modality (high separation and dimension): it
fits the training set first and starves the weak one (the default settings reproduce this).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .builders import BuilderOptions, DatasetBuilder, Pool, register_dataset
from .format import SplitArrays


class SyntheticModality(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    dim: int = Field(ge=1)
    separation: float = Field(ge=0)
    drop: float = Field(default=0.0, ge=0, le=1)
    flip: float = Field(default=0.0, ge=0, le=1)
    nonlinear: bool = False

    @model_validator(mode="after")
    def _fractions(self) -> SyntheticModality:
        if self.drop + self.flip > 1:
            raise ValueError(f"modality {self.name!r}: drop + flip = {self.drop + self.flip} > 1")
        return self


def _default_modalities() -> list[SyntheticModality]:
    return [
        SyntheticModality(name="strong", dim=256, separation=5.0, drop=0.25),
        SyntheticModality(name="weak", dim=16, separation=2.5, flip=0.1, nonlinear=True),
    ]


class SyntheticOptions(BuilderOptions):
    num_classes: int = Field(default=10, ge=2)
    modalities: list[SyntheticModality] = Field(default_factory=_default_modalities, min_length=2)
    train_size: int = Field(default=3000, ge=1)
    val_size: int = Field(default=1000, ge=1)
    test_size: int = Field(default=3000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _unique_names(self) -> SyntheticOptions:
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        return self


@register_dataset("synthetic")
class SyntheticBuilder(DatasetBuilder):
    version = "1"
    description = "Controllable synthetic multimodal classification with ground-truth informativeness masks."
    Options = SyntheticOptions

    def build_pool(self, options: SyntheticOptions) -> Pool:
        sizes = {"train": options.train_size, "val": options.val_size, "test": options.test_size}
        parts = [generate_split(options, split_id, size) for split_id, size in enumerate(sizes.values())]
        arrays = SplitArrays(
            ids=np.concatenate([p.ids for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            modalities={k: np.concatenate([p.modalities[k] for p in parts]) for k in parts[0].modalities},
            subsets={k: np.concatenate([p.subsets[k] for p in parts]) for k in parts[0].subsets},
        )
        official = np.concatenate([np.full(size, name) for name, size in sizes.items()])
        return Pool(
            classes=[f"class_{c}" for c in range(options.num_classes)],
            arrays=arrays,
            official_split=official,
            modality_kinds={m.name: "features" for m in options.modalities},
        )


def generate_split(options: SyntheticOptions, split_id: int, size: int) -> SplitArrays:
    """Draw one split. Class means and warps depend only on (seed, modality); noise on (seed, split)."""
    num_classes = options.num_classes
    rng = np.random.default_rng([options.seed, 1000 + split_id])
    labels = rng.integers(0, num_classes, size=size)
    modalities: dict[str, np.ndarray] = {}
    informative: dict[str, np.ndarray] = {}
    for m_index, spec in enumerate(options.modalities):
        fixed = np.random.default_rng([options.seed, m_index])
        means = fixed.standard_normal((num_classes, spec.dim))
        means *= spec.separation / np.linalg.norm(means, axis=1, keepdims=True)
        warp = fixed.standard_normal((spec.dim, spec.dim)) / np.sqrt(spec.dim) if spec.nonlinear else None

        event = rng.random(size)
        dropped = event < spec.drop
        flipped = (event >= spec.drop) & (event < spec.drop + spec.flip)
        shown = labels.copy()
        shown[flipped] = (
            labels[flipped] + rng.integers(1, num_classes, size=int(flipped.sum()))
        ) % num_classes
        signal = means[shown]
        signal[dropped] = 0.0
        x = signal + rng.standard_normal((size, spec.dim))
        if warp is not None:
            x = np.tanh(x @ warp) + 0.1 * x
        modalities[spec.name] = x.astype(np.float32)
        informative[spec.name] = ~(dropped | flipped)

    subsets = {f"informative_{k}": v for k, v in informative.items()}
    for name, mask in informative.items():
        others = [v for k, v in informative.items() if k != name]
        subsets[f"only_{name}"] = mask & ~np.any(others, axis=0)
    ids = np.array([f"s{split_id}-{i:06d}" for i in range(size)])
    return SplitArrays(ids=ids, labels=labels, modalities=modalities, subsets=subsets)
