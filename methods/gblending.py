"""``gblending``: gradient blending (Wang, Tran, Feiszli, CVPR 2020, "What makes training multi-modal
classification networks hard?"; spec ``../shared/spec/methods-more.md`` §26, defaults §32, open item §34.1.4).

The loss (§26.2, after the official ``facebookresearch/VMZ`` ``c2/lib/models/loss/loss_creator.py``) is a
weighted sum of the fusion head's CE and the CE of a separate unimodal head ``g_m`` on each pooled feature
(``model.unimodal_heads``), with one backward:

    L = w_f CE(z, y) + Σ_m w_m CE(u^m, y),     z = g_f([f^1; …; f^M]),  u^m = g_m(f^m)

Evaluation reads ``z`` only (the ``Method`` default). The weights come from probe trainings (§26.3), run in
``on_epoch_start``: for each branch k ∈ {1..M, f} a probe = ``copy.deepcopy`` of the current model (at
epoch 0: the initial parameters θ0), a fresh optimiser (``runtime.new_optimizer``) over the branch
(probe m: ``φ_m + g_m`` on ``CE(u^m)``; probe f: every encoder ``+ g_f`` on ``CE(z)``), trained
``probe_epochs`` = n epochs on seeded passes over the training rows (``runtime.train_batches``). Before and
after, mean CEs in eval mode over the probe's training rows (T) and the holdout (V) give

    ΔG_k = L^V_0 − L^V_n,    ΔO_k = (L^V_n − L^T_n) − (L^V_0 − L^T_0),
    w̃_k = max(ΔG_k, 0) / max(ΔO_k², 1e-6),    w = w̃ / Σ w̃   (Σ w̃ = 0: w_f = 1, the others 0)

(the paper's ``w_k ∝ ΔG_k / ΔO_k²`` with the spec's [inferred] guards). ``mode=offline`` estimates once, at
epoch 0 from θ0; ``mode=online`` re-estimates at epochs 0, S, 2S, … from the current model (BB's super-epoch).

Params (§26.5, §32 harness defaults): ``mode`` (offline; BB: online), ``super_epoch`` (S = 10, BB's value;
used by ``online``), ``probe_epochs`` (n = 10 [inferred]: BB's super-epoch), ``holdout`` (``val``: the harness
validation split, no gradient touches it, but it is also the model-selection split; ``train_carve``: a seeded
``carve_fraction`` = 10% of the training rows that the probes never train on; the main run still trains on
them). Logs per step ``loss_fused``, ``loss_<m>``; per epoch ``w_<m>``, ``w_fused``, ``delta_g_<k>``,
``delta_o_<k>`` (the latest estimate; §26.7: log ΔG and ΔO). Cost: offline (M+1)·n extra epochs (30 for
M = 2, n = 10); online about (M+2)× joint.

Fidelity ``reconstructed``: the official code only consumes fixed, command-line weights; the estimation
protocol (n, holdout, reference points, sign handling) is reconstructed from the paper and BB (§34.1.4).

Departures from the official code:

* The official code never estimates weights: they are constants (VMZ ``c2/tools/train_net.py:578–585``, CLI
  defaults audio 0, visual 0, AV 1), and its weighted-loss builder raises ``TypeError`` as released (§26.6).
  The estimation follows §26.3. Before the first estimate (reachable only outside a run: a run estimates
  in ``on_epoch_start`` of epoch 0, before its first step) the weights are those CLI defaults: fused only.
* Heads: the harness' fusion head ``g_f`` (§1: linear on the concatenation by default) instead of VMZ's
  two-hidden-layer MLP AV head; separate linear ``g_m`` as in VMZ (BB uses sliced logits ``s^m``, §26.6).
* Sign handling (§26.6): ``max(ΔG, 0)``, not BB's ``|g / o²|``, which turns a worsening validation loss into
  a positive weight; ``ΔO²`` floored at 1e-6 (a branch with ΔO = 0 does not divide by zero).
* Losses are mean CEs over whole row sets in eval mode (``runtime.encode_rows``, no augmentation), not BB's
  running sums of training-mode batch losses and sums over validation batches; the reference point is the
  probe's start, not after its first epoch (BB ``GBlending_trainer.py:334–355``).
* Probe m trains its own head on its own encoder, the quantity the main loss weights; BB trains it on the
  fused logits with the other inputs zeroed and then weights sliced logits (§26.6).
* Probe optimiser: the run's configured optimiser (§1) at its base lr, no lr schedule over the n probe epochs,
  and the run's ``train.grad_clip``; online probes therefore restart from the base lr, not the main run's
  decayed lr. Probe batches are seeded passes (seed from the run seed, the estimation epoch and the branch),
  not the main loader's order.
* The probes' dropout draws come from their own seeded stream (``torch.random.fork_rng`` seeded from the
  same probe seed, identical on every rank): the global RNG is restored afterwards, so the main run's
  draws, and the RNG state its checkpoints record, are those it would have without the probes, and each
  probe is a function of (model, seed) alone. A resumed run (re-estimating at S after loading the model)
  therefore repeats exactly what an uninterrupted one does.
* DDP (§26.9): the probes run in lockstep on every rank (gradients averaged with ``runtime.average_gradients``
  before each step; BatchNorm running statistics averaged after each probe epoch, as the trainer does for
  the main model); ``encode_rows`` gathers the features, so every rank measures the same losses, and rank
  0's (ΔG, ΔO) are broadcast anyway (R6). No DDP wrapper and no extra timeout: every rank does the same work.
* ``holdout=train_carve`` is the flag §26.3 names ``train_carve_10pct``; the carve is a seeded permutation of
  the training rows (same on every rank), and L^T is measured on the other 90%, on which the probes train.
* ``mode=online`` re-estimates for the whole run (BB's window 0–80 covers the harness' 70 epochs).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.format import SplitData
from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

FUSED = "fused"  # the fusion branch's key among the weights (the modalities' keys are their names)
DELTA_O_SQ_FLOOR = 1e-6  # §26.3 guard: w̃ = max(ΔG, 0) / max(ΔO², 1e-6)
PROBE_SALT = 0x6B1E  # seeds each probe's batches and dropout with (run seed, estimation epoch, branch)
CARVE_SALT = 0xCA7E  # seeds the train_carve holdout with the run seed

# --------------------------------------------------------------------------------------- functional core


def generalization_overfitting(
    train_before: float, val_before: float, train_after: float, val_after: float
) -> tuple[float, float]:
    """§26.3: (ΔG, ΔO) of one probe from its mean train/holdout CEs at its start (0) and end (n):
    ΔG = L^V_0 − L^V_n (how much the holdout loss fell), ΔO = O_n − O_0 with O = L^V − L^T (how much the
    generalisation gap grew)."""
    return val_before - val_after, (val_after - train_after) - (val_before - train_before)


def raw_blend_weight(delta_g: float, delta_o: float) -> float:
    """§26.3: w̃ = max(ΔG, 0) / max(ΔO², 1e-6); a branch whose holdout loss did not fall gets 0 (§26.7)."""
    return max(delta_g, 0.0) / max(delta_o * delta_o, DELTA_O_SQ_FLOOR)


def blend_weights(delta_g: Mapping[str, float], delta_o: Mapping[str, float]) -> dict[str, float]:
    """§26.3: the normalised weights w = w̃ / Σ w̃ per branch (modalities and ``fused``); when every w̃ is
    0, the fused branch alone (w_f = 1, the others 0)."""
    raw = {k: raw_blend_weight(delta_g[k], delta_o[k]) for k in delta_g}
    total = sum(raw.values())
    if total <= 0:
        return {k: 1.0 if k == FUSED else 0.0 for k in raw}
    return {k: v / total for k, v in raw.items()}


def fused_only(modalities: Sequence[str]) -> dict[str, float]:
    """w_f = 1, every w_m = 0: VMZ's command-line defaults and the all-zero fallback of §26.3."""
    return {**{m: 0.0 for m in modalities}, FUSED: 1.0}


