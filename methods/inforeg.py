"""``inforeg``: adaptive unimodal regulation (Huang, Wei, Yang, Hu, CVPR 2025, "Adaptive Unimodal Regulation
for Balanced Multimodal Information Acquisition"; spec ``../shared/spec/methods-more.md`` §33 item 2, DDP
§20.4 R1/R6; official code ``GeWu-Lab/InfoReg_CVPR2025`` ``main.py`` [IR]).

During an early "prime learning window" the encoder of the information-sufficient (currently stronger)
modality is slowed by a proximal gradient that pulls it back towards its parameters at the start of the
epoch. With modalities (1, 2) playing the official (audio, visual):

* anchor (§33, [IR] ``:259``): at every epoch start ``θ̂ ← θ`` for every encoder parameter;
* loss (§33, ``:456–458``): ``L = CE(z) + CE(s^1) + CE(s^2)``, ``s^m`` the sliced logits of the
  decomposable fusion head (``model.modality_logits``);
* scores: ``S_m = Σ_{i∈B} softmax(s^m_i)[y_i]`` (batch sums, detached), summed over ranks (R1);
* coefficients (§33, ``:465–495``): if ``S_1 > S_2``: ``β_1 = c_1 exp(tanh(S_1 − S_2))``, ``β_2 = 0``; if
  ``S_2 > S_1``: ``β_2 = c_2 exp(tanh(S_2 − S_1))``, ``β_1 = 0``; a tie: both 0;
* edit (after the all-reduce): ``g_θ ← g_θ + β_m (θ − θ̂)`` for every parameter θ of encoder m, only while
  the window is open;
* window (§33, ``:237–243, :504–523, :595``): ``F_e^m = Σ_w mean(Σ_{steps of e} (∂L/∂w)²)``, the Fisher
  trace of encoder m in epoch e, over the weights w of its Linear / Conv modules (gradients after the edit,
  as official). The history starts with ``H = 10`` zeros; at the start of epoch ``e > 0``
  ``k = (mean(F[-H:]) − mean(F[-H−1:-1])) / mean(F[-H:])`` (relative growth of the trace averaged over the
  last H epochs; epoch 0: ``k = 1``), and the window is open while ``k > threshold``. The gradients are
  all-reduced before they are squared, so ``k`` is identical on every rank.

Evaluation: the plain fused logits. The unimodal heads of the model are not trained (the unimodal losses
are on sliced logits).

Params (defaults: §33, the official code's values): ``first_coefficient`` c_1 = 0.95 and
``second_coefficient`` c_2 = 0.1 (official, hard-coded for CREMA-D; no official values exist for other
datasets, so they are the defaults everywhere), ``window_threshold`` 0.05 (§33), ``window_history`` 10
(§33), ``window_test`` ``first`` (official: the first modality's trace gates both edits) or ``each``
(generalisation: modality m is edited only while its own encoder's window is open), ``local_stats`` (False;
True keeps per-rank scores, §20.4 R2). Official optimiser recipe (SGD lr 2e-3, batch 64, 50 epochs,
StepLR(30, 0.1), §33) is not applied here: the harness protocol (``methods.md`` §1) governs.

State (``state_dict``, so resume is exact, R6): the anchors (CPU tensors), the Fisher-trace histories, the
current epoch's trace accumulators and the epoch's window value ``k``.

Departures from the official code:

* Unimodal logits are the sliced logits of the fusion head (§33 and the BB convention), not separate
  unimodal heads; a decomposable fusion head is required.
* The visual branch: the stored snapshot tests ``score_v < score_a`` in its ``elif`` (the same as the first
  branch, so the second modality is never regulated); we follow §33: the second modality is regulated when
  ``S_2 > S_1``.
* The threshold is §33's 0.05 (a stored snapshot of the code has 0.04).
* Scores are summed over ranks before the coefficients (R1), so every replica edits the same all-reduced
  gradient; on one process this is the official batch sum. A sum over a larger global batch makes the
  ``tanh`` saturate sooner, as a single process on that batch would.
* The window test reads all-reduced gradients (rank-identical). The trace is accumulated as one scalar per
  step, ``Σ_w mean(g_w²)``, which equals the official per-element accumulation followed by the mean (the
  mean is linear), up to rounding. An epoch with a zero trace mean closes the window (official: NaN, which
  also fails the test).
* Only encoder parameters are anchored (the official code copies the whole model but edits only the
  encoders), and a parameter without a gradient gets the proximal gradient alone (official: it would fail).
* Exactly two modalities are required: the official coefficients are asymmetric and tied to (audio,
  visual); there is no principled M > 2 assignment.
* ``window_test=each`` is a generalisation (not official); ``first`` is the default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method, without_unimodal_heads

FISHER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # [IR]: Conv2d and Linear weights

# --------------------------------------------------------------------------------------- functional core


def true_class_scores(shares: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """§33: S_m = Σ_i softmax(s^m_i)[y_i] (a batch sum), shape (M,), detached."""
    rows = torch.arange(labels.numel(), device=labels.device)
    return torch.stack([F.softmax(s.detach(), dim=1)[rows, labels].sum() for s in shares.values()])


def regulation_coefficients(scores: list[float], c_first: float, c_second: float) -> list[float]:
    """§33: the leading modality gets c_m exp(tanh(|S_1 − S_2|)), the other 0; a tie regulates neither."""
    s1, s2 = scores
    if s1 > s2:
        return [c_first * math.exp(math.tanh(s1 - s2)), 0.0]
    if s2 > s1:
        return [0.0, c_second * math.exp(math.tanh(s2 - s1))]
    return [0.0, 0.0]


def window_growth(history: list[float], span: int) -> float:
    """§33: k = (mean(F[-H:]) − mean(F[-H−1:-1])) / mean(F[-H:]) over the trace history (padded with H
    zeros in front, as official); 1 with no history (epoch 0), 0 (closed) when the recent mean is 0."""
    if not history:
        return 1.0
    padded = [0.0] * span + list(history)
    new, old = sum(padded[-span:]) / span, sum(padded[-span - 1 : -1]) / span
    return (new - old) / new if new > 0 else 0.0


def fisher_weights(encoder: nn.Module) -> list[nn.Parameter]:
    """The weights whose squared gradients make the Fisher trace: Linear / Conv modules' ``weight``."""
    return [m.weight for m in encoder.modules() if isinstance(m, FISHER_MODULES) and m.weight.requires_grad]


