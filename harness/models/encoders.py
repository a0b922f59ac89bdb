"""Encoder registry: one factory per encoder family, looked up by name from the config.

A factory takes the per-sample input shape and dtype of its modality (from the dataset manifest) and its
validated ``Params``, and returns an ``nn.Module`` mapping a batch ``(B, *input_shape)`` to features
``(B, out_dim)``; the module exposes ``out_dim`` so fusion heads can be sized without a dry run. Encoders a
mid-fusion model can run stage by stage (``mlp``, ``resnet18``) also expose ``stages()`` (``EncoderStages``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from midasbench.harness.errors import ConfigError
from midasbench.harness.params import ComponentEntry, Params, component_decorator, parse_params
from midasbench.harness.registry import Registry

ENCODERS: Registry[ComponentEntry] = Registry("encoder")


def register_encoder(name: str, params: type[Params], description: str) -> Callable:
    """Decorator for a factory ``(input_shape, input_dtype, params) -> nn.Module`` with ``out_dim``."""
    return component_decorator(ENCODERS, name, params, description)


def build_encoder(
    name: str, input_shape: tuple[int, ...], input_dtype: str, params: dict[str, Any] | None, key: str = ""
) -> nn.Module:
    """Validate ``params`` against the encoder's schema and build it; ``key`` prefixes error messages."""
    entry = ENCODERS.get(name)
    parsed = parse_params(entry.params, params, key)
    module = entry.factory(tuple(input_shape), input_dtype, parsed)
    if not isinstance(getattr(module, "out_dim", None), int):
        raise TypeError(f"encoder {name!r} did not set an integer out_dim")
    return module


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def _to_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Make raw manifest tensors usable by float layers: uint8 pixels become [0, 1], other ints plain floats.

    Floating inputs are left alone so that autocast / half-precision setups chosen by the caller still apply.
    """
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255.0
    if not x.is_floating_point():
        return x.to(dtype)
    return x


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size)`` True at each row's first ``lengths[b]`` positions (its valid frames or tokens)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths.to(torch.long)[:, None]


@dataclass(frozen=True)
class EncoderStages:
    """An encoder cut into the stages a mid-fusion model (``model.kind: mmtm``) works between.

    ``prepare`` turns the raw batch ``(B, *input_shape)`` into the first stage's input; stage ``k`` maps a
    tensor ``(B·T, C, *spatial)`` to one with ``channels[k]`` channels in the same layout (T frames per
    sample folded into the batch, sample-major: T = 1 except for video; no spatial axes for an MLP);
    ``finish(h, B)`` pools the last stage's output into the features ``(B, out_dim)``. Running
    ``prepare``, every stage and ``finish`` in order is ``forward`` bit for bit.
    """

    prepare: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    channels: tuple[int, ...]
    finish: Callable[[torch.Tensor, int], torch.Tensor]


def encoder_stages(encoder: nn.Module) -> EncoderStages | None:
    """The encoder's stages, or None for an encoder without the stage interface (a ``stages()`` method)."""
    stages = getattr(encoder, "stages", None)
    return stages() if callable(stages) else None


# ---------------------------------------------------------------------------------------------------------
# mlp
# ---------------------------------------------------------------------------------------------------------


