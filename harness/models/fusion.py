"""Fusion heads: map the per-modality features (in the model's modality order) to class logits.

Every head is a ``FusionHead``: it takes ``features: dict[str, Tensor]`` (modality → ``(b, d_m)``) and returns
logits ``(b, C)``. A head is *decomposable* when its logits are a sum of per-modality shares,
``z = Σ_m s^m``; ``modality_logits`` then returns those shares. They are the "sliced unimodal logits" of
methods.md §0.2 that OGM-GE and its relatives need (§0.3); they only exist for a linear or sum head, so the
other heads raise ``NotDecomposableError`` (for those, OGM-GE issue #21 suggests zeroing the other
modalities' features instead; that is the method's business, not the head's).

* ``concat`` is the head of the MIDAS paper and code (methods.md §0.2, §2.1): one ``Linear(Σ d_m → C)`` on
  the concatenation, no hidden layer. Its weight splits by columns per modality: ``s^m = W_m f^m + c/M``.
* ``concat_mlp`` adds a hidden layer for users who want one (not decomposable).
* ``sum``, ``film`` and ``gated`` are the OGM-GE code's alternative heads (``models/fusion_modules.py``),
  generalised to named modalities, unequal feature sizes and M > 2 as documented on each class.

Decomposability is recorded in the registry entry (``FusionEntry.decomposable``), so a config can be
checked (``fusion_is_decomposable``) without building a module; ``build_fusion`` checks that the built head
agrees with its entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from midasbench.harness.errors import ConfigError
from midasbench.harness.params import ComponentEntry, Params, parse_params
from midasbench.harness.registry import Registry


@dataclass(frozen=True)
class FusionEntry(ComponentEntry):
    """A fusion registry entry; ``decomposable`` says whether its head has per-modality logit shares."""

    decomposable: bool = False


FUSIONS: Registry[FusionEntry] = Registry("fusion")


def register_fusion(
    name: str, params: type[Params], description: str, *, decomposable: bool
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a factory ``(feature_dims, num_classes, params) -> FusionHead`` giving logits.

    ``decomposable`` must match the class attribute of the head the factory builds (checked on build).
    """

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        FUSIONS.register(name)(
            FusionEntry(factory=factory, params=params, description=description, decomposable=decomposable)
        )
        return factory

    return decorator


def fusion_is_decomposable(name: str) -> bool:
    """Whether the registered fusion head ``name`` gives per-modality logit shares (raises if unknown)."""
    return bool(getattr(FUSIONS.get(name), "decomposable", False))


def decomposable_fusions() -> list[str]:
    """Names of the registered decomposable fusion heads, sorted."""
    return [name for name, entry in FUSIONS.items() if getattr(entry, "decomposable", False)]


def build_fusion(
    name: str, feature_dims: dict[str, int], num_classes: int, params: dict[str, Any] | None
) -> nn.Module:
    entry = FUSIONS.get(name)
    head = entry.factory(
        dict(feature_dims), num_classes, parse_params(entry.params, params, "model.fusion.params")
    )
    built = bool(getattr(head, "decomposable", False))
    if built != entry.decomposable:
        raise TypeError(
            f"fusion {name!r} is registered with decomposable={entry.decomposable} but its factory built "
            f"{type(head).__name__} with decomposable={built}"
        )
    return head


class NotDecomposableError(ValueError):
    """``modality_logits`` was called on a head whose logits are not a sum of per-modality shares."""