def step_trace(weights: list[nn.Parameter]) -> torch.Tensor:
    """One step's contribution Σ_w mean(g_w²) to the epoch's Fisher trace (0-d, on the weights' device)."""
    terms = [w.grad.detach().pow(2).mean() for w in weights if w.grad is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def add_proximal_gradient(
    params: list[tuple[str, nn.Parameter]], anchors: dict[str, torch.Tensor], beta: float
) -> None:
    """§33: g_θ ← g_θ + β (θ − θ̂), in place, for every (name, θ) of one encoder."""
    for name, param in params:
        pull = beta * (param.detach() - anchors[name])
        if param.grad is None:
            param.grad = pull
        else:
            param.grad.add_(pull)


# --------------------------------------------------------------------------------------------- method


class InfoRegParams(Params):
    first_coefficient: float = Field(
        default=0.95, ge=0, description="c_1: β_1 = c_1 exp(tanh(S_1 − S_2)) (official, CREMA-D specific)"
    )
    second_coefficient: float = Field(
        default=0.1, ge=0, description="c_2: β_2 = c_2 exp(tanh(S_2 − S_1)) (official, CREMA-D specific)"
    )
    window_threshold: float = Field(
        default=0.05, description="the window is open while the Fisher-trace growth k exceeds this (§33)"
    )
    window_history: int = Field(default=10, ge=1, description="epochs averaged in the growth test (§33)")
    window_test: Literal["first", "each"] = Field(
        default="first",
        description="first: the first modality's trace gates both edits (official); each: every modality "
        "is gated by its own encoder's trace (generalisation)",
    )
    local_stats: bool = Field(
        default=False, description="use per-rank scores S under DDP instead of all-reduced ones (§20.4 R2)"
    )


@register_method("inforeg")
class InfoReg(Method):
    fidelity = "official-code"
    Params = InfoRegParams
    requires = Requirements(min_modalities=2, max_modalities=2, decomposable_fusion=True)

    def __init__(self, params: InfoRegParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.modalities = list(context.modalities)
        self.anchors: dict[str, dict[str, torch.Tensor]] = {}  # modality -> parameter name -> θ̂
        self.history: dict[str, list[float]] = {m: [] for m in self.modalities}  # F_e^m per past epoch
        self.epoch_trace: dict[str, torch.Tensor] = {m: torch.zeros(()) for m in self.modalities}
        self.growth: dict[str, float] = {m: 1.0 for m in self.modalities}  # k of the current epoch
        self.betas: list[float] = [0.0, 0.0]  # this step's β, set in training_step

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    # ---- the window (§33)
    def window_open(self, modality: str) -> bool:
        gate = self.modalities[0] if self.params.window_test == "first" else modality
        return self.growth[gate] > self.params.window_threshold

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        self.anchors = {  # θ̂ ← θ at every epoch start ([IR] :259)
            m: {n: p.detach().clone() for n, p in model.encoders[m].named_parameters()}
            for m in self.modalities
        }
        self.growth = {m: window_growth(self.history[m], self.params.window_history) for m in self.modalities}
        self.epoch_trace = {m: torch.zeros(()) for m in self.modalities}

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        logs = {}
        for m in self.modalities:
            trace = float(self.epoch_trace[m])
            self.history[m].append(trace)
            logs[f"fisher_trace_{m}"] = trace
            logs[f"window_k_{m}"] = self.growth[m]
            logs[f"window_open_{m}"] = float(self.window_open(m))
        return logs

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        labels = batch.labels
        fused = F.cross_entropy(model.fuse(features), labels)
        shares = model.modality_logits(features)
        unimodal = {m: F.cross_entropy(shares[m], labels) for m in self.modalities}
        loss = fused + sum(unimodal.values())  # §33: fused CE + the sliced unimodal CEs
        scores = true_class_scores({m: shares[m] for m in self.modalities}, labels)
        if not self.params.local_stats:
            scores = self.runtime.all_reduce_sum(scores)  # R1: rank-identical β
        p = self.params
        betas = regulation_coefficients(
            scores.double().cpu().tolist(), p.first_coefficient, p.second_coefficient
        )
        self.betas = [b if self.window_open(m) else 0.0 for m, b in zip(self.modalities, betas, strict=True)]
        logs = {"loss_fused": fused.detach(), **{f"loss_{m}": v.detach() for m, v in unimodal.items()}}
        logs.update({f"beta_{m}": b for m, b in zip(self.modalities, self.betas, strict=True)})
        return StepOutput(loss=loss, logs=logs)

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        if not self.anchors:  # a step without on_epoch_start (direct use): anchor now
            self.on_epoch_start(model, epoch)
        for m, beta in zip(self.modalities, self.betas, strict=True):
            encoder = model.encoders[m]
            if beta > 0:
                params = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
                anchors = self._anchors_on(m, params)
                add_proximal_gradient(params, anchors, beta)  # §33: g += β (θ − θ̂)
            # the Fisher trace reads the edited, all-reduced gradients (official order; rank-identical)
            trace = step_trace(fisher_weights(encoder))
            self.epoch_trace[m] = self.epoch_trace[m].to(trace.device) + trace

    def _anchors_on(self, modality: str, params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
        """The modality's anchors on its parameters' device (loaded checkpoints keep them on the CPU)."""
        anchors = self.anchors[modality]
        for name, param in params:
            if anchors[name].device != param.device:
                anchors[name] = anchors[name].to(param.device)
        return anchors

    # ---- state kept across steps
    def state_dict(self) -> dict[str, Any]:
        return {
            "anchors": {
                m: {n: t.detach().cpu().clone() for n, t in a.items()} for m, a in self.anchors.items()
            },
            "history": {m: list(h) for m, h in self.history.items()},
            "epoch_trace": {m: float(t) for m, t in self.epoch_trace.items()},
            "growth": dict(self.growth),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = {m: {n: t.clone() for n, t in a.items()} for m, a in state["anchors"].items()}
        self.history = {m: list(h) for m, h in state["history"].items()}
        self.epoch_trace = {m: torch.tensor(v) for m, v in state["epoch_trace"].items()}
        self.growth = dict(state["growth"])