class MLPParams(Params):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128])
    out_dim: PositiveInt = 128
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu"] = "relu"
    input_batchnorm: bool = Field(
        default=False, description="standardise raw inputs (e.g. unnormalised log-mels) with BatchNorm"
    )
    lr_scale: float = Field(
        default=1.0, gt=0, description="this encoder's lr as a multiple of the optimiser's"
    )


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLPEncoder(nn.Module):
    """Flatten each sample and apply ``Linear → act (→ dropout)`` per hidden layer, then ``Linear → act``.

    The last layer is activated too: the output is a feature vector for a fusion head, not logits.
    """

    def __init__(self, input_shape: tuple[int, ...], params: MLPParams) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        act = _ACTIVATIONS[params.activation]
        layers: list[nn.Module] = [nn.BatchNorm1d(in_features)] if params.input_batchnorm else []
        for width in params.hidden:
            layers += [nn.Linear(in_features, width), act()]
            if params.dropout > 0:
                layers.append(nn.Dropout(params.dropout))
            in_features = width
        layers += [nn.Linear(in_features, params.out_dim), act()]
        self.net = nn.Sequential(*layers)
        self.out_dim: int = params.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_float(x, _param_dtype(self))
        return self.net(x.flatten(start_dim=1))

    def stages(self) -> EncoderStages:
        """One stage per ``Linear → act (→ dropout)`` block (hidden layers, then the output layer); the
        input BatchNorm, if any, is part of ``prepare``."""
        layers = list(self.net)
        norm = layers.pop(0) if isinstance(layers[0], nn.BatchNorm1d) else None
        blocks: list[list[nn.Module]] = []
        for layer in layers:
            if isinstance(layer, nn.Linear):
                blocks.append([])
            blocks[-1].append(layer)

        def prepare(x: torch.Tensor) -> torch.Tensor:
            x = _to_float(x, _param_dtype(self)).flatten(start_dim=1)
            return norm(x) if norm is not None else x

        return EncoderStages(
            prepare=prepare,
            modules=tuple(nn.Sequential(*block) for block in blocks),
            channels=tuple(int(block[0].out_features) for block in blocks),
            finish=lambda h, batch_size: h,
        )


@register_encoder("mlp", params=MLPParams, description="Flatten + MLP for tabular / pre-extracted features.")
def build_mlp(input_shape: tuple[int, ...], input_dtype: str, params: MLPParams) -> nn.Module:
    if not input_shape or math.prod(input_shape) == 0:
        raise ConfigError(f"mlp encoder needs a non-empty per-sample input shape, got {input_shape}")
    encoder = MLPEncoder(input_shape, params)
    encoder.lr_scale = params.lr_scale
    return encoder


# ---------------------------------------------------------------------------------------------------------
# identity (the frozen-feature track)
# ---------------------------------------------------------------------------------------------------------


