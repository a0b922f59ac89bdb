"""``ogm_ge``: on-the-fly gradient modulation + Gaussian enhancement (Peng, Wei, Deng, Wang, Hu, CVPR 2022).

Spec ``methods.md`` §6.1, after the official ``GeWu-Lab/OGM-GE_CVPR2022/main.py``. Per step: the loss is the
cross-entropy of the fused logits (the sliced logits are computed but not trained, issue #36); each
modality's score ``S_m = Σ_{i∈B} softmax(s^m_i)[y_i]`` is a batch sum over its sliced logits
``s^m`` (``model.modality_logits``: ``W_m f^m + c/M`` for ``concat``, the branch with its full bias for
``sum``); from the ratio ``ρ`` the dominant modality gets ``k = 1 − tanh(α · relu(ρ))`` (§6.1 step 4:
``relu(ρ)``, not ``relu(ρ − 1)``), the other ``k = 1``. After the all-reduce, inside the epoch window
``[modulation_starts, modulation_ends]``, every modulated gradient tensor of modality m's encoder becomes
``k_m · grad + N(0, σ²)`` with ``σ = std(grad) + 1e-8``, the std of that tensor's unscaled gradient
(§6.1 step 5; the GE term is added to both encoders, the one with ``k = 1`` included). ``use_ge=false`` is
OGM without GE: ``grad ← k · grad``. Evaluation: the plain fused logits.

Params: ``alpha`` (0.8, the README's CREMA-D value; 0.3 on Kinetics-Sounds via ``dataset_defaults``, BB's
value, §6 harness defaults), ``modulation_starts`` (0), ``modulation_ends`` (None = to the last epoch;
inclusive, as the official ``starts <= epoch <= ends``), ``use_ge`` (true), ``modulate`` (``conv``: the
4-D weights of each encoder, official; ``weights``: every ≥2-D parameter of each encoder, BB's choice).
Logs: ``k_<m>``, ``ratio_<m>`` (ρ_m) and ``modulated_tensors`` (how many tensors were edited this step;
0 outside the window, and always 0 with ``modulate=conv`` on encoders without conv weights, e.g. the MLP
encoders of the synthetic dataset: the run is then plain joint training, and the log says so).

Departures from the official code:

* Scores are summed over ranks (``runtime.all_reduce_sum``) before the ratio (spec §20.4 R1), so every
  replica applies the same ``k`` to the same all-reduced gradient; on one process this is the official
  batch sum. Only the ratio is used, so nothing depends on the per-rank batch size.
* The Gaussian noise comes from a method-owned ``torch.Generator`` seeded from the run seed (same on every
  rank, R7) and checkpointed with the method, not from the global RNG: the noise is added after the
  all-reduce, so per-rank noise would make the replicas diverge. It is drawn on the CPU and copied to the
  gradient's device: per step one host draw and one host-to-device copy of every modulated tensor (about
  11M floats, 45 MB, per ResNet-18 encoder), plus one ``std().item()`` sync per tensor (the official code
  has that sync too).
* ``σ`` is the unbiased std (``torch.std``, as the official code) and 0 for a single-element tensor (where
  it is undefined).
* ``modulate=conv`` selects 4-D parameters of ``model.encoders[m]`` by module, not by the official
  parameter-name test (``'audio' in name``); the result is the same for the official model.
* Modality order: the first modality plays the official code's audio, the second its visual. For M = 2
  the official branch is kept exactly: ``ρ_2 = S_2 / S_1``; if ``ρ_2 > 1`` the second modality is slowed,
  else (ties included) the first.
* M > 2 (not in the paper; BB's ``OGM_GE3`` rule, §6): ``ρ_m`` = mean over ``l ≠ m`` of ``S_m / S_l`` and
  ``k_m = 1 − tanh(α · relu(ρ_m))`` for every ``ρ_m > 1``, else 1.
* The default window runs to the end of training (the harness' 70-epoch protocol, §18), not the README's
  0-50.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import (
    Method,
    MethodContext,
    Requirements,
    StepOutput,
    check_window,
    in_window,
    register_method,
    without_unimodal_heads,
)

log = logging.getLogger(__name__)

ModulatedTensors = Literal["conv", "weights"]
GE_STD_EPS = 1e-8  # §6.1 step 5: σ = std(grad) + 1e-8


# ------------------------------------------------------------------------------------- functional core


def score_ratios(scores: Sequence[float]) -> list[float]:
    """ρ_m per modality from the batch-sum scores S_m (§6.1 step 4; M > 2: BB's mean of S_m / S_l, §6)."""
    s = [float(v) for v in scores]
    if len(s) < 2:
        raise ValueError(f"OGM needs at least two modality scores, got {len(s)}")
    if len(s) == 2:
        rho_second = s[1] / s[0]  # ratio_v = score_v / score_a
        return [1.0 / rho_second, rho_second]  # ratio_a = 1 / ratio_v
    return [sum(s[m] / s[j] for j in range(len(s)) if j != m) / (len(s) - 1) for m in range(len(s))]


def ogm_coefficients(scores: Sequence[float], alpha: float) -> list[float]:
    """k_m per modality (§6.1 step 4, paper Eq. 10): 1 − tanh(α · relu(ρ_m)) for the dominant modality,
    1 for the others. M = 2: the official branch (ρ_2 > 1 slows the second modality, else the first)."""
    rho = score_ratios(scores)

    def slowed(r: float) -> float:
        return 1.0 - math.tanh(alpha * max(r, 0.0))  # relu(ρ), not relu(ρ − 1)

    if len(rho) == 2:
        return [1.0, slowed(rho[1])] if rho[1] > 1 else [slowed(rho[0]), 1.0]
    return [slowed(r) if r > 1 else 1.0 for r in rho]


def ge_noise_std(grad: torch.Tensor) -> float:
    """σ of the GE noise (§6.1 step 5): the unbiased std of the unscaled gradient tensor, + 1e-8."""
    std = float(grad.detach().float().std()) if grad.numel() > 1 else 0.0
    return std + GE_STD_EPS


def ge_noise(shape: torch.Size, std: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """N(0, std²) of ``shape`` drawn on the CPU from ``generator`` and moved to ``like``'s device/dtype."""
    draw = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (draw * std).to(device=like.device, dtype=like.dtype)


def modulate_gradient(
    grad: torch.Tensor, k: float, generator: torch.Generator | None, use_ge: bool
) -> torch.Tensor:
    """OGM(-GE)'s gradient edit (§6.1 step 5): ``k · grad + N(0, (std(grad) + 1e-8)²)`` with GE, else
    ``k · grad``. The noise std is the *unscaled* gradient's; a new tensor is returned."""
    scaled = grad * k
    if not use_ge:
        return scaled
    if generator is None:
        raise ValueError("modulate_gradient: use_ge needs a generator")
    return scaled + ge_noise(grad.shape, ge_noise_std(grad), generator, grad)


def modulated_parameters(encoder: nn.Module, mode: ModulatedTensors) -> Iterator[nn.Parameter]:
    """The encoder's tensors OGM edits: 4-D (conv) weights (official), or every ≥2-D parameter (BB)."""
    for param in encoder.parameters():
        if (param.ndim == 4) if mode == "conv" else (param.ndim >= 2):
            yield param


# --------------------------------------------------------------------------------------------- method


class OgmGeParams(Params):
    alpha: float = Field(default=0.8, gt=0, description="α of k = 1 − tanh(α·relu(ρ)) (README: CREMA-D 0.8)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch (0-based)")
    modulation_ends: int | None = Field(
        default=None, ge=0, description="last modulated epoch, inclusive; null = to the end"
    )
    use_ge: bool = Field(default=True, description="add the Gaussian enhancement (false: OGM without GE)")
    modulate: ModulatedTensors = Field(
        default="conv",
        description="conv: 4-D encoder weights (official); weights: every ≥2-D encoder tensor (BB)",
    )

    @model_validator(mode="after")
    def _window(self) -> OgmGeParams:
        check_window(self.modulation_starts, self.modulation_ends)
        return self


@register_method("ogm_ge")
class OgmGe(Method):
    fidelity = "official-code"
    Params = OgmGeParams
    requires = Requirements(min_modalities=2, decomposable_fusion=True)
    # §6 harness defaults: BB's α on Kinetics-Sounds (no official value, OGM-GE issue #45)
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {"kinetics_sounds": {"alpha": 0.3}}

    GENERATOR_SEED_OFFSET: ClassVar[int] = 2022

    def __init__(self, params: OgmGeParams, context: MethodContext) -> None:
        super().__init__(params, context)
        # one stream on every rank (R7): seeded from the run seed alone
        self.generator = torch.Generator().manual_seed(7_919 * context.seed + self.GENERATOR_SEED_OFFSET)
        self._k: list[float] | None = None
        self._warned = False

    @property
    def label(self) -> str:
        return self.name if self.params.use_ge else f"{self.name}[no GE]"

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    def modulating(self, epoch: int) -> bool:
        p = self.params
        return in_window(epoch, p.modulation_starts, p.modulation_ends)

    def scores(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        """S_m = Σ_i softmax(s^m_i)[y_i] (§6.1 step 3), summed over ranks (R1). A statistic only: no graph."""
        with torch.no_grad():
            shares = model.modality_logits({m: f.detach() for m, f in features.items()})
            rows = torch.arange(labels.shape[0], device=labels.device)
            local = torch.stack([F.softmax(shares[m], dim=1)[rows, labels].sum() for m in model.modalities])
        return self.runtime.all_reduce_sum(local)

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        loss = F.cross_entropy(model.fuse(features), batch.labels)
        scores = self.scores(model, features, batch.labels).double().tolist()
        self._k = ogm_coefficients(scores, self.params.alpha)
        rho = score_ratios(scores)
        count = (
            sum(len(list(self._selected(model, m))) for m in model.modalities)
            if self.modulating(epoch)
            else 0
        )
        logs = {"loss_fused": loss.detach(), "modulated_tensors": float(count)}
        for m, k, r in zip(model.modalities, self._k, rho, strict=True):
            logs[f"k_{m}"] = k
            logs[f"ratio_{m}"] = r
        return StepOutput(loss=loss, logs=logs)

    def _selected(self, model: MultimodalModel, modality: str) -> Iterator[nn.Parameter]:
        return modulated_parameters(model.encoders[modality], self.params.modulate)

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        # gradients are all-reduced already: the same k, σ and noise on every rank keep replicas equal
        if self._k is None or not self.modulating(epoch):
            return
        edited = 0
        for modality, k in zip(model.modalities, self._k, strict=True):
            for param in self._selected(model, modality):
                if param.grad is not None:
                    param.grad = modulate_gradient(param.grad, k, self.generator, self.params.use_ge)
                    edited += 1
        if edited == 0 and not self._warned and self.runtime.rank == 0:
            log.warning(
                "%s: modulate=%r selects no tensor of the encoders; training is unmodulated",
                self.name,
                self.params.modulate,
            )
        self._warned = self._warned or edited == 0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
