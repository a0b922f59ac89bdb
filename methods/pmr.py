"""``pmr``: prototypical modal rebalance (Fan, Xu, Wang, Wang, Guo, CVPR 2023, "PMR: Prototypical modal
rebalance for multimodal learning"; spec ``../shared/spec/methods-more.md`` §30, which supersedes
``methods.md`` §15, with errata §34.2 and defaults §32), after the official
``fanyunfeng-bit/Modal-Imbalance-PMR/main_Prototype_grad.py``.

Prototypes (§30.3): per modality m and class c, ``P_{m,c}`` is the mean encoder feature of the class over
the first ``⌊N_b/10⌋`` batches (at least one) of a seeded shuffle of the training rows, encoded in eval mode
without gradients (``runtime.encode_rows``). They are computed before epoch 0 and after every epoch e:

    e = 0:  P ← P_new                       (no momentum at the end-of-epoch-0 recompute, §34.2)
    e ≥ 1:  P ← (1 − μ) P_new + μ P_old

Per step (§30.2), inside the modulation window: prototype logits ``ψ^m_{i,c} = −‖f^m_i − P_{m,c}‖₂`` (the
Euclidean distance, not squared; ``torch.cdist``), scores ``S_m = Σ_i softmax(ψ^m_i)[y_i]`` (batch sums,
detached), ``ρ = S_a / S_v``; ρ > 1: β = 0, γ = α; ρ < 1: β = α, γ = 0; ρ = 1: both 0, and

    L = CE(z, y) + β CE(ψ^a, y) + γ CE(ψ^v, y)

with the prototypes constants, so the prototype cross-entropy (PCE) reaches the slower modality's encoder
only. Outside the window ``L = CE(z, y)``. Evaluation: the plain fused logits.

Params: ``alpha`` (α = 1.0), ``momentum`` (μ = 0.2), both the official argparse defaults (§30.5, §32; BB:
0.6, 0.5; the official experiment log mostly μ = 0, α ∈ {2, 3, 5}); ``prototype_fraction`` (0.1: the first
10% of batches); ``modulation_starts`` (0) and ``modulation_ends`` (None = to the last epoch, inclusive;
harness: all epochs, §32); ``local_stats`` (False: S_m summed over ranks, §30.9 / R2). Logs per step:
``loss_fused``, ``pce_<m>``, ``score_<m>`` (S_m), ``coef_<m>`` (β, γ); per epoch ``prototype_classes``
(classes with a prototype) and ``prototype_rows`` (rows averaged).

Departures from the official code:

* The prototype subset is the first ``⌈k · N / N_b⌉`` rows of a permutation seeded from (run seed, pass),
  ``k = max(⌊N_b · 0.1⌋, 1)`` and ``N_b`` the epoch's batch count: the first k batches up to the last
  batch's padding (the code takes k whole batches of its shuffled loader, with training augmentation, §30.7:
  "seed it"); the rows are encoded without augmentation. Under data parallelism every rank encodes a share
  and the features are gathered (``encode_rows``, R5); rank 0's prototypes are then broadcast (R6).
* Absent classes (§30.3: the code's 0/0 = NaN): a class missing from a recompute keeps its previous
  prototype (no momentum step for it); a class with no prototype yet is excluded: its ψ is masked to −∞,
  and rows with that label are left out of the PCE and of the scores, until a recompute sees it. A NaN
  never enters the loss.
* ``S_m`` is all-reduced over ranks before the β/γ choice (§30.9), so every replica adds the same PCE terms
  (``local_stats=true`` keeps the per-rank sums).
* The distance is ``torch.cdist`` without the matrix-product shortcut, not the code's double loop (§30.7).
* Modality order: the first modality plays the code's audio (β), the second its visual (γ).
* M > 2 (not in the paper; the official code has two modalities): the PCE with weight α is added for every
  modality whose score is below the best one (for M = 2 exactly the official β/γ rule), not BB's OGM-style
  gradient scaling (§30.6).
* The paper's prototype entropy regulariser is not in the code and not implemented (§30.2).
* The model's unimodal heads are not trained (left out of the optimiser, as in ``joint``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
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

SUBSET_SALT = 0x93E  # seeds the prototype subset with (seed, pass)

# --------------------------------------------------------------------------------------- functional core


def prototype_subset(num_rows: int, num_batches: int, fraction: float, seed: int, stage: int) -> np.ndarray:
    """§30.3: the first ⌊N_b · fraction⌋ batches (≥ 1) of a shuffle seeded from (seed, stage), as the
    first ⌈k · N / N_b⌉ rows (k whole batches but for the last batch's padding). ``stage`` numbers the
    passes: 0 before epoch 0, e + 1 after epoch e, so the subset is re-drawn every pass."""
    batches = max(math.floor(num_batches * fraction), 1)
    count = min(num_rows, math.ceil(batches * num_rows / max(num_batches, 1)))
    return np.random.default_rng([seed, stage, SUBSET_SALT]).permutation(num_rows)[:count]


def class_means(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean feature (C, d) and a (C,) mask of the classes present; absent classes get 0, not 0/0."""
    onehot = F.one_hot(labels, num_classes).to(features.dtype)  # a matmul: deterministic, unlike index_add
    sums = onehot.T @ features
    counts = onehot.sum(dim=0)
    present = counts > 0
    return sums / counts.clamp_min(1.0)[:, None], present


def merge_prototypes(
    old: torch.Tensor | None,
    old_valid: torch.Tensor | None,
    new: torch.Tensor,
    new_present: torch.Tensor,
    momentum: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§30.3: P ← (1 − μ) P_new + μ P_old (``momentum`` μ; None: P ← P_new) for classes the recompute saw
    and that had a prototype; P_new for classes seen for the first time; the old prototype for classes not
    seen (absent-class guard). Returns (P, valid)."""
    if old is None or old_valid is None:
        return torch.where(new_present[:, None], new, torch.zeros_like(new)), new_present.clone()
    old = old.to(new.device)
    old_valid = old_valid.to(new.device)
    blended = new if momentum is None else (1.0 - momentum) * new + momentum * old
    merged = torch.where((new_present & old_valid)[:, None], blended, old)
    merged = torch.where((new_present & ~old_valid)[:, None], new, merged)
    return merged, old_valid | new_present


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """§30.2: ψ_{i,c} = −‖f_i − P_c‖₂ (b, C); classes without a prototype are masked to −∞."""
    distances = torch.cdist(features, prototypes.to(features), compute_mode="donot_use_mm_for_euclid_dist")
    return (-distances).masked_fill(~valid.to(features.device)[None, :], float("-inf"))


def prototype_score(psi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """§30.2: S = Σ_i softmax(ψ_i)[y_i], detached (a batch sum)."""
    rows = torch.arange(labels.numel(), device=labels.device)
    return F.softmax(psi.detach(), dim=1)[rows, labels].sum()


def pmr_coefficients(scores: Sequence[float], alpha: float) -> list[float]:
    """§30.2: the PCE weight per modality. M = 2: ρ = S_a / S_v > 1 gives (β, γ) = (0, α), ρ < 1 gives
    (α, 0), ρ = 1 gives (0, 0). M > 2 [ours]: α for every modality whose score is below the best."""
    best = max(scores)
    return [alpha if s < best else 0.0 for s in scores]


# --------------------------------------------------------------------------------------------- method


class PMRParams(Params):
    alpha: float = Field(default=1.0, ge=0, description="α, the PCE weight (official argparse 1.0; BB 0.6)")
    momentum: float = Field(
        default=0.2, ge=0, le=1, description="μ of P ← (1 − μ) P_new + μ P_old (official 0.2; BB 0.5)"
    )
    prototype_fraction: float = Field(
        default=0.1, gt=0, le=1, description="share of the epoch's batches averaged into the prototypes"
    )
    modulation_starts: int = Field(default=0, ge=0, description="first epoch with the PCE (0-based)")
    modulation_ends: int | None = Field(
        default=None, ge=0, description="last epoch with the PCE, inclusive; null = to the end"
    )
    local_stats: bool = Field(
        default=False, description="per-rank scores S_m under DDP instead of all-reduced ones (§20.4 R2)"
    )

    @model_validator(mode="after")
    def _window(self) -> PMRParams:
        check_window(self.modulation_starts, self.modulation_ends)
        return self


@register_method("pmr")
class PMR(Method):
    fidelity = "official-code"
    Params = PMRParams
    requires = Requirements(min_modalities=2)

    def __init__(self, params: PMRParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.prototypes: dict[str, torch.Tensor] | None = None  # (C, d_m) per modality, constants
        self.valid: torch.Tensor | None = None  # (C,) bool: classes with a prototype

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    def modulating(self, epoch: int) -> bool:
        return in_window(epoch, self.params.modulation_starts, self.params.modulation_ends)

    # ---- prototypes: before epoch 0 and after every epoch (§30.3)
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self.prototypes is None:
            self.update_prototypes(model, stage=0, momentum=None)

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        # §34.2: no momentum at the end-of-epoch-0 recompute, μ from epoch 1 on
        rows = self.update_prototypes(
            model, stage=epoch + 1, momentum=None if epoch == 0 else self.params.momentum
        )
        assert self.valid is not None
        return {"prototype_classes": float(self.valid.sum()), "prototype_rows": float(rows)}

    def update_prototypes(self, model: MultimodalModel, stage: int, momentum: float | None) -> int:
        """Recompute the prototypes from this pass's subset and merge them (§30.3); returns the rows used."""
        split = self.runtime.train_split
        if split is None:
            raise RuntimeError("pmr: the prototypes need a runtime bound to a run (its train split)")
        steps = self.context.steps_per_epoch
        rows = prototype_subset(len(split), steps, self.params.prototype_fraction, self.context.seed, stage)
        features, labels = self.runtime.encode_rows(model, rows)  # eval mode, no grad, gathered (R5)
        merged: dict[str, torch.Tensor] = {}
        valid = None
        for m in model.modalities:
            new, present = class_means(features[m], labels, self.context.num_classes)
            old = None if self.prototypes is None else self.prototypes[m]
            merged[m], valid = merge_prototypes(old, self.valid, new, present, momentum)
            merged[m] = self.runtime.broadcast(merged[m])  # rank 0's prototypes on every rank (R6)
        assert valid is not None  # from the labels alone: the same on every rank
        self.prototypes, self.valid = merged, valid
        return len(rows)

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        labels = batch.labels
        loss_fused = F.cross_entropy(model.fuse(features), labels)
        logs = {"loss_fused": loss_fused.detach()}
        if not self.modulating(epoch) or self.prototypes is None or self.valid is None:
            return StepOutput(loss=loss_fused, logs=logs)  # outside the window (or no prototypes): CE(z)

        labelled = self.valid.to(labels.device)[labels]  # rows whose class has a prototype
        y = labels[labelled]
        psi = {
            m: prototype_logits(features[m][labelled], self.prototypes[m], self.valid)
            for m in model.modalities
        }
        scores = torch.stack([prototype_score(psi[m], y) for m in model.modalities]).double().cpu()
        if not self.params.local_stats:
            scores = self.runtime.all_reduce_sum(scores)  # §30.9: the global batch's S_m (R2)
        coefs = pmr_coefficients(scores.tolist(), self.params.alpha)
        loss = loss_fused
        for m, coef, score in zip(model.modalities, coefs, scores.tolist(), strict=True):
            pce = F.cross_entropy(psi[m], y) if y.numel() else features[m].sum() * 0.0
            if coef > 0:  # §30.2: only the slower modality's PCE; prototypes are constants
                loss = loss + coef * pce
            logs.update({f"pce_{m}": pce.detach(), f"score_{m}": score, f"coef_{m}": coef})
        return StepOutput(loss=loss, logs=logs)

    # ---- state: the prototypes (identical on every rank, R6)
    def state_dict(self) -> dict[str, Any]:
        if self.prototypes is None or self.valid is None:
            return {"prototypes": None, "valid": None}
        return {
            "prototypes": {m: p.detach().cpu().clone() for m, p in self.prototypes.items()},
            "valid": self.valid.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["prototypes"] is None:
            self.prototypes, self.valid = None, None
            return
        device = self.runtime.device
        self.prototypes = {m: p.clone().to(device) for m, p in state["prototypes"].items()}
        self.valid = state["valid"].clone().bool().to(device)
