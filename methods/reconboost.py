"""``reconboost``: boosting for modality reconcilement (Hua, Xu, Bao, Yang, Huang, ICML 2024, "ReconBoost:
Boosting Can Achieve Modality Reconcilement"; spec ``../shared/spec/methods-more.md`` §28, defaults §32).

The model is an additive ensemble with one **shared MLP head** ``h = Linear(d, 256) → ReLU → Linear(256, C)``
(a method module; every encoder must give the same width d) and a learnable scalar ``β`` (``beta_init``):
``F(x) = β Σ_{m ∈ E} h(f^m)`` over the ensemble's members ``E`` (§28.2 architecture). Training runs in
*stages*, each ``phase1_epochs + phase2_epochs`` epochs (one epoch = one pass); stage t trains the learner
of ``m_t = modalities[t mod M]`` (the dataset's order, audio first in the official schedule):

* **Phase 1** (boosting, ``phase1_epochs`` passes): only ``φ_{m_t}`` and ``h`` learn, on
  ``ℓ_i = −(w1 − w2 q_{i,y_i}) / C · log p_{i,y_i}`` (§28.2), ``p = softmax(h(f^{m_t}))``,
  ``q = softmax(sg(β Σ_{k ∈ E, k ≠ m_t} h(f^k)))`` from the other members, computed without gradient and,
  by default (``others_train_mode``), with their encoders in train mode as the official code (their
  BatchNorm running statistics update); ``q_y := 1`` while no other member exists (stage 0, §28.2).
  The other encoders and β get no gradient, so the optimiser leaves them (and their weight decay) alone.
* **Phase 2** (correction, ``phase2_epochs`` passes): ``CE(β Σ_{k ∈ E} h(f^k), y)``: every member's
  encoder, ``h`` and β learn.
* **Ensemble membership** (``ensemble_start``): ``empty`` (default; the official code from scratch) — a
  modality's learner joins ``E`` at its first stage (its phase 1 reads only the members before it, as the
  official ``add`` after phase 1), so for M = 2 stage 0 trains and predicts with the first modality alone
  and ``E`` is every modality from stage 1 on; ``full`` — every learner is a member from stage 0 (the
  official ``--use_pretrain`` layout, which adds the pretrained learners before stage 0; stage 0's ``q`` then
  comes from the other learners, not ``q_y = 1``).
* **Optimiser re-creation** (§28.3): the official code builds a fresh SGD at every phase start;
  here the run's one ``main`` optimiser forgets its momentum (``runtime.reset_optimizer_state``) in
  ``on_epoch_start`` of each phase's first epoch. The decision is a function of the epoch number alone,
  so a run resumed at a phase boundary resets exactly where the uninterrupted run did, and one resumed
  mid-phase keeps the checkpointed momentum.
* **Evaluation**: ``argmax β Σ_{m ∈ E} h(f^m)``, E of the stage of the last epoch started (method state,
  so ``best.pt`` predicts with its own stage's members). ``coalition_logits`` sums over the kept members
  only (a zeroed feature would still add ``h(0)``); no member kept gives zero logits.

Logs: ``loss_boost``, ``q_true`` (mean ``q_y``) and, from stage 1, ``ga`` (phase 1); ``loss_ensemble``
(phase 2); per epoch ``method/stage``, ``method/phase``, ``method/modality`` (index of ``m_t``),
``method/ensemble_size`` and ``method/beta``. ``ga`` is the official consistency term, the MSE over
``B × C`` between ``softmax(h(f^{m_t}))`` and ``softmax(h(f^{m_{t−1}}))`` (the previous stage's learner,
without β). The official code adds ``α · ga`` to the loss with both arguments detached, so it has no
gradient (§28.2): it is only logged here.

Params (§28.5 harness row, §32): ``w1`` 5, ``w2`` 1 (``--weight1`` / ``--weight2``), ``beta_init`` 1.0
(``--boost_rate``), ``hidden`` 256 (the official ``Head``), ``phase1_epochs`` 1 and ``phase2_epochs`` 1
(harness: 70 passes = 35 stages × (1 + 1); official CREMA-D: ``--epochs_per_stage 4``, ``--correct_epoch 4``),
``others_train_mode`` true (code-faithful; false runs the other encoders in eval mode), ``ensemble_start``
empty. The learning rate, momentum and weight decay are the run's ``optimizer:`` (§1: SGD 0.9, 1e-3,
1e-4) for both phases. The official ×0.1 every 30 stages becomes the protocol's StepLR(50, 0.1) on
passes: with one pass per phase, pass 50 starts stage 25, so it is ×0.1 from stage 25 (§28.5); nothing here
implements a schedule of its own.

Departures from the official code (``huacong/ReconBoost`` @ 14ab57a, ``train.py``, ``models/dynamic_net.py``):

* **From scratch** by default. The official CREMA-D command starts from unimodal-pretrained encoders
  (``--use_pretrain``); the harness trains every method from scratch (§28.5). §28.5's
  ``reconboost_pretrained`` flag is the harness option ``model.init_encoders`` (every method has it): it
  loads each encoder from a §4 ``unimodal`` run (checkpoint folder or MLflow run id) before training, and
  with ``ensemble_start=full`` (the pretrained run's membership) reproduces the official setting.
* **Budget and optimiser.** 35 stages of 1 + 1 passes instead of up to 1000 stages of 4 + 4 from
  pretrained encoders; the run's optimiser (lr 1e-3, wd 1e-4, one lr for both phases) instead of SGD with
  ``m_lr = e_lr = 0.01``, wd 5e-4; the decay is the protocol's StepLR (above), not ×0.1 per 30 stages.
* **One optimiser, reset per phase**, instead of two SGD optimisers built per phase: the same update,
  since a parameter without a gradient is skipped (no momentum, no weight decay) and the momentum of the
  rest starts from zero at each phase, as with a fresh optimiser.
* **No ``ga`` in the loss**: it is detached in the official code, so adding it changes the logged loss
  only; it is logged as ``ga``. The official code also runs the previous learner a second time for it (so
  its BatchNorm statistics update twice per step); here ``ga`` reuses the phase-1 forward of that learner.
* **Evaluation every epoch on validation** (model selection on validation accuracy, §1), not on the test
  set after every stage; the test loader keeps every sample (the official ``drop_last=True`` on the
  test loader drops up to 63, §28.7); the training loader keeps its last partial batch.
* **Stage-0 ``q``.** The official code feeds a random scalar ``c0`` (a 1-column tensor whose softmax is 1);
  here ``q_y = 1`` directly (the same loss, §28.2).
* **M > 2** (the official code has two learners): the stage's modality cycles through all M in order; ``q``
  sums the other members; ``ga`` compares with the learner of stage t − 1.
* **Under data parallelism** each rank's loss is the mean over its local batch and the trainer averages
  the gradients (one global step, §28.9); the schedule is a function of the epoch (identical on every
  rank, R7); the other encoders' BatchNorm statistics update per rank and are averaged by the trainer at
  the end of each epoch (R9).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

EnsembleStart = Literal["empty", "full"]
ENSEMBLE = "reconboost"  # the method module: shared head h and scale β

# --------------------------------------------------------------------------------------- functional core


@dataclass(frozen=True)
class Phase:
    """Where an epoch sits in the stage schedule (§28.2)."""

    stage: int  # t
    phase: int  # 1: boosting of one learner, 2: correction of the whole ensemble
    modality: str  # m_t = modalities[t mod M], the stage's learner
    starts_phase: bool  # the epoch is its phase's first (the official code re-creates the optimiser)


def phase_of(epoch: int, modalities: tuple[str, ...], phase1_epochs: int, phase2_epochs: int) -> Phase:
    """Stage t = ⌊epoch / (T1 + T2)⌋; its first T1 epochs are phase 1, the next T2 phase 2 (§28.2)."""
    stage, offset = divmod(epoch, phase1_epochs + phase2_epochs)
    return Phase(
        stage=stage,
        phase=1 if offset < phase1_epochs else 2,
        modality=modalities[stage % len(modalities)],
        starts_phase=offset in (0, phase1_epochs),
    )


def ensemble_members(stage: int, modalities: tuple[str, ...], start: EnsembleStart) -> list[str]:
    """E at stage t: the modalities whose learner has been scheduled so far, in dataset order (official
    ``add``: one learner per modality, never duplicated), or every modality with ``start='full'``."""
    if start == "full":
        return list(modalities)
    return list(modalities[: min(stage + 1, len(modalities))])


def boosting_loss(
    logits: torch.Tensor, labels: torch.Tensor, q_true: torch.Tensor, w1: float, w2: float
) -> torch.Tensor:
    """§28.2: mean_i −(w1 − w2 q_{i,y_i}) / C · log p_{i,y_i}, p = softmax(logits) (the official ``.mean(-1)``
    over the one-hot classes gives the 1/C). ``q_true`` must carry no gradient."""
    log_p_true = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-(w1 - w2 * q_true) * log_p_true / logits.shape[1]).mean()


def ga_term(current: torch.Tensor, previous: torch.Tensor) -> float:
    """The official (detached) consistency term: MSE over B × C of the two learners' softmax outputs."""
    return F.mse_loss(F.softmax(current.detach(), dim=1), F.softmax(previous.detach(), dim=1)).item()


