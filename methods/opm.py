"""``opm``: on-the-fly prediction modulation (Wei, Hu, Du, Wen, TPAMI 2024, "On-the-fly modulation for
balanced multi-modal learning"; spec ``../shared/spec/methods.md`` §7.1, §7.2, defaults §18).

Every step after warm-up estimates how far each modality leads from sliced unimodal scores computed with a
*detached* copy of the fusion head (§7.1): ``t^m = f^m sg(W_m)^T + sg(c)/M`` for the concat head (for a
``sum`` head each branch's own layer with its full bias, as OGM-GE's §6.1 step 2), and
``P_m = Σ_i softmax(t^m_i)[y_i]``. The leading modality gets a drop probability (§7.2)
``q_m = q_base (1 + λ tanh(relu(P_m / P_other − 1))) ∈ [0, 1]``, the others 0. With probability ``p_exe``
per batch each sample keeps modality ``m`` with probability ``1 − q_m``; kept features are rescaled by
``1/(1 − θ)``, ``θ = Σ_m d_m q_m / Σ_m d_m``, samples left without any modality are removed, and the loss
is the fused cross-entropy on the rest. Warm-up epochs (default 6: epochs 0-5) and epochs after
``modulation_ends`` are plain joint training; evaluation never drops (the fusion head on all features).

Randomness (the per-batch ``p_exe`` draw and the per-sample keep masks) comes from a generator the method
owns, seeded from the run's seed and kept in ``state_dict``, so a resumed run draws exactly what the
uninterrupted one would. The seed is the same on every rank and every rank draws the same amount (equal
per-rank batch sizes), so the generators stay identical across ranks: the execute decision is one global
choice (spec §20.4 R7), and every rank applies the *same* per-sample masks to its *different* samples.
That is a departure from R7's "per-sample randomness stays per rank", accepted because the masks are
still independent of the samples they hit (statistically the same drop), and it keeps the method state
bitwise equal across replicas.

Departures from the official code (``GeWu-Lab/BML_TPAMI2024``, spec §0.1):

* Under data parallelism the scores ``P_m`` are summed over ranks before ``q`` is formed (spec §20.4 R2
  default), so ``q`` equals that of a single process on the global batch; ``local_stats=True`` keeps the
  per-rank scores instead. The official code runs on one process.
* The random draws come from a method-owned, checkpointed generator shared by all ranks (above) rather
  than a global random stream, so that a resumed run and every replica draw identically.
* More than two modalities (the official code has two): the BalanceBenchmark rule
  ``ρ_m = tanh(relu(P_m / Σ_{l≠m} P_l − 1))`` [BB], which for M = 2 is the official rule.
* The ``sum`` fusion head is accepted besides concat (its shares are its branches, each with its full
  bias), and any other decomposable head through its ``modality_logits`` with detached parameters.
* Under data parallelism the cross-entropy is the mean over the rank's kept samples (the gradients are
  then averaged over ranks); with M = 2 no sample is ever removed (only one modality has ``q > 0``).
* ``modulation_ends`` (inclusive, None: to the end) bounds the window as in §6.1; the harness default runs
  it to the end of training (§7.2 "window to the end").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.fusion import ConcatFusion, SumFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method, without_unimodal_heads

# --------------------------------------------------------------------------------------- functional core


class _SharesOf(nn.Module):
    """Wraps a fusion head so ``torch.func.functional_call`` can run its ``modality_logits``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.head.modality_logits(features)


