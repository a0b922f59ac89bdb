"""``remix``: Data Remixing (Ma, Chen, Deng, "Improving Multimodal Learning Balance and Sufficiency through
Data Remixing", ICML 2025; spec ``../shared/spec/methods-more.md`` §33 item 3), after the official code
[REMIX] ``MatthewMaxy/Remix_ICML2025`` (``train.py``, ``models/models.py``, ``scripts/run_train.sh``).

Warm-up (epochs ``e < E_warm``): every batch trains ``L = CE(z) + α Σ_m CE(u^m)`` with the fused logits
``z = g_f([f^1; …; f^M])`` and the model's separate unimodal heads ``u^m = g_m(f^m)`` (official
``train_epoch``: ``loss_av + alpha·loss_a + beta·loss_v``, α = β = 0.5).

Decoupling (official ``remix``), before every epoch ``e ≥ E_warm`` (here: at the end of epoch ``e − 1``, so
the first one ends epoch ``E_warm − 1``): the whole training set is encoded in eval mode without
augmentation (``runtime.encode_rows``; the official pass reads the training rows with the ``val``
transforms) and each row ``i`` goes to the modality whose unimodal prediction is **closest to uniform**,

    KL_m(i) = Σ_c p_c log₂(p_c · C),   p = clip(softmax(u^m_i), 1e-9, 1)   (official ``kl_divergence``)
    a(i) = argmin_m KL_m(i),  ties to the last such modality (official: audio only if KL_a < KL_v),

i.e. each modality trains on the rows it finds hardest. The assignment is redone before every epoch.

Reassembling (official ``special_train_epoch``): the epoch is one segment per modality (``EpochPlan``
segments: no batch mixes two), in ``segment_order`` (``reverse``: the last modality first, the official
video → audio on the harness's ``(audio, visual)`` order), each segment's rows shuffled by a generator
seeded from (run seed, epoch, segment). Every row appears once: the training set is not enlarged. A row
tagged with modality m has every other modality's features zeroed **after the encoders**
(official ``models.py``: ``a[:, :] = 0`` in ``video`` mode) and trains

    L_i = CE(z_i^{(m)}) + γ CE(u^m_i),   z^{(m)} = g_f([0; …; f^m; …; 0]),   γ = 1 (official gamma1/gamma2).

The loss is per row (warm-up rows untagged, remixed rows tagged), averaged over the batch, so any batch is
correct whatever it holds; for a single-segment batch it is the official ``mean CE(z) + γ mean CE(u^m)``.
A unimodal head no row of the batch uses is not called (its gradient stays ``None``, as in the official
step, where the other head's output is not in the loss). Evaluation: the fused logits of all features.

Params: ``warmup_epochs`` (10, official ``--warmup 10`` in ``run_train.sh``), ``warmup_weight`` (α = β =
0.5, official ``--alpha`` / ``--beta``), ``gamma`` (1.0, official ``--gamma1`` / ``--gamma2``),
``segment_order`` (``reverse``). No per-dataset defaults (the official script is CREMA-D only). Logs per
epoch (``method/…``, from the assignment): ``assigned_<m>`` (rows assigned to m) and ``kl_<m>`` (mean KL
to uniform, bits); per step ``loss_fused``, ``loss_unimodal`` (the weighted unimodal part) and
``remix_fraction`` (the share of tagged rows).

Departures from the official code:

* M ≥ 2 modalities (the official code has audio and video): the argmin over M KLs, ties to the last
  modality (the official tie rule for M = 2); one γ for every modality (the official two are both 1).
* The number of classes is the dataset's (the official KL hard-codes 6, CREMA-D's).
* The assignment lives in memory as method state (checkpointed; under data parallelism rank 0's is
  broadcast, §20.4 R5/R6) instead of CSV files re-read by a new dataset, and each subset is shuffled by a
  seeded generator (R7) instead of the global RNG. It is computed at the end of the previous epoch,
  after its scheduler step; nothing changes the parameters in between, so it equals the official
  start-of-epoch pass.
* ``warmup_epochs ≥ 1``: the assignment of epoch 0 would need a valuation before any training (the
  official ``--warmup 0`` values the untrained model); the loop's first hook is the end of epoch 0.
* The harness protocol (``methods.md`` §1: SGD lr 1e-3, wd 1e-4, 70 epochs, StepLR(50, 0.1), best-val
  selection) replaces the official Adam lr 5e-5, wd 1e-4, 60 epochs, StepLR(30, 0.1), selection on test.
* Batching is the loop's: a trailing one-row batch of a segment joins the one before it, and under data
  parallelism each segment is sharded and padded by wrap-around on its own.
* Any fusion head is accepted (zeroed features need no decomposition); the official uses concat.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

UNTAGGED = -1  # a row trained with the warm-up loss: all modalities, every unimodal head
PLAN_SALT = 0x2E81  # seeds each segment's shuffle with (seed, epoch, segment)
PROB_FLOOR = 1e-9  # the official clip of the probabilities before the log

# --------------------------------------------------------------------------------------- functional core


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(u) ‖ U_C) per row in bits, the probabilities clipped to [1e-9, 1] and not renormalised
    (official ``kl_divergence``); float64, as the official numpy computation."""
    p = torch.softmax(logits, dim=1).double().clamp(PROB_FLOOR, 1.0)
    return (p * torch.log2(p * logits.shape[1])).sum(dim=1)