class SharedHeadEnsemble(nn.Module):
    """The shared head ``h`` (Linear(d, hidden) → ReLU → Linear(hidden, C)) and the ensemble scale β."""

    def __init__(self, feature_dim: int, hidden: int, num_classes: int, beta_init: float) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def forward(self, features: dict[str, torch.Tensor], members: Iterable[str]) -> torch.Tensor:
        """F = β Σ_{m ∈ members} h(f^m) (§28.2); zero logits when ``members`` is empty."""
        logits = [self.head(features[m]) for m in members]
        if not logits:
            first = next(iter(features.values()))
            return first.new_zeros(first.shape[0], self.head[-1].out_features)
        return self.beta * torch.stack(logits).sum(0)


@contextmanager
def encoders_in_mode(model: MultimodalModel, modalities: Iterable[str], train: bool) -> Iterator[None]:
    """Temporarily put some encoders in train or eval mode (the other learners' phase-1 forward)."""
    previous = {m: model.encoders[m].training for m in modalities}
    for m in previous:
        model.encoders[m].train(train)
    try:
        yield
    finally:
        for m, was in previous.items():
            model.encoders[m].train(was)


# --------------------------------------------------------------------------------------------- method


class ReconBoostParams(Params):
    w1: float = Field(default=5.0, gt=0, description="§28.2 weight of −log p_y (--weight1; CREMA-D 5)")
    w2: float = Field(default=1.0, ge=0, description="§28.2 weight of q_y·log p_y (--weight2; CREMA-D 1)")
    beta_init: float = Field(default=1.0, description="initial ensemble scale β (--boost_rate 1.0)")
    hidden: int = Field(default=256, ge=1, description="hidden width of the shared MLP head (official 256)")
    phase1_epochs: int = Field(
        default=1, ge=1, description="T1: boosting passes per stage (harness 1; official 4)"
    )
    phase2_epochs: int = Field(
        default=1, ge=1, description="T2: correction passes per stage (harness 1; official 4)"
    )
    others_train_mode: bool = Field(
        default=True,
        description="phase 1: the other learners' no-grad forward in train mode (official; BN stats "
        "update); false: eval mode",
    )
    ensemble_start: EnsembleStart = Field(
        default="empty",
        description="empty: a learner joins at its first stage (official from scratch); full: all "
        "learners from stage 0 (official --use_pretrain layout)",
    )

    @model_validator(mode="after")
    def _weights(self) -> ReconBoostParams:
        if self.w2 > self.w1:
            raise ValueError("w2 must be ≤ w1, so that every sample's weight (w1 − w2·q_y)/C stays ≥ 0")
        return self


