"""``cml``: calibrating multimodal learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, "Calibrating Multimodal
Learning", ICML 2023; spec ``../shared/spec/methods-more.md`` §25, defaults §32).

Principle (§25.1): a prediction's confidence should not *increase* when a modality is removed. A hinge
regulariser penalises confidence gains on reduced inputs; evaluation is the plain fused logits.

Official form (default, ``form="official"``; [CML] ``miwae/train.py:66–86, :274–304``). Each sample gets
its own random removal order, giving nested inputs ``S_0`` = all modalities, ``S_{k+1}`` = ``S_k`` minus one
more modality, down to one modality (``k = 0 … M−1``). Removal is post-encoder feature zeroing (§25.2
harness default), ``z^{(k)} = g_f([…, 0_{d_m}, …])`` — for the concat head ``z − W_m f^m`` with the full
bias — so no extra encoder pass. With ``conf = max softmax``, ``pred = argmax``:

* ``L_CE = mean_k CE(z^{(k)}, y)``;
* ``R = Σ_k Σ_i [ relu((conf^{k+1}_i − conf^k_i) 1[pred^k_i = y_i] − ε)
  + relu((conf^{k+1}_i − sg(conf^k_i)) 1[pred^{k+1}_i ≠ y_i ∧ pred^k_i ≠ y_i] − ε) ]`` (trick 1: the fuller
  input is right, both confidences get a gradient; trick 2: both wrong, only the reduced one does);
* ``L = L_CE + λ R``, λ = 0.1 (the README's β/100 with β = 10), ε = 0, summed over samples.

BalanceBenchmark form (``form="bb"``; [BB] ``CML_trainer.py:19–22, :62–67, :170–201``): one removed
modality ``r`` per epoch for every sample, ``L = ½[CE(z) + CE(z_{−r})] + λ max(0, Σ_i (conf(z_{−r,i}) −
conf(z_i)))`` (no correctness masks; the hinge on the batch sum).

Randomness. The per-sample removal orders (official) and the per-epoch removed modality (BB, a choice the
method defines globally, §20.4 R7) come from a method-owned CPU generator seeded from the run's seed, the
same on every rank, and kept in ``state_dict`` with the current ``r``, so a resumed run draws what the
uninterrupted one did and the method state is bitwise equal across replicas. Every rank draws the same
amount per step (equal per-rank batch sizes), so every rank applies the same per-sample orders to its own
different samples — a departure from R7's "per-sample randomness stays per rank", accepted (as in
``opm``) because the orders remain independent of the samples they hit.

Parameters (§25.5, §32): ``lam`` = 0.1 ([CML] readme β = 10 → β/100; BB ``lam: 0.1``); ``eps`` = 0
([CML] args); ``reduction`` = ``sum`` ([CML] ``:294–302``; ``mean`` divides by the batch size, §25.7);
``form`` = ``official``.

Departures from the official code (``QingyangZhang/CML``, tabular multi-view MIWAE/CPM models):

* Removal zeroes the removed modality's encoder feature after the encoder (§25.2 harness default) instead
  of replacing the input view by its training mean before the model (the official tabular imputation);
  the ``input_mean`` variant of §25.2 is not offered (it needs an extra encoder pass per level and an
  epoch pass for the input means).
* No MIWAE reconstruction term and no reconstruction-only stage (not part of CML, §25.3); α = 1 on L_CE.
* Sum reduction under data parallelism: the local ``R`` is multiplied by the world size ``W`` (from the
  runtime), so that after the trainer averages gradients over ranks the regulariser weighs as a single
  process's sum over the global batch (§25.9). Mean reduction needs no factor.
* The BB form's hinge is taken on the rank's local batch sum (×W under sum reduction), not on the global
  sum, which would need a differentiable all-reduce before the hinge (§25.9: avoided).
* The model's separate unimodal heads are not trained (left out of the optimiser): only fused logits
  are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method, without_unimodal_heads

# --------------------------------------------------------------------------------------- functional core


def nested_keep_masks(batch: int, num_modalities: int, generator: torch.Generator) -> torch.Tensor:
    """§25.2 official nesting: ``keep[k, i, m]`` (bool, ``(M, b, M)``) is True when modality ``m`` is still
    present at level ``k`` for sample ``i``. Each sample's removal order is an independent uniform
    permutation (``argsort`` of one ``(b, M)`` uniform draw); level ``k`` removes its first ``k``."""
    order = torch.rand((batch, num_modalities), generator=generator).argsort(dim=1)  # removal order
    position = order.argsort(dim=1)  # position[i, m]: when m is removed for sample i
    levels = torch.arange(num_modalities)[:, None, None]
    return position[None] >= levels


def removed_features(features: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Post-encoder removal: ``f^m_i`` zeroed where ``keep[i, m]`` is False (``keep`` is ``(b, M)``)."""
    keep = keep.to(next(iter(features.values())).device)
    return {m: f * keep[:, j : j + 1].to(f.dtype) for j, (m, f) in enumerate(features.items())}


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``conf(z) = max_c softmax(z)_c`` (differentiable) and ``pred(z) = argmax_c z_c``."""
    conf, pred = F.softmax(logits, dim=1).max(dim=1)
    return conf, pred


def official_hinge(
    conf_full: torch.Tensor,
    conf_reduced: torch.Tensor,
    right_full: torch.Tensor,
    right_reduced: torch.Tensor,
    eps: float = 0.0,
) -> torch.Tensor:
    """§25.2 per-sample hinge between a level and the next (reduced) one, both tricks; shape ``(b,)``.

    Trick 1 (fuller input right): both confidences get a gradient. Trick 2 (both wrong): only the reduced
    confidence does (``sg(conf_full)``)."""
    gain = conf_reduced - conf_full
    trick1 = F.relu(gain * right_full.to(gain.dtype) - eps)
    both_wrong = (~right_full) & (~right_reduced)
    trick2 = F.relu((conf_reduced - conf_full.detach()) * both_wrong.to(gain.dtype) - eps)
    return trick1 + trick2


def bb_hinge(conf_full: torch.Tensor, conf_reduced: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """§25.2 BB form: ``max(0, Σ_i (conf(z_{−r,i}) − conf(z_i)))`` (``mean``: the batch mean inside)."""
    gain = conf_reduced - conf_full
    return F.relu(gain.sum() if reduction == "sum" else gain.mean())


# --------------------------------------------------------------------------------------------- method


class CMLParams(Params):
    lam: float = Field(
        default=0.1, ge=0, description="λ of L = L_CE + λ R (§25.5: [CML] β/100 = 0.1; BB lam)"
    )
    eps: float = Field(default=0.0, ge=0, description="ε margin of the official hinge (§25.2: [CML] 0)")
    form: Literal["official", "bb"] = Field(
        default="official", description="official per-sample hinge (both tricks) or BB's batch-sum hinge"
    )
    reduction: Literal["sum", "mean"] = Field(
        default="sum", description="reduce R over samples: sum ([CML], ×W under DDP, §25.9) or mean"
    )


@register_method("cml")
class CML(Method):
    fidelity = "official-code"
    Params = CMLParams
    requires = Requirements(min_modalities=2)

    def __init__(self, params: CMLParams, context: MethodContext) -> None:
        super().__init__(params, context)
        # same seed on every rank: the generators advance alike (module docstring, R7)
        self.generator = torch.Generator().manual_seed(6_007 * context.seed + 41)
        self.removed: int | None = None  # BB form: the epoch's removed modality (index)

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self.params.form == "bb":  # one removed modality per epoch, a global choice (§25.3, R7)
            self.removed = int(torch.randperm(len(model.modalities), generator=self.generator)[0])

    def _scale(self) -> float:
        """×W for sum reduction under DDP (§25.9): averaged gradients then equal a global-batch sum."""
        return float(self.runtime.world_size) if self.params.reduction == "sum" else 1.0

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        if self.params.form == "bb":
            return self._bb_step(model, features, batch.labels)
        return self._official_step(model, features, batch.labels)

    def _official_step(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> StepOutput:
        p = self.params
        keep = nested_keep_masks(labels.numel(), len(features), self.generator)  # (M, b, M), level 0 = all
        logits = [model.fuse(features)] + [model.fuse(removed_features(features, k)) for k in keep[1:]]
        ce = torch.stack([F.cross_entropy(z, labels) for z in logits]).mean()  # L_CE = mean_k CE(z^k)
        confs = [confidence(z) for z in logits]
        reg = logits[0].new_zeros(())
        for (c_k, y_k), (c_next, y_next) in pairwise(confs):  # level k and k + 1
            per_sample = official_hinge(c_k, c_next, y_k == labels, y_next == labels, p.eps)
            reg = reg + (per_sample.sum() if p.reduction == "sum" else per_sample.mean())
        loss = ce + p.lam * self._scale() * reg  # §25.2 L = L_CE + λ R (×W, §25.9)
        return StepOutput(loss=loss, logs={"loss_ce": ce.detach(), "loss_calibration": reg.detach()})

    def _bb_step(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> StepOutput:
        p = self.params
        if self.removed is None:  # a step before any epoch start (direct calls): draw as an epoch would
            self.on_epoch_start(model, 0)
        keep = torch.ones(labels.numel(), len(features), dtype=torch.bool)
        keep[:, self.removed] = False
        full, reduced = model.fuse(features), model.fuse(removed_features(features, keep))
        ce = 0.5 * (F.cross_entropy(full, labels) + F.cross_entropy(reduced, labels))
        reg = bb_hinge(confidence(full)[0], confidence(reduced)[0], p.reduction)
        loss = ce + p.lam * self._scale() * reg
        return StepOutput(loss=loss, logs={"loss_ce": ce.detach(), "loss_calibration": reg.detach()})

    # ---- state kept across steps: the generator and the BB form's removed modality
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "removed": self.removed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.removed = state["removed"]
