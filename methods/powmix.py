"""``powmix``: PowMix (Georgiou, Avrithis, Potamianos, IEEE/ACM TASLP 2024, arXiv 2312.12334), the
embedding-space mixing baseline of MIDAS §4.4 / Table 3, as proposed in spec ``../shared/spec/methods.md``
§12 (defaults §18).

PowMix is an embedding-space regulariser applied before fusion that mixes each modality with itself
(text with text, audio with audio) and has five components. The spec reconstructs them on top of MultiMix
(many mixed examples per batch, each a Dirichlet-weighted combination of batch rows); per step:

1. *varying number of mixed examples*: ``n ~ U{⌈n_min_ratio·b⌉, …, ⌊n_max_ratio·b⌋}`` (default b/2 … 2b);
2. *mixing factors*: for mixed example k and modality m, ``λ^{k,m}`` on the simplex over the batch, a
   symmetric Dirichlet over a random subset of ``r`` rows of the batch (zero weight elsewhere);
3. *mixing-factor re-weighting* (the "Pow"): ``λ ← λ^ρ / Σ_i λ_i^ρ`` (ρ > 1 sharpens toward one row);
4. *anisotropic mixing*: an independent ``λ^{k,m}`` per modality (one shared subset per k, different
   weights per modality); *dynamic mixing*: ``r ~ U{2, …, r_max}`` and the concentration
   ``α ~ U[α_lo, α_hi]`` drawn anew every step;
5. *cross-modal label mixing*: ``f̃^{k,m} = Σ_i λ_i^{k,m} f_i^m``, target
   ``ỹ^k = (1/M) Σ_m Σ_i λ_i^{k,m} onehot(y_i)`` and ``L = CE(g_f(f), y) + CEsoft(g_f([f̃^{k,1}; …]), ỹ)``.

Evaluation: no mixing, the plain fused logits (the ``Method`` default).

Fidelity ``reconstructed``: there is no public code (the paper promises it "coming soon") and the spec
was written from the abstract alone, so every component's exact form is the spec's [UNVERIFIED]
proposal; flag every PowMix number as a re-implementation from the abstract.

Departures from the paper (there is no code; what we could not take from it):

* The five components follow the spec's reading of the abstract, built on MultiMix; the paper's own
  equations were not available to the spec, so the forms above are ours, not the authors'.
* The values of ``r_max`` (4), ``[α_lo, α_hi]`` ([0.5, 2]) and ρ (2) are our choices [inferred]: the spec
  gives the forms but no values, and neither does MIDAS. ``n`` ∈ [b/2, 2b] is the spec's default.
* Anisotropic mixing keeps one random subset of rows per mixed example and draws the weights on it
  independently per modality, so every modality of a mixed example mixes the same samples (spec §12.4
  says only "different weights").
* One ``r`` and one ``α`` per step (the spec's "per step"), not per mixed example.
* The clean and the mixed loss are summed with weight ``mix_weight`` = 1 (spec §12.5); the mixed loss
  is the mean over the n mixed examples.
* Dirichlet draws are normalised Gamma variates from a method-owned CPU ``torch.Generator`` seeded from
  ``context.seed`` and kept in ``state_dict``. Under data parallelism every rank holds the same generator
  and draws the same number of values per step (equal local batch sizes), so the state is identical on
  every rank (methods-more §20.4 R6) and each rank mixes its own batch with the shared draws (R7).
* The model's unimodal heads are not trained (left out of the optimiser, as in ``joint``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method, seeded_generator, without_unimodal_heads
from .mixup import sample_dirichlet, soft_cross_entropy

# --------------------------------------------------------------------------------------- functional core


def mixed_count_range(batch_size: int, n_min_ratio: float, n_max_ratio: float) -> tuple[int, int]:
    """§12 (1): the inclusive range of n, ⌈n_min_ratio·b⌉ … ⌊n_max_ratio·b⌋, at least one example."""
    low = max(1, math.ceil(n_min_ratio * batch_size))
    return low, max(low, math.floor(n_max_ratio * batch_size))


def draw_mixed_count(
    batch_size: int, n_min_ratio: float, n_max_ratio: float, generator: torch.Generator
) -> int:
    """§12 (1): n ~ U{n_min, …, n_max} mixed examples this step."""
    low, high = mixed_count_range(batch_size, n_min_ratio, n_max_ratio)
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def draw_dynamic_mixing(
    r_max: int, alpha_low: float, alpha_high: float, generator: torch.Generator
) -> tuple[int, float]:
    """§12 (4), dynamic mixing: subset size r ~ U{2, …, r_max} and concentration α ~ U[α_lo, α_hi]."""
    r = int(torch.randint(2, r_max + 1, (1,), generator=generator))
    u = float(torch.rand(1, generator=generator, dtype=torch.float64))
    return r, alpha_low + (alpha_high - alpha_low) * u


def draw_subsets(
    num_mixed: int, batch_size: int, subset_size: int, generator: torch.Generator
) -> torch.Tensor:
    """§12 (2): for every mixed example a uniformly random subset of ``subset_size`` distinct rows, (n, r)."""
    return torch.rand(num_mixed, batch_size, generator=generator).argsort(1)[:, :subset_size]


def power_reweight(weights: torch.Tensor, power: float) -> torch.Tensor:
    """§12 (3): λ ← λ^ρ / Σ_i λ_i^ρ over the last dimension (ρ = 1 leaves λ unchanged)."""
    if power == 1.0:
        return weights
    powered = weights.pow(power)
    total = powered.sum(-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > 0, powered / total.clamp_min(torch.finfo(weights.dtype).tiny), uniform)


def scatter_weights(subsets: torch.Tensor, weights: torch.Tensor, batch_size: int) -> torch.Tensor:
    """§12 (2): the subset weights (…, n, r) as dense mixing vectors over the batch (…, n, b), zero
    outside each example's subset; every row still sums to one."""
    dense = torch.zeros(*weights.shape[:-1], batch_size, dtype=weights.dtype)
    index = subsets.expand(*weights.shape[:-2], *subsets.shape)
    return dense.scatter(-1, index, weights)