@register_method("reconboost")
class ReconBoost(Method):
    fidelity = "official-code"
    Params = ReconBoostParams
    requires = Requirements(min_modalities=2)  # the fusion head is not used: any head is accepted

    def __init__(self, params: ReconBoostParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.stage = 0  # the stage of the last epoch started: which members the prediction sums

    @property
    def label(self) -> str:
        return self.name if self.params.ensemble_start == "empty" else f"{self.name}[full]"

    def phase(self, epoch: int) -> Phase:
        p = self.params
        return phase_of(epoch, self.context.modalities, p.phase1_epochs, p.phase2_epochs)

    def members(self, stage: int) -> list[str]:
        return ensemble_members(stage, self.context.modalities, self.params.ensemble_start)

    # ---- modules and what is trained
    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        dims = model.feature_dims
        if len(set(dims.values())) > 1:
            raise ConfigError(
                f"model.encoders: reconboost applies one shared head to every modality's feature, which "
                f"needs equal widths, but the encoders give {dims}; give every encoder the same out_dim"
            )
        p = self.params
        width = next(iter(dims.values()))
        return {ENSEMBLE: SharedHeadEnsemble(width, p.hidden, model.num_classes, p.beta_init)}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders, h and β; not the fusion head nor the unimodal heads (never used)."""
        yield from model.encoders.parameters()
        yield from model.method_modules[ENSEMBLE].parameters()

    @staticmethod
    def ensemble(model: MultimodalModel) -> SharedHeadEnsemble:
        return model.method_modules[ENSEMBLE]

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        where = self.phase(epoch)
        if where.phase == 1:
            return self.boosting_step(model, batch, where)
        return self.correction_step(model, batch, where)

    def boosting_step(self, model: MultimodalModel, batch: Batch, where: Phase) -> StepOutput:
        """Phase 1 (§28.2): the stage's learner against the other members' no-grad prediction q."""
        ens, m = self.ensemble(model), where.modality
        current = ens.head(model.encode(batch.inputs, [m])[m])
        others = [k for k in self.members(where.stage) if k != m]
        other_logits: dict[str, torch.Tensor] = {}
        if others:
            with torch.no_grad(), encoders_in_mode(model, others, self.params.others_train_mode):
                other_logits = {k: ens.head(f) for k, f in model.encode(batch.inputs, others).items()}
                q = F.softmax(ens.beta * torch.stack(list(other_logits.values())).sum(0), dim=1)
                q_true = q.gather(1, batch.labels[:, None]).squeeze(1)
        else:
            q_true = torch.ones(batch.labels.shape[0], device=current.device)  # stage 0: q_y := 1
        loss = boosting_loss(current, batch.labels, q_true, self.params.w1, self.params.w2)
        logs = {"loss_boost": loss.detach(), "q_true": q_true.mean().detach()}
        previous = self.context.modalities[(where.stage - 1) % len(self.context.modalities)]
        if where.stage > 0 and previous in other_logits:  # the official ga, detached: logged only
            logs["ga"] = ga_term(current, other_logits[previous])
        return StepOutput(loss=loss, logs=logs)

    def correction_step(self, model: MultimodalModel, batch: Batch, where: Phase) -> StepOutput:
        """Phase 2 (§28.2): CE of the whole ensemble, every member, h and β trained."""
        members = self.members(where.stage)
        loss = F.cross_entropy(
            self.ensemble(model)(model.encode(batch.inputs, members), members), batch.labels
        )
        return StepOutput(loss=loss, logs={"loss_ensemble": loss.detach()})

    # ---- the epoch
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        where = self.phase(epoch)
        self.stage = where.stage
        if where.starts_phase:  # §28.3: a fresh optimiser per phase = its momentum forgotten
            self.runtime.reset_optimizer_state("main")

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        where = self.phase(epoch)
        return {
            "stage": float(where.stage),
            "phase": float(where.phase),
            "modality": float(self.context.modalities.index(where.modality)),
            "ensemble_size": float(len(self.members(where.stage))),
            "beta": float(self.ensemble(model).beta.detach()),
        }

    # ---- the evaluated prediction
    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """F = β Σ_{m ∈ E} h(f^m), E of the current stage."""
        return self.ensemble(model)(features, self.members(self.stage))

    def coalition_logits(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], kept: frozenset[str]
    ) -> torch.Tensor:
        """The sum over the kept members only: a zeroed feature would still add h(0)."""
        return self.ensemble(model)(features, [m for m in self.members(self.stage) if m in kept])

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