class FusionHead(nn.Module):
    """Base of the fusion heads: ``forward(features) -> logits`` and, if decomposable, per-modality shares.

    ``modalities`` is the model's modality order (the order of ``feature_dims``); ``fusion_name`` is the
    registry name used in error messages.
    """

    decomposable: ClassVar[bool] = False
    fusion_name: ClassVar[str] = ""

    def __init__(self, feature_dims: dict[str, int]) -> None:
        super().__init__()
        if not feature_dims:
            raise ValueError(f"{type(self).__name__}: feature_dims is empty")
        self.modalities: list[str] = list(feature_dims)
        self.feature_dims: dict[str, int] = dict(feature_dims)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def modality_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's additive share ``s^m`` of the logits: ``Σ_m s^m == forward(features)``.

        Raises ``NotDecomposableError`` for heads that are not a sum of per-modality terms.
        """
        name = self.fusion_name or type(self).__name__
        raise NotDecomposableError(
            f"fusion head {name!r} ({type(self).__name__}) is not decomposable: its logits are not a sum of "
            f"per-modality shares, so sliced unimodal logits (methods.md §0.2) do not exist; decomposable "
            f"fusion heads: {', '.join(decomposable_fusions()) or '(none)'} (set model.fusion.name)"
        )

    def _cat(self, features: dict[str, torch.Tensor], modalities: list[str] | None = None) -> torch.Tensor:
        return torch.cat(
            [features[m] for m in (self.modalities if modalities is None else modalities)], dim=1
        )


def _pick_modality(feature_dims: dict[str, int], value: str | None, key: str) -> str:
    """The modality named by a param (``None`` = the first one); ConfigError naming ``key`` if unknown."""
    names = list(feature_dims)
    if value is None:
        return names[0]
    if value not in feature_dims:
        raise ConfigError(f"{key}: unknown modality {value!r}; allowed: {', '.join(names)} (or null = first)")
    return value


def _need_two(name: str, feature_dims: dict[str, int]) -> None:
    if len(feature_dims) < 2:
        raise ConfigError(
            f"model.fusion.name: fusion head {name!r} needs at least two modalities "
            f"(got {', '.join(feature_dims) or 'none'})"
        )


# --------------------------------------------------------------------------------------------- concat


class ConcatParams(Params):
    pass


class ConcatFusion(FusionHead):
    """``z = W [f^1; …; f^M] + c`` (MIDAS §3.1 and its code's ``task_net``; methods.md §0.2).

    Decomposable: ``s^m = W_m f^m + c/M``, ``W_m`` the columns of ``m`` in modality order; the bias is split
    evenly, as in the sliced logits of OGM-GE and BalanceBenchmark.
    """

    decomposable: ClassVar[bool] = True
    fusion_name: ClassVar[str] = "concat"

    def __init__(self, feature_dims: dict[str, int], num_classes: int) -> None:
        super().__init__(feature_dims)
        self.linear = nn.Linear(sum(self.feature_dims.values()), num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(self._cat(features))

    def modality_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = self.linear.weight, self.linear.bias
        share_bias = bias / len(self.modalities)
        shares, start = {}, 0
        for m in self.modalities:
            stop = start + self.feature_dims[m]
            shares[m] = nn.functional.linear(features[m], weight[:, start:stop], share_bias)
            start = stop
        return shares


@register_fusion(
    "concat",
    ConcatParams,
    "concatenation + one linear layer (the MIDAS paper's head); decomposable",
    decomposable=True,
)
def _concat(feature_dims: dict[str, int], num_classes: int, params: ConcatParams) -> ConcatFusion:
    return ConcatFusion(feature_dims, num_classes)


# ------------------------------------------------------------------------------------------ concat_mlp


class ConcatMLPParams(Params):
    hidden: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)


class ConcatMLPFusion(FusionHead):
    """Concatenation, one hidden ReLU layer, linear (ours: a common late-fusion MLP); not decomposable."""

    fusion_name: ClassVar[str] = "concat_mlp"

    def __init__(self, feature_dims: dict[str, int], num_classes: int, params: ConcatMLPParams) -> None:
        super().__init__(feature_dims)
        self.net = nn.Sequential(
            nn.Linear(sum(self.feature_dims.values()), params.hidden),
            nn.ReLU(),
            nn.Dropout(params.dropout),
            nn.Linear(params.hidden, num_classes),
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self._cat(features))


@register_fusion(
    "concat_mlp", ConcatMLPParams, "concatenation + hidden ReLU layer + linear", decomposable=False
)
def _concat_mlp(feature_dims: dict[str, int], num_classes: int, params: ConcatMLPParams) -> ConcatMLPFusion:
    return ConcatMLPFusion(feature_dims, num_classes, params)


# ------------------------------------------------------------------------------------------------ sum


class SumParams(Params):
    pass


class SumFusion(FusionHead):
    """``z = Σ_m (U_m f^m + e_m)``, one linear per modality (OGM-GE code ``SumFusion``; methods.md §0.3).

    Decomposable: ``s^m = U_m f^m + e_m``, each branch with its own bias. ``branches`` is keyed by modality
    name, so modality names must be valid ``nn.ModuleDict`` keys (as for the model's unimodal heads).
    """

    decomposable: ClassVar[bool] = True
    fusion_name: ClassVar[str] = "sum"

    def __init__(self, feature_dims: dict[str, int], num_classes: int) -> None:
        super().__init__(feature_dims)
        self.branches = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.feature_dims.items()})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        shares = self.modality_logits(features)
        return torch.stack([shares[m] for m in self.modalities]).sum(dim=0)

    def modality_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.branches[m](features[m]) for m in self.modalities}


@register_fusion(
    "sum",
    SumParams,
    "sum of one linear layer per modality (OGM-GE's SumFusion); decomposable",
    decomposable=True,
)
def _sum(feature_dims: dict[str, int], num_classes: int, params: SumParams) -> SumFusion:
    return SumFusion(feature_dims, num_classes)


# ----------------------------------------------------------------------------------------------- film


class FiLMParams(Params):
    hidden: int = Field(default=512, ge=1)
    conditioner: str | None = None  # modality that gives γ, β; None = the first modality


class FiLMFusion(FusionHead):
    """FiLM (Perez et al., AAAI 2018, arXiv 1709.07871) as a head, after OGM-GE's ``FiLM``; not decomposable.

    The conditioning modality ``c`` gives ``γ, β = split(Linear(d_c → 2h)(f^c))``; the other modalities,
    concatenated in modality order (M = 2: just the other one), form ``x``; ``z = fc_out(γ ⊙ P(x) + β)``
    with ``fc_out = Linear(h → C)``.

    Decision: ``P`` is the identity when ``dim(x) == h`` (OGM-GE's FiLM modulates the raw 512-d feature
    with h = 512, so the default on ResNet-18 features is that head exactly) and ``Linear(dim(x) → h)``
    otherwise. ``γ`` is used as is (no ``1 + γ`` reparametrisation), as in the paper and OGM-GE.
    """

    fusion_name: ClassVar[str] = "film"

    def __init__(
        self,
        feature_dims: dict[str, int],
        num_classes: int,
        hidden: int = 512,
        conditioner: str | None = None,
    ) -> None:
        super().__init__(feature_dims)
        if len(self.modalities) < 2:
            raise ValueError("FiLMFusion needs at least two modalities")
        self.conditioner = self.modalities[0] if conditioner is None else conditioner
        if self.conditioner not in self.feature_dims:
            raise ValueError(
                f"FiLMFusion: unknown conditioner {self.conditioner!r}; allowed: {self.modalities}"
            )
        self.hidden = hidden
        self.others = [m for m in self.modalities if m != self.conditioner]
        rest_dim = sum(self.feature_dims[m] for m in self.others)
        self.film = nn.Linear(self.feature_dims[self.conditioner], 2 * hidden)
        self.project: nn.Module = nn.Identity() if rest_dim == hidden else nn.Linear(rest_dim, hidden)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = torch.split(self.film(features[self.conditioner]), self.hidden, dim=1)
        x = self.project(self._cat(features, self.others))
        return self.fc_out(gamma * x + beta)


@register_fusion(
    "film",
    FiLMParams,
    "FiLM: one modality gives γ, β that modulate the others (OGM-GE's FiLM)",
    decomposable=False,
)
def _film(feature_dims: dict[str, int], num_classes: int, params: FiLMParams) -> FiLMFusion:
    _need_two("film", feature_dims)
    conditioner = _pick_modality(feature_dims, params.conditioner, "model.fusion.params.conditioner")
    return FiLMFusion(feature_dims, num_classes, hidden=params.hidden, conditioner=conditioner)


# ---------------------------------------------------------------------------------------------- gated


class GatedParams(Params):
    hidden: int = Field(default=512, ge=1)
    gate: str | None = None  # modality that gives the gate; None = the first modality


class GatedFusion(FusionHead):
    """Gated fusion (Kiela et al. 2018, arXiv 1802.02892) after OGM-GE's ``GatedFusion``; not decomposable.

    ``u = Linear(d_g → h)(f^g)`` for the gate modality ``g``, ``v = Linear(Σ d_rest → h)([f^rest])`` for
    the others concatenated in modality order (M = 2: the other one); ``z = fc_out(sigmoid(u) ⊙ v)`` with
    ``fc_out = Linear(h → C)``. Both sides are always projected (as in OGM-GE), even when a size equals h.
    """

    fusion_name: ClassVar[str] = "gated"

    def __init__(
        self, feature_dims: dict[str, int], num_classes: int, hidden: int = 512, gate: str | None = None
    ) -> None:
        super().__init__(feature_dims)
        if len(self.modalities) < 2:
            raise ValueError("GatedFusion needs at least two modalities")
        self.gate_modality = self.modalities[0] if gate is None else gate
        if self.gate_modality not in self.feature_dims:
            raise ValueError(f"GatedFusion: unknown gate {self.gate_modality!r}; allowed: {self.modalities}")
        self.others = [m for m in self.modalities if m != self.gate_modality]
        self.fc_gate = nn.Linear(self.feature_dims[self.gate_modality], hidden)
        self.fc_rest = nn.Linear(sum(self.feature_dims[m] for m in self.others), hidden)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.fc_gate(features[self.gate_modality]))
        return self.fc_out(gate * self.fc_rest(self._cat(features, self.others)))


@register_fusion(
    "gated",
    GatedParams,
    "gated fusion: a sigmoid gate from one modality scales the others (OGM-GE's GatedFusion)",
    decomposable=False,
)
def _gated(feature_dims: dict[str, int], num_classes: int, params: GatedParams) -> GatedFusion:
    _need_two("gated", feature_dims)
    gate = _pick_modality(feature_dims, params.gate, "model.fusion.params.gate")
    return GatedFusion(feature_dims, num_classes, hidden=params.hidden, gate=gate)