def assign_rows(kl: torch.Tensor) -> torch.Tensor:
    """Each row's modality (N,) int64: the one of lowest KL (N, M), ties to the last (official
    ``KL_audio < KL_video`` → audio, else video)."""
    index = torch.arange(kl.shape[1], device=kl.device).expand_as(kl)
    lowest = kl == kl.min(dim=1, keepdim=True).values
    return torch.where(lowest, index, -1).max(dim=1).values


@torch.no_grad()
def unimodal_kl(
    model: MultimodalModel, features: dict[str, torch.Tensor], batch_size: int = 512
) -> torch.Tensor:
    """(N, M) KL to uniform of every row's unimodal prediction ``softmax(g_m(f^m))``, on the CPU."""
    columns = []
    for m, f in features.items():
        parts = [
            kl_to_uniform(model.unimodal_heads[m](f[s : s + batch_size]))
            for s in range(0, len(f), batch_size)
        ]
        columns.append(torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64))
    return torch.stack(columns, dim=1)


def build_plan(assignment: np.ndarray, order: list[int], seed: int, epoch: int) -> EpochPlan:
    """One segment per modality in ``order``: its rows shuffled by (seed, epoch, modality), tagged with
    the modality's index; every row once (no enlargement)."""
    rows, tags, ends = [], [], []
    for k in order:
        members = np.flatnonzero(assignment == k).astype(np.int64)
        members = np.random.default_rng([seed, epoch, PLAN_SALT, k]).permutation(members)
        rows.append(members)
        tags.append(np.full(len(members), k, dtype=np.int64))
        ends.append((ends[-1] if ends else 0) + len(members))
    return EpochPlan(np.concatenate(rows), np.concatenate(tags), np.asarray(ends))