def blended_loss(
    fused: torch.Tensor,
    unimodal: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    weights: Mapping[str, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """§26.2: L = w_f CE(z, y) + Σ_m w_m CE(u^m, y), and each CE (for the logs). Every term stays in the
    graph, a zero weight included, so one backward reaches every head."""
    parts = {FUSED: F.cross_entropy(fused, labels)}
    parts.update({m: F.cross_entropy(logits, labels) for m, logits in unimodal.items()})
    loss = sum(weights[k] * ce for k, ce in parts.items())
    return loss, parts  # type: ignore[return-value]


def carve_rows(num_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``holdout=train_carve``: (probe training rows, holdout rows), a seeded ``fraction`` of the training
    rows held out (at least one, at most all but one), both sorted; the same on every rank."""
    order = np.random.default_rng([seed, CARVE_SALT]).permutation(num_rows)
    size = min(max(round(fraction * num_rows), 1), num_rows - 1)
    return np.sort(order[size:]), np.sort(order[:size])


def probe_seed(seed: int, epoch: int, index: int) -> int:
    """One probe's seed (its batches and dropout) from the run seed, the estimation epoch and the branch."""
    return 1_000_003 * seed + 10_007 * epoch + 101 * index + PROBE_SALT


def branch_modalities(model: MultimodalModel, branch: str) -> list[str]:
    """The encoders a branch reads: its own modality, or all of them for the fused branch."""
    return list(model.modalities) if branch == FUSED else [branch]


def branch_parameters(model: MultimodalModel, branch: str) -> list[nn.Parameter]:
    """§26.3: what probe k trains: φ_m + g_m for a modality, every encoder + g_f for the fused branch."""
    if branch == FUSED:
        modules: list[nn.Module] = [*model.encoders.values(), model.fusion]
    else:
        modules = [model.encoders[branch], model.unimodal_heads[branch]]
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def branch_logits(model: MultimodalModel, branch: str, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """z = g_f(features) for the fused branch, u^m = g_m(f^m) for a modality."""
    return model.fuse(features) if branch == FUSED else model.unimodal_heads[branch](features[branch])


@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block on its own seeded global RNG stream (CPU, and the run's CUDA device), restoring the
    caller's state afterwards: the probes' dropout neither consumes nor depends on the main run's draws."""
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@dataclass(frozen=True)
class ProbeData:
    """Where the probes train and measure: training rows (None = the whole training split), the rows
    L^T is measured on, and the holdout split and rows L^V is measured on."""

    train_rows: np.ndarray | None
    measure_rows: np.ndarray
    holdout_split: SplitData
    holdout_rows: np.ndarray


# --------------------------------------------------------------------------------------------- method


class GBlendingParams(Params):
    mode: Literal["offline", "online"] = Field(
        default="offline",
        description="§26.3: offline: once from θ0 (harness); online: every super_epoch from the current one",
    )
    super_epoch: int = Field(
        default=10, ge=1, description="§26.3: S, online re-estimation at epochs 0, S, 2S, … (BB: 10)"
    )
    probe_epochs: int = Field(
        default=10, ge=1, description="§26.3: n, epochs each probe trains (BB's super-epoch) [inferred]"
    )
    holdout: Literal["val", "train_carve"] = Field(
        default="val",
        description="§26.3: the split L^V is measured on: validation split, or a carve of the training rows",
    )
    carve_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="holdout=train_carve: fraction of training rows held out (10%)"
    )


@register_method("gblending")
class GBlending(Method):
    fidelity = "reconstructed"
    Params = GBlendingParams
    requires = Requirements(min_modalities=2)  # separate heads g_m: any fusion head
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # §26.5: the same on CREMA-D and KS

    def __init__(self, params: GBlendingParams, context: MethodContext) -> None:
        super().__init__(params, context)
        if FUSED in context.modalities:
            raise ConfigError(f"data.name: method 'gblending' reserves the branch name {FUSED!r}")
        self.branches = (*context.modalities, FUSED)
        self.weights = fused_only(context.modalities)
        self.delta_g: dict[str, float] = {}
        self.delta_o: dict[str, float] = {}
        self.estimated_at = -1  # the epoch of the latest estimate (-1: none yet)

    @property
    def label(self) -> str:
        return self.name if self.params.mode == "offline" else f"{self.name}[online]"

    def estimates_at(self, epoch: int) -> bool:
        """§26.3: offline at epoch 0 only; online at epochs 0, S, 2S, …"""
        if self.params.mode == "offline":
            return epoch == 0
        return epoch % self.params.super_epoch == 0

    # ---- the step (§26.2)
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        loss, parts = blended_loss(model.fuse(features), model.unimodal(features), batch.labels, self.weights)
        logs = {f"loss_{k}": ce.detach() for k, ce in parts.items()}
        return StepOutput(loss=loss, logs=logs)

    # ---- the weights (§26.3)
    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self.estimates_at(epoch):
            self.estimate(model, epoch)

    def estimate(self, model: MultimodalModel, epoch: int) -> None:
        """Run every branch's probe from the current model and set the weights from their (ΔG, ΔO)."""
        data = self.probe_data()
        stats = [self.run_probe(model, branch, i, epoch, data) for i, branch in enumerate(self.branches)]
        shared = self.runtime.broadcast(torch.tensor(stats, dtype=torch.float64)).tolist()  # rank 0's (R6)
        self.delta_g = {k: g for k, (g, _) in zip(self.branches, shared, strict=True)}
        self.delta_o = {k: o for k, (_, o) in zip(self.branches, shared, strict=True)}
        self.weights = blend_weights(self.delta_g, self.delta_o)
        self.estimated_at = epoch

    def probe_data(self) -> ProbeData:
        train = self.runtime.train_split
        if train is None:
            raise RuntimeError("gblending's probes need a runtime bound to a run (its training split)")
        if self.params.holdout == "train_carve":
            rows, holdout = carve_rows(len(train), self.params.carve_fraction, self.context.seed)
            return ProbeData(rows, rows, train, holdout)
        val = self.runtime.val_split
        if val is None:
            raise RuntimeError("gblending holdout=val needs a runtime with a validation split")
        return ProbeData(None, np.arange(len(train)), val, np.arange(len(val)))

    def run_probe(
        self, model: MultimodalModel, branch: str, index: int, epoch: int, data: ProbeData
    ) -> tuple[float, float]:
        """§26.3 for one branch: copy the model, measure, train n epochs, measure; (ΔG, ΔO). The main
        model is only read (copied); the probe's randomness is its own seeded stream."""
        seed = probe_seed(self.context.seed, epoch, index)
        with isolated_rng(seed, self.runtime.device):
            probe = copy.deepcopy(model)
            for param in probe.parameters():
                param.grad = None
            before = self.probe_losses(probe, branch, data)
            self.train_probe(probe, branch, seed, data.train_rows)
            after = self.probe_losses(probe, branch, data)
        return generalization_overfitting(*before, *after)

    def train_probe(self, probe: MultimodalModel, branch: str, seed: int, rows: np.ndarray | None) -> None:
        """n epochs of CE on the branch's logits with a fresh optimiser of the run's settings (§26.3)."""
        params = branch_parameters(probe, branch)
        optimizer = self.runtime.new_optimizer(params)
        config = self.context.config
        clip = config.train.grad_clip if config is not None else None
        names = branch_modalities(probe, branch)
        probe.train()
        for k in range(self.params.probe_epochs):
            for batch in self.runtime.train_batches(epoch=k, seed=seed, rows=rows):
                logits = branch_logits(probe, branch, probe.encode(batch.inputs, names))
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(logits, batch.labels).backward(inputs=params)
                self.runtime.average_gradients(params)  # DDP: the probes stay identical on every rank
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
            self.runtime.average_normalization_stats(probe)  # as the trainer does after each epoch

    def probe_losses(self, probe: MultimodalModel, branch: str, data: ProbeData) -> tuple[float, float]:
        """(L^T, L^V): mean CEs of the branch's logits in eval mode, without gradients (§26.3)."""
        train = self.runtime.train_split
        return (
            self.mean_ce(probe, branch, train, data.measure_rows),  # type: ignore[arg-type]
            self.mean_ce(probe, branch, data.holdout_split, data.holdout_rows),
        )

    def mean_ce(self, probe: MultimodalModel, branch: str, split: SplitData, rows: np.ndarray) -> float:
        names = branch_modalities(probe, branch)
        features, labels = self.runtime.encode_rows(probe, rows, split=split, modalities=names)
        was_training = probe.training
        probe.eval()
        try:
            with torch.no_grad():
                return float(F.cross_entropy(branch_logits(probe, branch, features), labels))
        finally:
            probe.train(was_training)

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        logs = {f"w_{k}": w for k, w in self.weights.items()}
        logs.update({f"delta_g_{k}": v for k, v in self.delta_g.items()})
        logs.update({f"delta_o_{k}": v for k, v in self.delta_o.items()})
        return logs

    # ---- state (§26.4 STATE: the weights, saved with the run)
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "delta_g": dict(self.delta_g),
            "delta_o": dict(self.delta_o),
            "estimated_at": self.estimated_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state["weights"]) != sorted(self.branches):
            raise ValueError(
                f"gblending checkpoint has weights for {sorted(state['weights'])}, the run has "
                f"{sorted(self.branches)}"
            )
        self.weights = {k: float(state["weights"][k]) for k in self.branches}
        self.delta_g = {k: float(v) for k, v in state["delta_g"].items()}
        self.delta_o = {k: float(v) for k, v in state["delta_o"].items()}
        self.estimated_at = int(state["estimated_at"])
