"""``amco``: adaptive mask co-optimization (Zhou, Liang, Zheng, Xuan, Kumada, ICASSP 2023), BB-derived.

Spec ``../shared/spec/methods.md`` §8 (§8.1 BalanceBenchmark's version, §8.2 the harness version), defaults
§18, open items §19.1. **There is no public code and only the abstract could be read** (IEEE Xplore
10.1109/ICASSP49357.2023.10096641): an *adaptive mask* makes the *dependent* (dominant) modality harder to
learn, and *co-optimization* keeps its unimodal performance from degrading. The only implementation is
BalanceBenchmark's (BB, ``GeWu-Lab/BalanceBenchmark`` 4c1482f, ``balancemm/trainer/AMCo_trainer.py`` and
``models/avclassify_model.py:BaseClassifierAMCoModel``), which has three defects (§8.1): (i) its mask
schedule reaches ``p_t = 1`` after ``⌈3/epoch⌉`` batches from epoch 1 on, so the dependent modality's logits
are fully zeroed almost all the time, and ``p_t = 0`` throughout epoch 0; (ii) its mask has shape ``(2, C)``
and only broadcasts against the ``(B, C)`` logits because DataParallel scatters it over two GPUs, so it fails
on one device; (iii) the dependent modality's co-optimization term is the CE of its *masked* (all-zero)
logits, so it has no gradient. Hence fidelity ``reconstructed``: both variants below are ours, from BB's
code as the only reference; expect numbers to differ from MIDAS Table 1 (CREMA-D 69.91 ± 3.23, KS 67.04).

Sliced logits (§0.2, ``model.modality_logits``): ``s^m = W_m f^m + c/M`` for the concat head (a ``sum``
head's branch with its own bias). Dependence (§8.1/§8.2): softmax over the concatenated ``[s^1; …; s^M]``
(an MC-way softmax); modality m's mass ``μ_m = mean_i Σ_{c ∈ block m} softmax([s^1_i; …; s^M_i])_c``; m is
dependent when ``μ_m > σ``.

``variant=feature_mask`` (default; §8.2, "AMCo (BB-derived)", MIDAS's description "adaptive masking on the
features of the dominant modality"):

* ``τ = (epoch + k / steps_per_epoch) / E`` at step k of the epoch (training progress in epochs over E);
  ``p_t = p_max · sin(π/2 · min(ε, τ) / ε)`` (ramp complete at 30% of training with ε = 0.3).
* The dependence is computed under ``sg`` on the *current* batch from the unmasked shares (§8.2); each
  dependent modality's feature ``f^m`` is multiplied by a keep-mask over its ``d_m`` channels with
  ``⌊p_t · d_m⌋`` zeros at random positions, one mask per batch shared by its rows, before fusion.
* ``L = CE(z, y) + Σ_m CE(s^m, y)``, ``z = g_f(masked features)``, ``s^m`` the **unmasked** shares (the
  co-optimization, so the masked modality keeps a unimodal gradient; §8.2 fixes defect iii).

``variant=bb_logit_mask`` (§8.1, BB's mechanism with defect ii fixed; defects i and iii are kept):

* ``l_t`` restarts at 0 every epoch and grows by ``epoch / 10`` after every batch (batch k of epoch e:
  ``l_t = k·e/10``); ``p_t = sin(π/2 · min(ε, l_t) / ε)``; ``N = int(p_t · C)``; a random binary mask over
  the **C class logits** with N zeros, drawn every batch, one ``(C,)`` vector broadcast over the batch rows
  (the fix of defect ii: what each DataParallel replica of BB received).
* The dependent modality's shares become ``s^m ⊙ mask``; ``z = L*(Σ_m s^m)`` with ``L*`` an extra
  ``Linear(C → C)`` owned by the method (``model.method_modules["amco_linear_star"]``), also in the
  prediction path. BB builds it with PyTorch's default ``nn.Linear`` init (``linear_star_init=bb``);
  ``identity`` starts it at ``I`` with a zero bias.
* ``L = CE(z, y) + Σ_m CE(s^m, y)`` on the (masked) shares, as BB (two backward calls into one ``.grad``,
  one optimiser step: the same gradient as one backward of the sum).
* The dependence is decided from this step's (masked) shares and applied to the **next** batch; every
  modality is independent at the first batch of each epoch (BB resets its dict per epoch).

Both variants: outside the window ``[modulation_starts, modulation_ends]`` the loss is ``CE(z, y)`` alone,
no mask (BB). Evaluation: no mask; ``feature_mask`` predicts with the fusion head, ``bb_logit_mask`` with
``L*(Σ_m s^m)``. The model's unimodal heads are not part of AMCo (left out of the optimiser).

Params (defaults §18: σ = 0.5, ε = 0.3 from BB's ``trainer_config.yaml`` and the MIDAS ``BaseConfig``;
``p_max`` = 0.5 [inferred, §8.2]): ``variant`` (``feature_mask``), ``sigma`` (0.5), ``eps`` (0.3),
``p_max`` (0.5; ``feature_mask`` only, BB has none), ``modulation_starts`` (0), ``modulation_ends`` (None =
to the end; BB 0-80 and MIDAS 0-70 both cover a 70-epoch run), ``linear_star_init`` (``bb``; bb variant
only). BB's ``alpha`` (0.1) and ``U`` (512) are read by nothing in BB and are not parameters here.
Logs: ``p_t``, ``mass_<m>`` (μ_m), ``masked_<m>`` (1 when m's mask was applied this step; it has no zero
while ``p_t · d_m < 1``), ``loss_fused``, ``loss_unimodal`` (Σ_m CE(s^m, y)).

Departures from the official code (there is none; from BB's re-implementation, the only reference):

* ``feature_mask`` (default) masks feature channels, not class logits, with the progress-based ``p_t``
  capped at ``p_max``, dependence from the current batch and unmasked co-optimization shares: §8.2's
  reading of the paper's abstract and of MIDAS §4.1, which removes defects i and iii by construction.
* ``bb_logit_mask``: the ``(2, C)`` mask (defect ii) is one ``(C,)`` vector broadcast over the rows.
* The masks come from a method-owned ``torch.Generator`` seeded from the run seed (the same on every rank
  and checkpointed, spec §20.4 R6/R7) instead of NumPy's global ``np.random.shuffle``: the mask is one
  global choice per batch, so every replica applies the same one and a resumed run draws what the
  uninterrupted one did.
* Under data parallelism the masses are summed over ranks with the row counts before ``μ_m`` is formed
  (R1/R2), so every rank takes the same dependence decision; on one process this is BB's batch mean.
* No rescaling of the kept channels (the abstract describes a mask, not dropout); M > 2 uses the MC-way
  softmax with σ unchanged (BB's generic loop).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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

Variant = Literal["feature_mask", "bb_logit_mask"]
LinearStarInit = Literal["bb", "identity"]
LINEAR_STAR = "amco_linear_star"

# --------------------------------------------------------------------------------------- functional core


def mask_ratio(level: float, eps: float, p_max: float = 1.0) -> float:
    """§8.1/§8.2: ``p_t = p_max · sin(π/2 · min(ε, level) / ε)`` (``level`` = τ, or BB's ``l_t``)."""
    return p_max * math.sin(math.pi / 2 * min(eps, level) / eps)


def training_progress(epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """§8.2: τ = training progress in epochs / E, at step ``step`` (0-based) of ``epoch``."""
    return (epoch + step / max(steps_per_epoch, 1)) / max(epochs, 1)


def bb_level(epoch: int, step: int) -> float:
    """§8.1: BB's ``l_t`` at batch ``step`` of ``epoch`` (reset to 0 per epoch, + epoch/10 per batch)."""
    return step * epoch / 10


def keep_mask(width: int, zeros: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 ``(width,)`` vector of ones with ``zeros`` zeros at random positions (CPU)."""
    mask = torch.ones(width)
    mask[torch.randperm(width, generator=generator)[: min(max(zeros, 0), width)]] = 0.0
    return mask


def mass_sums(shares: dict[str, torch.Tensor]) -> torch.Tensor:
    """§8.1: each modality's softmax mass in the MC-way softmax of ``[s^1; …; s^M]``, summed over rows,
    shape (M,), no graph; divide by the row count for BB's batch mean μ_m."""
    with torch.no_grad():
        blocks = [s.detach() for s in shares.values()]
        probs = F.softmax(torch.cat(blocks, dim=1), dim=1)
        sizes = [b.shape[1] for b in blocks]
        return torch.stack([part.sum() for part in torch.split(probs, sizes, dim=1)])


def dependent_modalities(masses: torch.Tensor, count: float, sigma: float) -> list[bool]:
    """§8.1: modality m is dependent when its mean mass ``Σ_i mass_{i,m} / count`` exceeds σ."""
    return [float(v) / count > sigma for v in masses.detach().double().cpu()]


def co_optimization_loss(
    fused: torch.Tensor, shares: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """§8.1/§8.2: ``CE(z, y)`` and ``Σ_m CE(s^m, y)`` (returned apart for logging; the loss is their sum)."""
    unimodal = torch.stack([F.cross_entropy(s, labels) for s in shares.values()]).sum()
    return F.cross_entropy(fused, labels), unimodal


# --------------------------------------------------------------------------------------------- method


class AMCoParams(Params):
    variant: Variant = Field(
        default="feature_mask",
        description="feature_mask: §8.2 harness version; bb_logit_mask: §8.1 BB's logit mask (bug ii fixed)",
    )
    sigma: float = Field(default=0.5, gt=0, lt=1, description="σ: dependent when the MC-way mass exceeds it")
    eps: float = Field(default=0.3, gt=0, description="ε of p_t = p_max sin(π/2 min(ε, τ)/ε) (BB)")
    p_max: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="cap of the masked feature fraction (§8.2 [inferred]; feature_mask)",
    )
    modulation_starts: int = Field(default=0, ge=0, description="first masked epoch (0-based)")
    modulation_ends: int | None = Field(
        default=None, ge=0, description="last masked epoch, inclusive; null = to the end"
    )
    linear_star_init: LinearStarInit = Field(
        default="bb", description="L* init (bb_logit_mask): bb = PyTorch's default nn.Linear; identity = I, 0"
    )

    @model_validator(mode="after")
    def _window(self) -> AMCoParams:
        check_window(self.modulation_starts, self.modulation_ends)
        return self


@register_method("amco")
class AMCo(Method):
    fidelity = "reconstructed"
    Params = AMCoParams
    requires = Requirements(min_modalities=2, decomposable_fusion=True)

    GENERATOR_SALT: ClassVar[int] = 2023

    def __init__(self, params: AMCoParams, context: MethodContext) -> None:
        super().__init__(params, context)
        # one stream on every rank (R7), checkpointed (R6)
        self.generator = torch.Generator().manual_seed(7_919 * context.seed + self.GENERATOR_SALT)
        self.step = 0  # step within the epoch (τ and BB's l_t)
        self.dependent = [False] * len(context.modalities)  # bb_logit_mask: decided for the next batch

    @property
    def label(self) -> str:
        return self.name if self.params.variant == "feature_mask" else f"{self.name}[bb]"

    @property
    def bb(self) -> bool:
        return self.params.variant == "bb_logit_mask"

    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        if not self.bb:
            return {}
        c = model.num_classes
        linear_star = nn.Linear(c, c)  # §8.1 L*; PyTorch's default init, as BB
        if self.params.linear_star_init == "identity":
            with torch.no_grad():
                linear_star.weight.copy_(torch.eye(c))
                linear_star.bias.zero_()
        return {LINEAR_STAR: linear_star}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    def modulating(self, epoch: int) -> bool:
        p = self.params
        return in_window(epoch, p.modulation_starts, p.modulation_ends)

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.bb:
            return model.fuse(features)
        return self._linear_star(model, sum(model.modality_logits(features).values()))

    def _linear_star(self, model: MultimodalModel, logits: torch.Tensor) -> torch.Tensor:
        return model.method_modules[LINEAR_STAR](logits)

    def global_dependence(self, shares: dict[str, torch.Tensor]) -> tuple[list[bool], list[float]]:
        """Dependence from masses and row counts summed over ranks (R1), and the mean masses μ_m."""
        first = next(iter(shares.values()))
        count = torch.tensor([float(first.shape[0])], device=first.device)
        total = self.runtime.all_reduce_sum(torch.cat([mass_sums(shares).float(), count]))
        masses, rows = total[:-1], float(total[-1])
        return dependent_modalities(masses, rows, self.params.sigma), (masses / rows).tolist()

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        self.step = 0
        self.dependent = [False] * len(model.modalities)  # BB resets the dependence every epoch

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        shares = model.modality_logits(features)  # unmasked s^m (§0.2)
        if not self.modulating(epoch):  # outside the window: CE(z, y) alone, no mask (BB)
            fused = self._linear_star(model, sum(shares.values())) if self.bb else model.fuse(features)
            loss = F.cross_entropy(fused, batch.labels)
            self.step += 1
            return StepOutput(loss=loss, logs={"loss_fused": loss.detach()})
        step = self._bb_step if self.bb else self._feature_step
        out = step(model, features, shares, batch.labels, epoch)
        self.step += 1
        return out

    def _feature_step(
        self,
        model: MultimodalModel,
        features: dict[str, torch.Tensor],
        shares: dict[str, torch.Tensor],
        labels: torch.Tensor,
        epoch: int,
    ) -> StepOutput:
        """§8.2: mask the channels of the modality dependent on this batch, co-optimize unmasked shares."""
        p, c = self.params, self.context
        p_t = mask_ratio(training_progress(epoch, self.step, c.steps_per_epoch, c.epochs), p.eps, p.p_max)
        dependent, masses = self.global_dependence(shares)  # sg, current batch (§8.2)
        masked = {}
        for (m, f), is_dependent in zip(features.items(), dependent, strict=True):
            if is_dependent:  # keep-mask with ⌊p_t · d_m⌋ zeros, one per batch (§8.2)
                f = f * keep_mask(f.shape[1], math.floor(p_t * f.shape[1]), self.generator).to(f)
            masked[m] = f
        fused, unimodal = co_optimization_loss(model.fuse(masked), shares, labels)
        return self._output(model, fused, unimodal, p_t, masses, dependent)

    def _bb_step(
        self,
        model: MultimodalModel,
        features: dict[str, torch.Tensor],
        shares: dict[str, torch.Tensor],
        labels: torch.Tensor,
        epoch: int,
    ) -> StepOutput:
        """§8.1: mask the class logits of the modality found dependent on the last batch; z = L*(Σ s^m)."""
        p_t = mask_ratio(bb_level(epoch, self.step), self.params.eps)
        num_classes = next(iter(shares.values())).shape[1]
        mask = keep_mask(num_classes, int(p_t * num_classes), self.generator)  # drawn every batch (BB)
        applied = list(self.dependent)
        used = {
            m: s * mask.to(s) if is_dependent else s
            for (m, s), is_dependent in zip(shares.items(), applied, strict=True)
        }
        fused, unimodal = co_optimization_loss(  # defect iii kept: CE of the masked shares
            self._linear_star(model, sum(used.values())), used, labels
        )
        self.dependent, masses = self.global_dependence(used)  # for the next batch (§8.1)
        return self._output(model, fused, unimodal, p_t, masses, applied)

    def _output(
        self,
        model: MultimodalModel,
        fused: torch.Tensor,
        unimodal: torch.Tensor,
        p_t: float,
        masses: list[float],
        masked: list[bool],
    ) -> StepOutput:
        logs = {"loss_fused": fused.detach(), "loss_unimodal": unimodal.detach(), "p_t": p_t}
        for m, mass, is_masked in zip(model.modalities, masses, masked, strict=True):
            logs[f"mass_{m}"] = mass
            logs[f"masked_{m}"] = float(is_masked)
        return StepOutput(loss=fused + unimodal, logs=logs)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "step": self.step, "dependent": list(self.dependent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.dependent = [bool(v) for v in state["dependent"]]