def keep_tagged(features: dict[str, torch.Tensor], tags: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero, after the encoders, every modality of a tagged row but its own (official ``models.py``
    ``mode``); untagged rows keep all features. ``tags`` index the order of ``features``."""
    out = {}
    for k, (m, f) in enumerate(features.items()):
        keep = ((tags == UNTAGGED) | (tags == k)).reshape(-1, *([1] * (f.dim() - 1)))
        out[m] = torch.where(keep, f, torch.zeros_like(f))
    return out


def unimodal_weights(tags: torch.Tensor, num_modalities: int, gamma: float, warmup: float) -> torch.Tensor:
    """(b, M) weight of each row's unimodal CEs: α on every modality for an untagged (warm-up) row, γ on
    its own modality alone for a tagged one."""
    index = torch.arange(num_modalities, device=tags.device)
    own = (tags[:, None] == index[None, :]).float() * gamma
    untagged = (tags == UNTAGGED)[:, None].float()
    return untagged * warmup + (1 - untagged) * own


def remix_losses(
    model: MultimodalModel,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    tags: torch.Tensor,
    gamma: float,
    warmup_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE(z) on the kept features and Σ_m w_{i,m} CE(u^m_i), each (b,). A head no row weighs is
    not called, so its parameters get no gradient (as the official step's unused head)."""
    fused = F.cross_entropy(model.fuse(keep_tagged(features, tags)), labels, reduction="none")
    weights = unimodal_weights(tags, len(features), gamma, warmup_weight)
    unimodal = torch.zeros_like(fused)
    for k, (m, f) in enumerate(features.items()):
        rows = torch.nonzero(weights[:, k] > 0).squeeze(1)
        if len(rows) == 0:
            continue
        ce = F.cross_entropy(model.unimodal_heads[m](f[rows]), labels[rows], reduction="none")
        unimodal = unimodal.index_add(0, rows, weights[rows, k] * ce)
    return fused, unimodal


# --------------------------------------------------------------------------------------------- method


class RemixParams(Params):
    warmup_epochs: int = Field(
        default=10, ge=1, description="epochs of CE(z) + α Σ CE(u^m) before remixing (official --warmup 10)"
    )
    warmup_weight: float = Field(
        default=0.5, ge=0, description="α of each unimodal CE in warm-up (official --alpha = --beta = 0.5)"
    )
    gamma: float = Field(
        default=1.0, ge=0, description="γ of the row's own unimodal CE after warm-up (official --gamma1/2 1)"
    )
    segment_order: Literal["reverse", "forward"] = Field(
        default="reverse",
        description="modality subsets' order in an epoch: reverse = last modality first (official video, "
        "then audio), forward = the model's modality order",
    )


@register_method("remix")
class Remix(Method):
    fidelity = "official-code"
    Params = RemixParams
    requires = Requirements(min_modalities=2)

    def __init__(self, params: RemixParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.assignment: torch.Tensor | None = None  # each training row's modality (int64), for the next plan
        self.valued_epoch = -1

    # ---- the epoch: the plan from the last assignment, and the assignment itself
    def segment_order(self) -> list[int]:
        order = list(range(len(self.context.modalities)))
        return order[::-1] if self.params.segment_order == "reverse" else order

    def epoch_plan(self, epoch: int, default: EpochPlan) -> EpochPlan:
        if self.assignment is None or epoch < self.params.warmup_epochs:
            return default
        if len(self.assignment) != len(default.rows):
            raise ValueError(
                f"remix: assigned {len(self.assignment)} rows but the epoch has {len(default.rows)}"
            )
        return build_plan(self.assignment.numpy(), self.segment_order(), self.context.seed, epoch)

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        if epoch < self.params.warmup_epochs - 1:  # the first assignment is for epoch E_warm
            return {}
        kl = self.valuate(model)
        self.assignment = self.runtime.broadcast(assign_rows(kl))  # R5/R6: rank 0's on every rank
        self.valued_epoch = epoch
        metrics = {}
        for k, m in enumerate(model.modalities):
            metrics[f"assigned_{m}"] = float((self.assignment == k).sum())
            metrics[f"kl_{m}"] = float(kl[:, k].mean()) if len(kl) else 0.0
        return metrics

    def valuate(self, model: MultimodalModel) -> torch.Tensor:
        """(N, M) KL to uniform of the unimodal predictions over the training set (eval mode, no aug)."""
        split = self.runtime.train_split
        if split is None:
            raise RuntimeError("remix: the assignment needs a runtime bound to a run (its train split)")
        features, _ = self.runtime.encode_rows(model, np.arange(len(split)))
        return unimodal_kl(model, features, self.runtime.eval_batch_size)

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        if batch.tags is None:
            tags = torch.full_like(batch.labels, UNTAGGED)
        else:
            tags = batch.tags.to(batch.labels.device)
        p = self.params
        fused, unimodal = remix_losses(model, features, batch.labels, tags, p.gamma, p.warmup_weight)
        loss = (fused + unimodal).mean()
        logs = {
            "loss_fused": fused.mean().detach(),
            "loss_unimodal": unimodal.mean().detach(),
            "remix_fraction": float((tags != UNTAGGED).float().mean()),
        }
        return StepOutput(loss=loss, logs=logs)

    # ---- state: the assignment, so a resumed run rebuilds the same plan
    def state_dict(self) -> dict[str, Any]:
        return {
            "assignment": None if self.assignment is None else self.assignment.clone(),
            "valued_epoch": self.valued_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assignment = state["assignment"]
        self.assignment = None if assignment is None else assignment.clone().long().cpu()
        self.valued_epoch = int(state["valued_epoch"])