def draw_mixing_weights(
    num_modalities: int,
    num_mixed: int,
    batch_size: int,
    subset_size: int,
    concentration: float,
    power: float,
    anisotropic: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """§12 (2)-(4): λ^{k,m} for every modality m and mixed example k, shape (M, n, b), float32.

    One subset of rows per mixed example; Dirichlet(α) weights on it, independently per modality when
    ``anisotropic`` (else one draw shared by all modalities); then the power re-weighting."""
    r = min(subset_size, batch_size)
    subsets = draw_subsets(num_mixed, batch_size, r, generator)
    draws = num_modalities if anisotropic else 1
    weights = power_reweight(sample_dirichlet(concentration, (draws, num_mixed, r), generator), power)
    dense = scatter_weights(subsets, weights, batch_size)
    return dense.expand(num_modalities, -1, -1).float()


def mix_embeddings(features: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """§12 (5): f̃^{k,m} = Σ_i λ_i^{k,m} f_i^m, modality m with its own weights ``weights[m]`` (n, b)."""
    out = {}
    for k, (m, f) in enumerate(features.items()):
        w = weights[k].to(f)
        out[m] = (w @ f.reshape(f.shape[0], -1)).reshape(w.shape[0], *f.shape[1:])
    return out


def cross_modal_label_mixing(weights: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """§12 (5): ỹ^k = (1/M) Σ_m Σ_i λ_i^{k,m} onehot(y_i), shape (n, C); rows sum to one."""
    onehot = F.one_hot(labels, num_classes).float()
    return (weights.to(onehot) @ onehot).mean(0)


# --------------------------------------------------------------------------------------------- method


class PowMixParams(Params):
    n_min_ratio: float = Field(default=0.5, gt=0, description="§12 (1): at least ⌈ratio·b⌉ mixed examples")
    n_max_ratio: float = Field(default=2.0, gt=0, description="§12 (1): at most ⌊ratio·b⌋ mixed examples")
    dynamic_mixing: bool = Field(default=True, description="§12 (4): draw r and α anew every step")
    r_max: int = Field(default=4, ge=2, description="§12 (4): r ~ U{2, …, r_max} rows per mixed example")
    alpha_low: float = Field(default=0.5, gt=0, description="§12 (4): α ~ U[alpha_low, alpha_high]")
    alpha_high: float = Field(default=2.0, gt=0, description="§12 (4): α ~ U[alpha_low, alpha_high]")
    subset_size: int | None = Field(
        default=None, ge=1, description="§12 (2), without dynamic mixing: r (None: the whole batch)"
    )
    alpha: float = Field(default=1.0, gt=0, description="§12 (2), without dynamic mixing: Dirichlet α")
    power: float = Field(default=2.0, gt=0, description="§12 (3): ρ of λ^ρ / Σ λ^ρ (1: no re-weighting)")
    anisotropic: bool = Field(default=True, description="§12 (4): independent λ per modality")
    mix_weight: float = Field(default=1.0, ge=0, description="§12 (5): L = CE(clean) + w · L_mix")

    @model_validator(mode="after")
    def _ranges(self) -> PowMixParams:
        if self.n_min_ratio > self.n_max_ratio:
            raise ValueError(f"n_min_ratio {self.n_min_ratio} exceeds n_max_ratio {self.n_max_ratio}")
        if self.alpha_low > self.alpha_high:
            raise ValueError(f"alpha_low {self.alpha_low} exceeds alpha_high {self.alpha_high}")
        return self


@register_method("powmix")
class PowMix(Method):
    fidelity = "reconstructed"
    Params = PowMixParams
    # §18: "§12 proposal, same" on every dataset; the sources give no per-dataset values, so none differ.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, params: PowMixParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.generator = seeded_generator(context.seed, salt=13)

    def draw(self, batch_size: int, num_modalities: int) -> tuple[torch.Tensor, dict[str, float]]:
        """This step's mixing weights (M, n, b) and what was drawn (all from the method's generator)."""
        p = self.params
        n = draw_mixed_count(batch_size, p.n_min_ratio, p.n_max_ratio, self.generator)
        if p.dynamic_mixing:
            r, alpha = draw_dynamic_mixing(p.r_max, p.alpha_low, p.alpha_high, self.generator)
        else:
            r, alpha = p.subset_size or batch_size, p.alpha
        weights = draw_mixing_weights(
            num_modalities, n, batch_size, r, alpha, p.power, p.anisotropic, self.generator
        )
        return weights, {
            "mixed_per_row": n / batch_size,
            "subset_size": float(min(r, batch_size)),
            "alpha": alpha,
        }

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders and fusion head; the unimodal heads take no part in the loss."""
        return without_unimodal_heads(model)

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        labels = batch.labels
        features = model.encode(batch.inputs)
        loss_clean = F.cross_entropy(model.fuse(features).float(), labels)
        weights, drawn = self.draw(labels.numel(), len(features))
        weights = weights.to(labels.device)
        mixed_logits = model.fuse(mix_embeddings(features, weights))
        targets = cross_modal_label_mixing(weights, labels, self.context.num_classes)
        loss_mixed = soft_cross_entropy(mixed_logits, targets)
        loss = loss_clean + self.params.mix_weight * loss_mixed
        logs = {"loss_fused": loss_clean.detach(), "loss_mixed": loss_mixed.detach(), **drawn}
        return StepOutput(loss=loss, logs=logs)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