class IdentityEncoder(nn.Module):
    """Stored features as they are (flattened, float): for datasets of precomputed embeddings
    (``midasbench data extract``), where only the heads train."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_dim = math.prod(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)
        return x if x.is_floating_point() else x.float()


@register_encoder(
    "identity", params=Params, description="No parameters: stored features as they are (the frozen track)."
)
def build_identity(input_shape: tuple[int, ...], input_dtype: str, params: Params) -> nn.Module:
    if not input_shape or math.prod(input_shape) == 0:
        raise ConfigError(f"identity encoder needs a non-empty per-sample input shape, got {input_shape}")
    return IdentityEncoder(input_shape)


# ---------------------------------------------------------------------------------------------------------
# resnet18
# ---------------------------------------------------------------------------------------------------------


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet weights' inputs


class ResNet18Params(Params):
    pretrained: Literal["imagenet"] | None = Field(
        default=None,
        description="imagenet: torchvision's ImageNet weights (downloaded once by torchvision into "
        "$TORCH_HOME; offline, give pretrained_path instead)",
    )
    pretrained_path: str | None = Field(default=None, description="a local torchvision-format state_dict")
    zero_init_residual: bool = False
    freeze: bool = Field(default=False, description="no gradient, BatchNorm in eval mode: a fixed extractor")
    project_to: PositiveInt | None = Field(
        default=None, description="a Linear from the 512-d pooled features to this width (Food-101: 256)"
    )
    lr_scale: float = Field(
        default=1.0,
        gt=0,
        description="this encoder's lr as a multiple of the optimiser's (e.g. 0.1 when pretrained)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ResNet18Params:
        if self.pretrained is not None and self.pretrained_path is not None:
            raise ValueError("set pretrained or pretrained_path, not both")
        return self


class ResNet18Encoder(nn.Module):
    """torchvision ResNet-18 trunk for images (C, H, W), spectrograms (H, W) and videos (C, T, H, W).

    The trunk's modules sit directly on this module under torchvision's names (``conv1``, ``layer1``, ...)
    so a torchvision state_dict loads without renaming; ``avgpool``/``fc`` are dropped (pooling is done
    here so that video can pool over time as well).
    """

    def __init__(
        self, in_channels: int, video: bool, add_channel_axis: bool, zero_init_residual: bool
    ) -> None:
        super().__init__()
        import torchvision  # here, not at import: validating a config must not pull in torchvision

        trunk = torchvision.models.resnet18(weights=None, zero_init_residual=zero_init_residual)
        if in_channels != 3:
            trunk.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            # Same init torchvision gives its own conv layers.
            nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1 = trunk.conv1
        self.bn1 = trunk.bn1
        self.relu = trunk.relu
        self.maxpool = trunk.maxpool
        self.layer1 = trunk.layer1
        self.layer2 = trunk.layer2
        self.layer3 = trunk.layer3
        self.layer4 = trunk.layer4
        self.in_channels = in_channels
        self.video = video
        self.add_channel_axis = add_channel_axis
        self.out_dim = 512
        self.projection: nn.Module | None = None
        self.freeze = False
        self.lr_scale = 1.0
        self.pretrained_source: str | None = None  # what the weights came from (recorded with the run)
        self.expected_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def set_head(self, project_to: int | None, freeze: bool, lr_scale: float) -> None:
        """The optional projection, the freezing and the lr multiple (``ResNet18Params``); frozen means
        the trunk gets no gradient and keeps BatchNorm in eval mode (the projection still trains)."""
        self.freeze, self.lr_scale = freeze, lr_scale
        if freeze:
            self.requires_grad_(False)
        if project_to is not None:
            self.projection = nn.Linear(512, project_to)
            self.out_dim = project_to

    def train(self, mode: bool = True) -> ResNet18Encoder:
        super().train(mode)
        if self.freeze:  # the trunk's running statistics stay those of its weights
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled) if self.projection is not None else pooled

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_float(x, _param_dtype(self))
        if self.add_channel_axis:
            x = x.unsqueeze(1)
        if not self.video:
            return self._project(F.adaptive_avg_pool2d(self._trunk(x), 1).flatten(1))
        b, c, t, h, w = x.shape
        # Fold frames into the batch for the 2-D trunk, then pool jointly over time and space.
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        feats = self._trunk(frames)
        feats = feats.reshape(b, t, *feats.shape[1:]).permute(0, 2, 1, 3, 4)
        return self._project(F.adaptive_avg_pool3d(feats, 1).flatten(1))

    def stages(self) -> EncoderStages:
        """Four stages: stem + ``layer1`` (64 channels), ``layer2`` (128), ``layer3`` (256), ``layer4``
        (512); video frames go through the 2-D trunk folded into the batch, as in ``forward``."""
        return EncoderStages(
            prepare=self._stage_input,
            modules=(self._stem_and_layer1, self.layer2, self.layer3, self.layer4),
            channels=(64, 128, 256, 512),
            finish=self._stage_output,
        )

    def _stage_input(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_float(x, _param_dtype(self))
        if self.add_channel_axis:
            x = x.unsqueeze(1)
        if not self.video:
            return x
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)

    def _stem_and_layer1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def _stage_output(self, feats: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not self.video:
            return self._project(F.adaptive_avg_pool2d(feats, 1).flatten(1))
        t = feats.shape[0] // batch_size
        feats = feats.reshape(batch_size, t, *feats.shape[1:]).permute(0, 2, 1, 3, 4)
        return self._project(F.adaptive_avg_pool3d(feats, 1).flatten(1))

    def load_imagenet_weights(self) -> None:
        """torchvision's ImageNet ResNet-18 weights (``IMAGENET1K_V1``), fetched by torchvision on first
        use; offline, a message says how to give a local copy instead."""
        import torchvision

        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # URLError, OSError, HTTP errors: no internet or no cache
            raise ConfigError(
                f"resnet18 pretrained=imagenet: torchvision could not fetch {weights.url} ({exc}); on a "
                'machine with internet run `python -c "import torchvision; torchvision.models.resnet18('
                "weights='IMAGENET1K_V1')\"` once (it caches under $TORCH_HOME), or download the file and "
                "set pretrained_path to it"
            ) from exc
        self._load_trunk_state(state, f"resnet18 pretrained=imagenet ({weights.url})")
        self.pretrained_source = f"torchvision:{weights}"
        self.expected_normalization = IMAGENET_STATS

    def load_torchvision_state_dict(self, path: str) -> None:
        """Load a local torchvision-format ResNet-18 state dict, skipping ``fc`` and a mismatched ``conv1``.

        Missing trunk weights are an error rather than a silent partial load: a wrongly prefixed checkpoint
        would otherwise leave the encoder randomly initialised without anyone noticing.
        """
        file = Path(path)
        where = f"resnet18 pretrained_path {str(file)!r}"
        if not file.is_file():
            raise ConfigError(f"{where} does not exist or is not a file")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"{where} could not be loaded: {exc}") from exc
        self._load_trunk_state(state, where)
        self.pretrained_source = f"file:{file.resolve()}"
        self.expected_normalization = IMAGENET_STATS  # torchvision-format weights are ImageNet-trained

    def _load_trunk_state(self, state: Any, where: str) -> None:
        """The trunk's weights from a torchvision-format state dict (``fc`` and a conv1 of another
        channel count are skipped; any other missing weight is an error)."""
        if not isinstance(state, Mapping):
            raise ConfigError(f"{where} must hold a state_dict, got {type(state).__name__}")
        metadata = getattr(state, "_metadata", None)  # module versions, used e.g. by BatchNorm's loader
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))
        if metadata is not None:
            state._metadata = metadata  # type: ignore[attr-defined]
        skipped: set[str] = set()
        conv1 = state.get("conv1.weight")
        if conv1 is not None and tuple(conv1.shape) != tuple(self.conv1.weight.shape):
            del state["conv1.weight"]
            skipped.add("conv1.weight")
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ConfigError(f"{where} does not fit ResNet-18: {exc}") from exc
        ignorable = skipped | {k for k in result.missing_keys if k.endswith("num_batches_tracked")}
        missing = [k for k in result.missing_keys if k not in ignorable]
        if missing:
            raise ConfigError(
                f"{where} lacks {len(missing)} ResNet-18 weights "
                f"(e.g. {', '.join(missing[:5])}); expected torchvision parameter names"
            )
        if result.unexpected_keys:
            warnings.warn(
                f"{where}: ignored unexpected keys {', '.join(result.unexpected_keys[:5])}",
                stacklevel=2,
            )


@register_encoder(
    "resnet18",
    params=ResNet18Params,
    description="torchvision ResNet-18 trunk (1-3 channels) for images, spectrograms and videos; 512-d.",
)
def build_resnet18(input_shape: tuple[int, ...], input_dtype: str, params: ResNet18Params) -> nn.Module:
    if len(input_shape) == 2:
        in_channels, video, add_channel_axis = 1, False, True
    elif len(input_shape) == 3:
        in_channels, video, add_channel_axis = input_shape[0], False, False
    elif len(input_shape) == 4:
        in_channels, video, add_channel_axis = input_shape[0], True, False
    else:
        raise ConfigError(
            f"resnet18 encoder expects input shape (H, W), (C, H, W) or (C, T, H, W), got {input_shape}"
        )
    if in_channels not in (1, 2, 3):
        raise ConfigError(
            f"resnet18 encoder supports 1-3 input channels, got {in_channels} from input shape {input_shape}"
        )
    encoder = ResNet18Encoder(in_channels, video, add_channel_axis, params.zero_init_residual)
    if params.pretrained == "imagenet":
        encoder.load_imagenet_weights()
    elif params.pretrained_path is not None:
        encoder.load_torchvision_state_dict(params.pretrained_path)
    encoder.set_head(params.project_to, params.freeze, params.lr_scale)
    return encoder


# ---------------------------------------------------------------------------------------------------------
# transformer
# ---------------------------------------------------------------------------------------------------------


class TransformerParams(Params):
    d_model: PositiveInt = 64
    nhead: PositiveInt = 4
    num_layers: PositiveInt = 2
    dim_feedforward: PositiveInt = 128
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    lr_scale: float = Field(
        default=1.0, gt=0, description="this encoder's lr as a multiple of the optimiser's"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerParams:
        if self.d_model % self.nhead:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        return self


class SequenceTransformerEncoder(nn.Module):
    """Transformer over a feature sequence ``(T, D)`` with masked mean pooling.

    With ``lengths`` (a variable-length modality: batches trimmed to their longest row), frames past a
    row's length are padding: excluded as attention keys and from the mean, so a sample's features do
    not depend on how much padding follows it. Without, every frame counts: values are never guessed to
    be padding (real features can be exactly zero).
    """

    takes_lengths = True

    def __init__(self, seq_len: int, feat_dim: int, params: TransformerParams) -> None:
        super().__init__()
        self.input_proj = nn.Linear(feat_dim, params.d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, seq_len, params.d_model))
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=params.d_model,
            nhead=params.nhead,
            dim_feedforward=params.dim_feedforward,
            dropout=params.dropout,
            batch_first=True,
        )
        # No nested-tensor fast path: it only changes speed at inference, and keeping one code path makes
        # train/eval outputs comparable.
        self.encoder = nn.TransformerEncoder(layer, num_layers=params.num_layers, enable_nested_tensor=False)
        self.max_len = seq_len
        self.out_dim: int = params.d_model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = _to_float(x, _param_dtype(self))
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the encoder's maximum {self.max_len}")
        valid = length_mask(lengths, t) if lengths is not None else x.new_ones(x.shape[:2], dtype=torch.bool)
        h = self.input_proj(x) + self.pos_embedding[:, :t]
        h = self.encoder(h, src_key_padding_mask=~valid)
        weights = valid.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(dim=1) / weights.sum(dim=1)


@register_encoder(
    "transformer",
    params=TransformerParams,
    description="Transformer encoder + masked mean pooling for (T, D) sequences (e.g. MOSI features).",
)
def build_transformer(input_shape: tuple[int, ...], input_dtype: str, params: TransformerParams) -> nn.Module:
    if len(input_shape) != 2:
        raise ConfigError(f"transformer encoder expects a 2-D input shape (T, D), got {input_shape}")
    encoder = SequenceTransformerEncoder(input_shape[0], input_shape[1], params)
    encoder.lr_scale = params.lr_scale
    return encoder


# ---------------------------------------------------------------------------------------------------------
# hf_text
# ---------------------------------------------------------------------------------------------------------


class HFTextParams(Params):
    model: str | None = None
    config: dict[str, Any] | None = None
    pooling: Literal["cls", "mean"] = "cls"
    pad_token_id: int | None = Field(
        default=None, description="padding id when the modality stores no lengths; null: the model config's"
    )
    freeze: bool = False
    lr_scale: float = Field(
        default=1.0, gt=0, description="this encoder's lr as a multiple of the optimiser's (0.1: pretrained)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> HFTextParams:
        if (self.model is None) == (self.config is None):
            raise ValueError(
                "set exactly one of 'model' (hub name or local directory) and 'config' "
                "(AutoConfig kwargs with 'model_type', for a randomly initialised model)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("'config' must contain 'model_type' (e.g. 'bert')")
        return self


class HFTextEncoder(nn.Module):
    """A ``transformers`` ``AutoModel`` on token ids, pooled to one vector per sample.

    The attention mask comes from the rows' ``lengths`` when the modality stores them (a variable-length
    modality), else from ``pad_token_id`` (by default the model config's own). A sentence pair is stored
    as ``(L, 2)``: token ids and segment ids, handed to the model as ``token_type_ids`` (Twitter2015's
    tweet and target). With ``freeze`` the backbone's weights get no gradient and it stays in eval mode
    even when the surrounding model trains, so a frozen encoder is a deterministic feature extractor.
    """

    def __init__(self, backbone: nn.Module, pooling: str, pad_token_id: int, freeze: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.freeze = freeze
        self.lr_scale = 1.0
        self.pretrained_source: str | None = None
        self.out_dim: int = int(backbone.config.hidden_size)
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    takes_lengths = True

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        ids = ids.long()
        segments = None
        if ids.ndim == 3:  # (B, L, 2): a sentence pair's ids and segment ids
            ids, segments = ids[..., 0], ids[..., 1]
        if lengths is not None:
            mask = length_mask(lengths, ids.shape[1]).long()
        else:
            mask = (ids != self.pad_token_id).long()
        extra = {} if segments is None else {"token_type_ids": segments}
        hidden = self.backbone(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _no_pooler_kwargs(config: Any) -> dict[str, Any]:
    """``add_pooling_layer=False`` when the model class takes it.

    The pooler (e.g. BERT's) is unused by our pooling; left in, its weights never get gradients, which
    wastes memory and breaks DDP's unused-parameter check.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        return {}
    if isinstance(model_class, (list, tuple)):
        return {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


@register_encoder(
    "hf_text",
    params=HFTextParams,
    description="Hugging Face AutoModel on token ids (pretrained by name/path or random from a config).",
)
def build_hf_text(input_shape: tuple[int, ...], input_dtype: str, params: HFTextParams) -> nn.Module:
    if len(input_shape) != 1 and not (len(input_shape) == 2 and input_shape[1] == 2):
        raise ConfigError(
            f"hf_text encoder expects token ids of shape (L,), or (L, 2) for a sentence pair's ids and "
            f"segment ids, got {input_shape}"
        )
    if not input_dtype.startswith(("int", "uint")):
        raise ConfigError(f"hf_text encoder expects integer token ids, got dtype {input_dtype!r}")
    from transformers import AutoConfig, AutoModel  # slow import: only when this encoder is used

    if params.model is not None:
        config = _pretrained_config(params.model)
        backbone = AutoModel.from_pretrained(params.model, config=config, **_no_pooler_kwargs(config))
    else:
        cfg = dict(params.config or {})
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        backbone = AutoModel.from_config(config, **_no_pooler_kwargs(config))
    max_positions = getattr(backbone.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and input_shape[0] > max_positions:
        raise ConfigError(
            f"hf_text: sequence length {input_shape[0]} exceeds the model's max_position_embeddings "
            f"({max_positions})"
        )
    pad = params.pad_token_id if params.pad_token_id is not None else backbone.config.pad_token_id
    encoder = HFTextEncoder(backbone, params.pooling, int(pad or 0), params.freeze)
    encoder.lr_scale = params.lr_scale
    encoder.pretrained_source = f"huggingface:{params.model}" if params.model is not None else None
    return encoder


def _pretrained_config(name: str) -> Any:
    """``AutoConfig.from_pretrained`` with a message that says what to do offline."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise ConfigError(
            f"hf_text model {name!r} could not be loaded ({exc}); on a machine without internet, download "
            "it once elsewhere (`huggingface-cli download NAME`) and set model to its local folder"
        ) from exc
