"""Per-modality transforms, applied to whole batches on the training device (issue 9, item 3).

A config declares them per modality under ``data.transforms``; the training pipeline runs on training
batches, the eval pipeline on validation, test, feature extraction and every method's own passes::

    data:
      transforms:
        visual:                          # stored (3, 10, 256, 256) uint8: 10 frames a clip
          train:
            - {name: frames, params: {num: 3}}                  # a random frame in each of 3 segments
            - {name: random_resized_crop, params: {size: 224}}
            - {name: hflip}
          eval:
            - {name: frames, params: {num: 3, mode: center}}
            - {name: center_crop, params: {size: 224}}
          normalize: {preset: imagenet}  # after either list

Why on the device, in batch: the host sends the stored bytes (uint8 frames are a quarter of float32)
and the GPU crops, flips and normalises a batch in a few kernels instead of a Python loop per sample.

Random draws are a pure function of ``(seed, epoch, row, transform)``: ``row_uniforms`` hashes them
with splitmix64, so a row gets the same crop in an uninterrupted run, a resumed one and on whichever
rank of a data-parallel run holds it. They are computed on the host (a few floats a row, in the
prefetch thread) and sent with the batch. Eval draws use a fixed epoch, so a random transform in an
eval list is a fixed one.

Each transform states the per-sample shape and dtype it outputs (``output_spec``): the model is built
for what the pipeline delivers, and the train and eval pipelines of a modality must deliver the same.
Integer and uint8 inputs become float32 where a transform needs floats (uint8 as value / 255, as the
encoders read raw uint8), so ``normalize`` statistics are in [0, 1] units, like torchvision's.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from midasbench.harness.params import ComponentEntry, Params, component_decorator, parse_params
from midasbench.harness.registry import Registry

from .format import DatasetFormatError, ModalitySpec

TRANSFORMS: Registry[ComponentEntry] = Registry("transform")
EVAL_EPOCH = 2**31 - 1  # the epoch of eval draws: one fixed draw per row
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_transform(name: str, params: type[Params], description: str) -> Callable:
    """``@register_transform("hflip", HFlipParams, "...")`` on a ``Transform`` class built from its
    params (or any factory ``(params) -> Transform``)."""
    return component_decorator(TRANSFORMS, name, params, description)


class Transform(ABC):
    """One step of a modality's pipeline: a batch ``(B, *shape)`` in, a batch out, on its device.

    ``draws`` uniforms in [0, 1) per row arrive as ``u`` of shape ``(B, draws)`` (None when 0)."""

    draws: int = 0

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        """The per-sample spec this transform outputs for input ``spec``; ``where`` names it in errors."""
        return spec

    @abstractmethod
    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea, Flood 2014), elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(seed: int, epoch: int, rows: np.ndarray, stream: int, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) per row, float32 ``(len(rows), count)``: a counter-based hash of
    (seed, epoch, stream, row, j), so any row's draws are the same however batches are cut or sharded."""
    key = np.array([seed], dtype=np.uint64)
    for part in (epoch, stream):
        key = _splitmix64(key ^ np.uint64(part))
    per_row = _splitmix64(key ^ np.asarray(rows, dtype=np.int64).astype(np.uint64))
    bits = _splitmix64(per_row[:, None] ^ np.arange(1, count + 1, dtype=np.uint64)[None, :])
    return ((bits >> np.uint64(40)).astype(np.float32) / np.float32(2**24)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def as_float(x: torch.Tensor) -> torch.Tensor:
    """float32 values: uint8 as value / 255 (the encoders' reading of raw pixels), other types cast."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x if x.dtype == torch.float32 else x.float()


def _float_spec(spec: ModalitySpec, shape: Sequence[int] | None = None) -> ModalitySpec:
    return spec.model_copy(
        update={"dtype": "float32", "shape": tuple(shape if shape is not None else spec.shape)}
    )


def _need_axes(spec: ModalitySpec, count: int, where: str, what: str) -> None:
    if len(spec.shape) < count:
        raise DatasetFormatError(
            f"{where}: {what} needs samples with at least {count} axes, got {spec.shape}"
        )


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


Size = PositiveInt | tuple[PositiveInt, PositiveInt]


# ---------------------------------------------------------------------------------------------------------
# frames: one frame per segment (TSN-style sampling of stored frames)
# ---------------------------------------------------------------------------------------------------------


class FramesParams(Params):
    num: PositiveInt = Field(description="frames kept: one per equal segment of the stored frames")
    axis: int = Field(default=1, ge=0, description="the frame axis of a sample, e.g. 1 for (C, T, H, W)")
    mode: Literal["random", "center"] = Field(
        default="random", description="random: a random frame of each segment; center: its middle frame"
    )


@register_transform(
    "frames", FramesParams, "keep one frame per segment (random in training, middle for eval)"
)
class Frames(Transform):
    """Cut the ``T`` stored frames into ``num`` equal segments and keep one frame of each: a random one
    in training, the middle one for evaluation (TSN's sampling; the paper's video models see a few
    frames per clip)."""

    def __init__(self, params: FramesParams) -> None:
        self.p = params
        self.draws = params.num if params.mode == "random" else 0

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        _need_axes(spec, self.p.axis + 1, where, "frames")
        total = spec.shape[self.p.axis]
        if self.p.num > total:
            raise DatasetFormatError(f"{where}: frames.num={self.p.num} but samples hold {total} frames")
        shape = list(spec.shape)
        shape[self.p.axis] = self.p.num
        return spec.model_copy(update={"shape": tuple(shape)})

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        axis, num = self.p.axis + 1, self.p.num
        total = x.shape[axis]
        starts = torch.arange(num, device=x.device, dtype=torch.float32) * (total / num)
        width = total / num
        offset = u * width if u is not None else torch.full((x.shape[0], num), width / 2, device=x.device)
        index = (starts[None, :] + offset).floor().long().clamp_(max=total - 1)  # (B, num)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[axis] = num
        return torch.take_along_dim(x, index.view(shape), dim=axis)


# ---------------------------------------------------------------------------------------------------------
# random_resized_crop, center_crop, resize, hflip: the last two axes are (H, W)
# ---------------------------------------------------------------------------------------------------------


class RandomResizedCropParams(Params):
    size: Size = Field(description="output (H, W), or one int for a square")
    scale: tuple[float, float] = Field(default=(0.08, 1.0), description="crop area as a share of the image")
    ratio: tuple[float, float] = Field(default=(3 / 4, 4 / 3), description="crop aspect ratio W/H range")

    @model_validator(mode="after")
    def _ranges(self) -> RandomResizedCropParams:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        return self


def _fold_planes(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(B, *lead, H, W)`` as ``(B, prod(lead), H, W)`` float32 (frames and channels share one crop)."""
    lead = tuple(x.shape[1:-2])
    return as_float(x).reshape(x.shape[0], math.prod(lead), *x.shape[-2:]), lead


@register_transform(
    "random_resized_crop", RandomResizedCropParams, "random area/aspect crop resized to size (last two axes)"
)
class RandomResizedCrop(Transform):
    """torchvision's RandomResizedCrop in batch: per row an area share s ~ U(scale) and a log aspect
    ratio ~ U(log ratio) give a box of w = √(s·H·W·r), h = √(s·H·W/r), placed uniformly, then resized
    to ``size`` with ``torchvision.ops.roi_align`` (bilinear, averaging ⌈box/size⌉² samples a pixel, so
    downscaling is anti-aliased). Departure: a box wider or taller than the image is clipped to it
    instead of torchvision's 10 rejection tries and centre-crop fallback, and boxes are not rounded to
    whole pixels; both keep the draws a fixed 4 uniforms a row."""

    draws = 4

    def __init__(self, params: RandomResizedCropParams) -> None:
        self.p = params
        self.size = _size_pair(params.size)

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        _need_axes(spec, 2, where, "random_resized_crop")
        return _float_spec(spec, (*spec.shape[:-2], *self.size))

    def boxes(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 4) boxes x1, y1, x2, y2 in pixel coordinates from the rows' 4 uniforms."""
        lo, hi = self.p.scale
        area = (lo + u[:, 0] * (hi - lo)) * (height * width)
        log_lo, log_hi = math.log(self.p.ratio[0]), math.log(self.p.ratio[1])
        ratio = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
        w = torch.sqrt(area * ratio).clamp(max=width)
        h = torch.sqrt(area / ratio).clamp(max=height)
        x1 = u[:, 2] * (width - w)
        y1 = u[:, 3] * (height - h)
        return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        from torchvision.ops import roi_align

        assert u is not None
        planes, lead = _fold_planes(x)
        boxes = self.boxes(u.float(), planes.shape[-2], planes.shape[-1])
        rois = torch.cat([torch.arange(len(x), device=x.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
        out = roi_align(
            planes, rois, output_size=self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
        return out.reshape(x.shape[0], *lead, *self.size)


class SizeParams(Params):
    size: Size = Field(description="output (H, W), or one int for a square")


@register_transform("center_crop", SizeParams, "the central size window of the last two axes")
class CenterCrop(Transform):
    """The central ``size`` window of the last two axes (the eval counterpart of a random crop)."""

    def __init__(self, params: SizeParams) -> None:
        self.size = _size_pair(params.size)

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        _need_axes(spec, 2, where, "center_crop")
        if self.size[0] > spec.shape[-2] or self.size[1] > spec.shape[-1]:
            raise DatasetFormatError(
                f"{where}: center_crop size {self.size} is larger than {spec.shape[-2:]}"
            )
        return spec.model_copy(update={"shape": (*spec.shape[:-2], *self.size)})

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        (h, w), (height, width) = self.size, x.shape[-2:]
        top, left = (height - h) // 2, (width - w) // 2
        return x[..., top : top + h, left : left + w]


@register_transform("resize", SizeParams, "bilinear, anti-aliased resize of the last two axes")
class Resize(Transform):
    """Bilinear resize of the last two axes to ``size``, anti-aliased (the MIDAS code's eval transform
    for frames is a plain resize to 224 × 224)."""

    def __init__(self, params: SizeParams) -> None:
        self.size = _size_pair(params.size)

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        _need_axes(spec, 2, where, "resize")
        return _float_spec(spec, (*spec.shape[:-2], *self.size))

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        planes, lead = _fold_planes(x)
        out = F.interpolate(planes, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return out.reshape(x.shape[0], *lead, *self.size)


class HFlipParams(Params):
    p: float = Field(default=0.5, ge=0.0, le=1.0, description="probability of flipping a row")


@register_transform("hflip", HFlipParams, "mirror the last axis with probability p")
class HFlip(Transform):
    """Mirror the last axis of a row with probability ``p`` (one draw a row)."""

    draws = 1

    def __init__(self, params: HFlipParams) -> None:
        self.p = params.p

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        assert u is not None
        flip = (u[:, 0] < self.p).view(-1, *[1] * (x.ndim - 1))
        return torch.where(flip, x.flip(-1), x)


class RotationParams(Params):
    degrees: float = Field(
        default=30.0, gt=0, le=180, description="angles are drawn from U(-degrees, degrees)"
    )
    fill: float = Field(default=0.0, description="value of the pixels rotated in from outside")
    interpolation: Literal["nearest", "bilinear"] = Field(
        default="nearest", description="nearest: torchvision's RandomRotation default"
    )


@register_transform("random_rotation", RotationParams, "rotate by U(-degrees, degrees) about the centre")
class RandomRotation(Transform):
    """torchvision's RandomRotation in batch: per row an angle a = (2u − 1)·degrees, the image rotated
    about its centre (counter-clockwise for a > 0, as torchvision), nearest (torchvision's default) or
    bilinear, with ``fill`` outside.
    One ``affine_grid`` a row, shared by its channels and frames; the grid is in normalised coordinates,
    so the H/W ratios keep the rotation rigid on non-square images. Food-101's training transform in
    the MIDAS and BalanceBenchmark code (RandomRotation(30))."""

    draws = 1

    def __init__(self, params: RotationParams) -> None:
        self.p = params

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        _need_axes(spec, 2, where, "random_rotation")
        return _float_spec(spec)

    def theta(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 2, 3) affine matrices: each output pixel samples the input rotated back by its angle."""
        angle = torch.deg2rad((2 * u[:, 0].double() - 1) * self.p.degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        zero = torch.zeros_like(cos)
        rows = [
            torch.stack([cos, -sin * height / width, zero], dim=1),
            torch.stack([sin * width / height, cos, zero], dim=1),
        ]
        return torch.stack(rows, dim=1).float()

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        assert u is not None
        planes, _ = _fold_planes(x)
        theta = self.theta(u, planes.shape[-2], planes.shape[-1]).to(planes.device)
        grid = F.affine_grid(theta, list(planes.shape), align_corners=False)
        shifted = planes - self.p.fill  # zeros padding, then back: ``fill`` outside the image
        out = F.grid_sample(shifted, grid, self.p.interpolation, padding_mode="zeros", align_corners=False)
        return (out + self.p.fill).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------
# spec_mask: SpecAugment's time and frequency masking
# ---------------------------------------------------------------------------------------------------------


class SpecMaskParams(Params):
    time_masks: int = Field(default=2, ge=0)
    time_width: int = Field(default=20, ge=0, description="largest width of a time mask, in frames")
    freq_masks: int = Field(default=2, ge=0)
    freq_width: int = Field(default=10, ge=0, description="largest width of a frequency mask, in bins")
    time_axis: Literal[-2, -1] = Field(default=-2, description="-2 for (frames, bins), Kaldi's layout")
    value: float = Field(default=0.0, description="what masked cells are set to")


@register_transform("spec_mask", SpecMaskParams, "SpecAugment time and frequency masking")
class SpecMask(Transform):
    """SpecAugment's masking (Park et al. 2019): per row, ``time_masks`` bands of width ~ U{0..time_width}
    frames and ``freq_masks`` of width ~ U{0..freq_width} bins, each at a uniform start, set to ``value``
    (two draws a band)."""

    def __init__(self, params: SpecMaskParams) -> None:
        self.p = params
        self.draws = 2 * (params.time_masks + params.freq_masks)

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        _need_axes(spec, 2, where, "spec_mask")
        return _float_spec(spec)

    def _bands(self, u: torch.Tensor, size: int, count: int, max_width: int) -> torch.Tensor:
        """(B, size) True inside any of ``count`` bands drawn from ``u`` (B, 2·count)."""
        positions = torch.arange(size, device=u.device)
        hit = torch.zeros(u.shape[0], size, dtype=torch.bool, device=u.device)
        for k in range(count):
            width = (u[:, 2 * k] * (min(max_width, size) + 1)).floor().long()
            start = (u[:, 2 * k + 1] * (size - width + 1)).floor().long()
            hit |= (positions[None, :] >= start[:, None]) & (positions[None, :] < (start + width)[:, None])
        return hit

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        assert u is not None
        x = as_float(x)
        t_axis, f_axis = (x.ndim - 2, x.ndim - 1) if self.p.time_axis == -2 else (x.ndim - 1, x.ndim - 2)
        split = 2 * self.p.time_masks
        time = self._bands(u[:, :split], x.shape[t_axis], self.p.time_masks, self.p.time_width)
        freq = self._bands(u[:, split:], x.shape[f_axis], self.p.freq_masks, self.p.freq_width)
        shape_t = [x.shape[0]] + [1] * (x.ndim - 1)
        shape_f = list(shape_t)
        shape_t[t_axis], shape_f[f_axis] = x.shape[t_axis], x.shape[f_axis]
        masked = time.view(shape_t) | freq.view(shape_f)
        return x.masked_fill(masked, self.p.value)


# ---------------------------------------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------------------------------------


class NormalizeParams(Params):
    mean: list[float] | None = Field(default=None, description="per channel (or one value for all)")
    std: list[float] | None = Field(default=None, description="per channel (or one value for all)")
    preset: Literal["imagenet"] | None = Field(
        default=None, description="imagenet: torchvision's mean/std of pretrained ImageNet weights"
    )
    channel_axis: int = Field(default=0, ge=0, description="the channel axis of a sample")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, values: Any) -> Any:
        """``preset: imagenet`` becomes its mean and std, so the run records the numbers it used."""
        if isinstance(values, dict) and values.get("preset") == "imagenet":
            if values.get("mean") is not None or values.get("std") is not None:
                raise ValueError("give either preset or mean and std, not both")
            values = {**values, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "preset": None}
        return values

    @model_validator(mode="after")
    def _statistics(self) -> NormalizeParams:
        if self.mean is None or self.std is None or len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("mean and std must be given, of the same non-zero length (or preset: imagenet)")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        return self


@register_transform("normalize", NormalizeParams, "per-channel (x - mean) / std (preset: imagenet)")
class Normalize(Transform):
    """``(x − mean_c) / std_c`` per channel, in float32 (uint8 read as value / 255 first)."""

    def __init__(self, params: NormalizeParams) -> None:
        self.p = params

    def output_spec(self, spec: ModalitySpec, where: str) -> ModalitySpec:
        count = len(self.p.mean or [])
        if count > 1:
            _need_axes(spec, self.p.channel_axis + 1, where, "normalize")
            channels = spec.shape[self.p.channel_axis]
            if channels != count:
                raise DatasetFormatError(
                    f"{where}: normalize has {count} means for {channels} channels (axis "
                    f"{self.p.channel_axis} of {spec.shape})"
                )
        return _float_spec(spec)

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        x = as_float(x)
        shape = [1] * x.ndim
        if len(self.p.mean or []) > 1:
            shape[self.p.channel_axis + 1] = -1
        mean = torch.tensor(self.p.mean, device=x.device).view(shape)
        std = torch.tensor(self.p.std, device=x.device).view(shape)
        return (x - mean) / std


# ---------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A built transform, its name and its stream (which keys its draws)."""

    name: str
    transform: Transform
    stream: int


def _build_steps(modality: str, phase: str, components: Sequence[Mapping[str, Any]]) -> tuple[Step, ...]:
    steps = []
    for position, component in enumerate(components):
        key = f"data.transforms.{modality}.{phase}[{position}]"
        name = str(component["name"])
        params = parse_params(TRANSFORMS.get(name).params, component.get("params"), f"{key}.params")
        stream = zlib.crc32(f"{modality}/{phase}/{position}/{name}".encode())
        steps.append(Step(name, TRANSFORMS.get(name).factory(params), stream))
    return tuple(steps)


def _cast_spec(spec: ModalitySpec) -> ModalitySpec:
    """Half and double precision reach the model as float32 (cast on the device, after the copy)."""
    return _float_spec(spec) if spec.dtype in ("float16", "float64") else spec


class ModalityPipelines:
    """Every modality's train and eval transforms, checked against the dataset's stored specs.

    ``config`` maps a modality to ``{"train": [...], "eval": [...], "normalize": {...}}`` (components
    ``{"name", "params"}``), as ``data.transforms`` holds it; a modality it does not name passes as
    stored (float16 made float32 on the device)."""

    def __init__(self, config: Mapping[str, Mapping[str, Any]], specs: Mapping[str, ModalitySpec]) -> None:
        unknown = sorted(set(config) - set(specs))
        if unknown:
            raise DatasetFormatError(
                f"data.transforms: {unknown} are not modalities of the dataset (it has {list(specs)})"
            )
        self.stored = dict(specs)
        self.steps: dict[str, dict[str, tuple[Step, ...]]] = {}
        for modality, entry in config.items():
            tail = [{"name": "normalize", "params": entry["normalize"]}] if entry.get("normalize") else []
            self.steps[modality] = {
                phase: _build_steps(modality, phase, [*entry.get(phase, []), *tail])
                for phase in ("train", "eval")
            }
        self.specs = {m: self._output_spec(m) for m in specs}

    def _output_spec(self, modality: str) -> ModalitySpec:
        """What the model sees of ``modality``: the same from the train and the eval pipeline."""
        stored = self.stored[modality]
        if modality not in self.steps:
            return _cast_spec(stored)
        out = {}
        for phase, steps in self.steps[modality].items():
            spec = stored
            for position, step in enumerate(steps):
                spec = step.transform.output_spec(spec, f"data.transforms.{modality}.{phase}[{position}]")
            out[phase] = _cast_spec(spec)
        if (out["train"].shape, out["train"].dtype) != (out["eval"].shape, out["eval"].dtype):
            raise DatasetFormatError(
                f"data.transforms.{modality}: train gives samples of {out['train'].shape} "
                f"{out['train'].dtype}, eval {out['eval'].shape} {out['eval'].dtype}; they must match "
                "(the same model reads both)"
            )
        if stored.variable_length and out["train"].shape[0] != stored.shape[0]:
            raise DatasetFormatError(
                f"data.transforms.{modality}: the sequence axis of a variable-length modality cannot change"
            )
        return out["train"]

    def draws(self, rows: np.ndarray, seed: int, epoch: int | None) -> dict[str, np.ndarray]:
        """Per modality, the uniforms its pipeline's random steps need for ``rows``, concatenated in step
        order, float32 ``(B, total)``; ``epoch=None`` for the eval pipeline."""
        phase, epoch_key = ("eval", EVAL_EPOCH) if epoch is None else ("train", epoch)
        out = {}
        for modality, phases in self.steps.items():
            parts = [row_uniforms(seed, epoch_key, rows, s.stream, s.transform.draws) for s in phases[phase]]
            parts = [p for p in parts if p.shape[1]]
            if parts:
                out[modality] = np.concatenate(parts, axis=1)
        return out

    def apply(
        self, inputs: Mapping[str, torch.Tensor], draws: Mapping[str, torch.Tensor], train: bool
    ) -> dict[str, torch.Tensor]:
        """The transformed tensors (the stored ones cast where no transform is declared)."""
        phase = "train" if train else "eval"
        out = {}
        for modality, x in inputs.items():
            u_all, offset = draws.get(modality), 0
            for step in self.steps.get(modality, {}).get(phase, ()):
                u = None
                if step.transform.draws:
                    assert u_all is not None
                    u = u_all[:, offset : offset + step.transform.draws]
                    offset += step.transform.draws
                x = step.transform(x, u)
            out[modality] = x.float() if x.dtype in (torch.float16, torch.float64) else x
        return out

    def describe(self) -> dict[str, dict[str, list[str]]]:
        """Each modality's step names per phase (for logs and the README's examples)."""
        return {
            m: {phase: [s.name for s in steps] for phase, steps in p.items()} for m, p in self.steps.items()
        }