def detached_scores(fusion: nn.Module, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """§7.1: t^m = f^m sg(W_m)^T + sg(c)/M (concat), or sg(U_m) f^m + sg(e_m) (sum); no gradient reaches
    the head through them (the features keep theirs)."""
    if isinstance(fusion, ConcatFusion):
        weight, bias = fusion.linear.weight.detach(), fusion.linear.bias.detach()
        share_bias = bias / len(fusion.modalities)
        shares, start = {}, 0
        for m in fusion.modalities:
            stop = start + fusion.feature_dims[m]
            shares[m] = F.linear(features[m], weight[:, start:stop], share_bias)
            start = stop
        return shares
    if isinstance(fusion, SumFusion):
        return {
            m: F.linear(features[m], fusion.branches[m].weight.detach(), fusion.branches[m].bias.detach())
            for m in fusion.modalities
        }
    wrapper = _SharesOf(fusion)  # another decomposable head: its own shares, with detached parameters
    detached = {name: p.detach() for name, p in wrapper.named_parameters()}
    return torch.func.functional_call(wrapper, detached, (features,))


def modality_scores(shares: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """§7.1: P_m = Σ_i softmax(t^m_i)[y_i] (a batch sum), shape (M,), detached."""
    rows = torch.arange(labels.numel(), device=labels.device)
    return torch.stack([F.softmax(s.detach().float(), dim=1)[rows, labels].sum() for s in shares.values()])


def drop_probabilities(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """§7.2: ρ_m = tanh(relu(P_m / Σ_{l≠m} P_l − 1)); q_m = q_base (1 + λ ρ_m) if ρ_m > 0 else 0, in [0, 1].

    For M = 2 the denominator is the other modality's P (the official rule); for M > 2 it is the sum of
    the others' [BB]."""
    scores = scores.detach().double().cpu()
    others = (scores.sum() - scores).clamp_min(torch.finfo(torch.float64).tiny)
    rho = torch.tanh(torch.relu(scores / others - 1.0))
    q = torch.where(rho > 0, q_base * (1.0 + lam * rho), torch.zeros_like(rho))
    return q.clamp(0.0, 1.0)


def drop_features(
    features: dict[str, torch.Tensor], q: torch.Tensor, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """§7.2: κ_{i,m} ~ Bernoulli(1 − q_m), f̂^m_i = κ_{i,m} f^m_i / (1 − θ), θ = Σ_m d_m q_m / Σ_m d_m.

    ``q`` follows the order of ``features``; the keep masks are drawn on the CPU from ``generator`` (one
    ``(b, M)`` uniform draw). Returns the dropped features (all rows) and the mask of the samples that keep
    at least one modality."""
    names = list(features)
    first = features[names[0]]
    q = q.detach().double().cpu()
    uniform = torch.rand((first.shape[0], len(names)), generator=generator, dtype=torch.float64)
    keep = uniform < (1.0 - q)[None, :]  # (b, M)
    dims = torch.tensor([features[m].shape[1] for m in names], dtype=torch.float64)
    theta = float((dims * q).sum() / dims.sum())
    scale = 1.0 / (1.0 - theta) if theta < 1.0 else 0.0  # θ = 1 only when every feature is dropped
    keep = keep.to(first.device)
    dropped = {
        m: features[m] * (keep[:, k : k + 1].to(features[m].dtype) * scale) for k, m in enumerate(names)
    }
    return dropped, keep.any(dim=1)


# --------------------------------------------------------------------------------------------- method


class OPMParams(Params):
    q_base: float = Field(default=0.5, ge=0, le=1, description="q_base of §7.2 (BML train_opm.sh)")
    lam: float = Field(default=0.5, ge=0, description="λ of §7.2: q = q_base (1 + λ ρ)")
    p_exe: float = Field(default=0.7, ge=0, le=1, description="probability that a batch is dropped")
    warmup_epochs: int = Field(default=6, ge=0, description="plain joint epochs first (§7.2: epochs 0-5)")
    modulation_ends: int | None = Field(
        default=None, ge=0, description="last modulated epoch, inclusive (None: to the end)"
    )
    local_stats: bool = Field(
        default=False, description="use per-rank scores P under DDP instead of all-reduced ones (§20.4 R2)"
    )


@register_method("opm")
class OPM(Method):
    fidelity = "official-code"
    Params = OPMParams
    requires = Requirements(min_modalities=2, decomposable_fusion=True)

    def __init__(self, params: OPMParams, context: MethodContext) -> None:
        super().__init__(params, context)
        # same seed on every rank: the generators advance alike (module docstring)
        self.generator = torch.Generator().manual_seed(7_919 * context.seed + 29)

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    def modulating(self, epoch: int) -> bool:
        p = self.params
        return epoch >= p.warmup_epochs and (p.modulation_ends is None or epoch <= p.modulation_ends)

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        labels = batch.labels
        if not self.modulating(epoch):  # warm-up (§7.2) and after the window: plain joint training
            loss = F.cross_entropy(model.fuse(features), labels)
            return StepOutput(loss=loss, logs={"loss_fused": loss.detach()})

        p = self.params
        scores = modality_scores(detached_scores(model.fusion, features), labels)  # §7.1
        if not p.local_stats:
            scores = self.runtime.all_reduce_sum(scores)  # q as a single process on the global batch (R2)
        q = drop_probabilities(scores, p.q_base, p.lam)
        execute = bool(torch.rand((), generator=self.generator) < p.p_exe)  # identical on every rank
        logs = {f"q_{m}": float(v) for m, v in zip(model.modalities, q, strict=True)}
        if execute:
            features, kept = drop_features(features, q, self.generator)
            features = {m: f[kept] for m, f in features.items()}
            labels = labels[kept]
            kept_fraction = float(kept.float().mean())
        else:
            kept_fraction = 1.0
        logits = model.fuse(features)
        # no sample left (every modality dropped everywhere): a zero loss that is still part of the graph
        loss = F.cross_entropy(logits, labels) if labels.numel() else logits.sum() * 0.0
        logs.update(loss_fused=loss.detach(), drop_executed=float(execute), kept_fraction=kept_fraction)
        return StepOutput(loss=loss, logs=logs)

    # ---- state kept across steps: the generator (checkpointed so resume draws what the full run did)
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
