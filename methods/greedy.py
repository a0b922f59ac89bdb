"""``greedy``: balanced multi-modal learning (Wu, Jastrzębski, Cho, Geras, "Characterizing and overcoming the
greedy nature of learning in multi-modal deep neural networks", ICML 2022, arXiv 2202.05306).

Spec ``methods.md`` §17 (BalanceBenchmark's logic) and the official code, which this follows
(``nyukat/greedy_multimodal_learning`` at cf28c4c: ``src/callbacks.py:Bias_Mitigation_Strong``,
``src/balanced_mmtm.py``, ``src/model.py``, ``train.py``, ``configs/training_guided.gin``); the paper body
could not be read here (abstract only). It needs the mid-fusion MMTM model (``model.kind: mmtm``,
``harness/models/mmtm.py``): the other modality reaches modality m only through m's "bypass"
parameters (every MMTM block's joint layer, shared, and m's excitation layer); m's "main" parameters
are its encoder's.

Conditional learning speed (code ``compute_BDR``). After every step outside re-balancing, with the
step's (all-reduced) gradients, for each modality m and group G ∈ {bypass, main}:
``μ_G,m = Σ_{θ∈G} ‖∇θ‖² / Σ_{θ∈G} ‖θ‖²`` (one ratio of sums per group), accumulated over steps,
``M_G,m = Σ_t μ_G,m(t)``; the bypass-to-main ratio ``BDR_m = log10(M_bypass,m / M_main,m)`` and the speed
difference ``d = BDR_0 − BDR_1``.

Re-balancing ("curation"). From epoch ``curation_starts`` on, if ``|d| > α`` the next ``window_size``
steps re-balance: the cared-for modality (the first if ``d > 0``, else the second) has its MMTM gates
replaced by their running means over training (``MMTMModel.set_curation``), so no cross-modal input
reaches it and it must learn from its own branch; ``M`` is not accumulated meanwhile. Then ``d`` is
computed again after the next regular step. Evaluation: the normal forward (curation acts only in
training forwards).

Params: ``alpha`` (0.001: spec §18, BalanceBenchmark; the official ModelNet40 config uses 0.01),
``window_size`` (5: spec §18, official config), ``curation_starts`` (1: the official
``starting_epoch=2`` counts epochs from 1, so one epoch of only accumulating speeds; BalanceBenchmark 0),
``objective`` (``fused``: CE of the fusion head, BalanceBenchmark; ``branches``: the official code's sum
of the unimodal heads' CEs with their mean logits as the prediction). Logs: ``speed`` (d), ``bdr_<m>``,
``curation`` (1 on re-balancing steps) and ``curated_<m>``.

Departures from the official code:

* The harness' fusion head and loss by default (``objective``): the official model has no fusion head,
  it averages two unimodal heads' logits trained by the sum of their CEs (``objective: branches``).
* The MMTM model's own departures (``harness/models/mmtm.py``): blocks after every encoder stage
  (ResNet-18: stages 1-4, BalanceBenchmark; the official MMTM_MVCNN has them after stages 2-4), gates
  ``2σ`` (official: ``σ``), running means updated in training forwards only and over all ranks.
* Data parallelism: ``d`` comes from the gradients after the trainer's all-reduce and from parameters
  that are identical on every rank, so every replica takes the same decision (spec §20.4 R1); the
  running means the curated gates use are summed over ranks before averaging (the trainer gives every
  model kind ``runtime.all_reduce_sum`` as its statistics reducer). The official code runs on one process.
* A group whose weight or accumulated gradient norm is still zero makes ``d`` undefined (the official
  code would divide by zero); the step then counts as ``|d| ≤ α``.
* A tensor without a gradient adds nothing to its group's ``Σ‖∇θ‖²`` (official: crash), and parameters
  outside both groups (heads) are not counted, as in the official code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.mmtm import MMTMModel
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

Objective = Literal["fused", "branches"]

# ------------------------------------------------------------------------------------- functional core


def squared_norms(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """``(Σ ‖∇θ‖², Σ ‖θ‖²)`` over a parameter group, float64; a tensor without a gradient adds 0 to Σ‖∇θ‖²."""
    grads = [p.grad.detach().double().square().sum() for p in params if p.grad is not None]
    weights = [p.detach().double().square().sum() for p in params]
    zero = torch.zeros((), dtype=torch.float64, device=params[0].device)
    return torch.stack([sum(grads, zero), sum(weights, zero)])


def group_speed(grad_sq: float, weight_sq: float) -> float:
    """``μ = Σ‖∇θ‖² / Σ‖θ‖²`` (§17; code ``gn/wn``), 0 for an all-zero group."""
    return grad_sq / weight_sq if weight_sq > 0 else 0.0


def bdr(bypass: float, main: float) -> float | None:
    """``BDR = log10(M_bypass / M_main)``; None while either accumulated speed is 0 (undefined)."""
    return math.log10(bypass / main) if bypass > 0 and main > 0 else None


def speed_difference(bypass: Sequence[float], main: Sequence[float]) -> float | None:
    """``d = BDR_0 − BDR_1`` from the accumulated ``M_bypass,m`` and ``M_main,m``; None if undefined."""
    first, second = bdr(bypass[0], main[0]), bdr(bypass[1], main[1])
    return None if first is None or second is None else first - second


def cared_for(d: float | None, alpha: float) -> int | None:
    """The modality to re-balance (§17): 0 if ``d > α`` (BDR_0 > BDR_1), 1 if ``d < −α``, else None."""
    if d is None or abs(d) <= alpha:
        return None
    return 0 if d > 0 else 1


# --------------------------------------------------------------------------------------------- method


class GreedyParams(Params):
    alpha: float = Field(
        default=0.001, gt=0, description="threshold on |d| (spec §18, BB; official gin 0.01)"
    )
    window_size: int = Field(
        default=5, ge=1, description="re-balancing steps per trigger (spec §18, official)"
    )
    curation_starts: int = Field(
        default=1, ge=0, description="first epoch (0-based) that may re-balance; earlier ones only accumulate"
    )
    objective: Objective = Field(
        default="fused",
        description="fused: fusion-head CE (BB); branches: Σ unimodal-head CEs, mean logits (official)",
    )


@register_method("greedy")
class Greedy(Method):
    fidelity = "official-code"
    Params = GreedyParams
    requires = Requirements(min_modalities=2, max_modalities=2, model_kind="mmtm")

    def __init__(self, params: GreedyParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.sums = [0.0, 0.0, 0.0, 0.0]  # M_bypass,0, M_bypass,1, M_main,0, M_main,1
        self.curated: int | None = None  # index of the modality being re-balanced, None: regular steps
        self.curation_step = 0
        self.speed = 0.0  # the last d (0 while undefined)
        self._step_curated: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.params.objective == "fused" else f"{self.name}[branches]"

    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        self._mmtm(model)  # refuse a model of another kind before anything runs
        return {}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        unused = "unimodal_heads." if self.params.objective == "fused" else "fusion."
        return (p for name, p in model.named_parameters() if not name.startswith(unused))

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        mmtm = self._mmtm(model)
        self._step_curated = self.curated
        mmtm.set_curation(None if self.curated is None else mmtm.modalities[self.curated])
        features = model.encode(batch.inputs)
        if self.params.objective == "fused":
            loss = F.cross_entropy(model.fuse(features), batch.labels)
        else:  # official blend loss: Σ_m CE(g_m(f^m), y)
            loss = sum(F.cross_entropy(z, batch.labels) for z in model.unimodal(features).values())
        logs = {"speed": self.speed, "curation": float(self.curated is not None)}
        for k, m in enumerate(mmtm.modalities):
            logs[f"curated_{m}"] = float(self.curated == k)
            value = bdr(self.sums[k], self.sums[2 + k])
            logs[f"bdr_{m}"] = 0.0 if value is None else value
        return StepOutput(loss=loss, logs=logs)

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """Gradients are all-reduced: ``d`` and the decision are the same on every rank (R1)."""
        if self._step_curated is not None:  # a re-balancing step: count it, no accumulation (§17)
            self.curation_step += 1
            if self.curation_step >= self.params.window_size:
                self.curated = None
            return
        self._accumulate(self._mmtm(model))
        d = speed_difference(self.sums[:2], self.sums[2:])
        self.speed = 0.0 if d is None else d
        target = cared_for(d, self.params.alpha) if epoch >= self.params.curation_starts else None
        if target is not None:
            self.curated, self.curation_step = target, 0

    def _accumulate(self, model: MMTMModel) -> None:
        """``M_G,m += μ_G,m`` for G ∈ {bypass, main}, m ∈ {0, 1} (one host sync)."""
        groups = [model.bypass_parameters(m) for m in model.modalities]
        groups += [model.main_parameters(m) for m in model.modalities]
        norms = torch.stack([squared_norms(g) for g in groups]).tolist()
        self.sums = [s + group_speed(g, w) for s, (g, w) in zip(self.sums, norms, strict=True)]

    @staticmethod
    def _mmtm(model: MultimodalModel) -> MMTMModel:
        if not isinstance(model, MMTMModel):
            raise ConfigError(
                f"model.kind: method 'greedy' needs model kind 'mmtm', got {type(model).__name__}"
            )
        return model

    # ---- the evaluated prediction
    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.params.objective == "fused":
            return model.fuse(features)
        logits = list(model.unimodal(features).values())
        return sum(logits[1:], logits[0]) / len(logits)  # official: the mean of the two heads' logits

    # ---- state kept across steps
    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": list(self.sums),
            "curated": self.curated,
            "curation_step": self.curation_step,
            "speed": self.speed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [float(v) for v in state["sums"]]
        self.curated = None if state["curated"] is None else int(state["curated"])
        self.curation_step = int(state["curation_step"])
        self.speed = float(state["speed"])
