"""``agm``: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance
with Adaptive Gradient Modulation", ICCV 2023).

Spec ``../shared/spec/methods-more.md`` §29 (supersedes ``methods.md`` §14; errata §34.2), after the official
``lihong2303/AGM_ICCV2023`` (``model/CREMAD_net.py``, ``run/CREMAD_main.py``). Per step (§29.2):

* ``F(a, v)``: the network on the real inputs, in train mode, with gradients. ``F(a, 0)`` and ``F(0, v)``:
  the same network with the other modality's **input** set to zero, in **eval** mode (BatchNorm reads its
  running statistics and is not updated, dropout is off) but **with** gradients; train mode is restored
  afterwards, also when a pass raises (§29.7).
* Shapley-style contributions ``m_a = ½(F(a,v) − F(0,v) + F(a,0))``, ``m_v = ½(F(a,v) − F(a,0) + F(0,v))``;
  the output is ``o = h_a(m_a) + h_v(m_v)``, where ``h_m`` is the identity forward whose backward multiplies
  the incoming gradient by ``κ_m`` (so ``o`` equals ``F(a, v)`` numerically; it is also the evaluated
  prediction: the fusion head on all features, ``Method.logits_from_features``' default).
* Scores ``σ_m = mean_i −log max(softmax(m_{m,i})[y_i], 1e-8)``; ``r_a = exp(σ_v − σ_a)``, ``r_v = 1/r_a``;
  targets ``r̄_m`` from the running means ``σ̄_m`` the same way; ``κ_m = exp(α · min(r̄_m − r_m, 10))``,
  computed **before** ``σ̄_m ← σ̄_m (t − 1)/t + σ_m/t`` (``t`` the 1-based iteration count since the start
  of training; ``σ̄`` starts at 0). Inside the window ``[modulation_starts, modulation_ends]`` the hooks
  use ``κ_m``, outside it 1.
* Loss ``CE(o, y)``. After the backward: if ``max |∂L/∂θ_f| > 1`` over the fusion head's parameters,
  ``clip_grad_norm_`` of all trainable parameters to 1.0 (§29.2, ``:233–238``).

M > 2 (§29.4; the official MOSEI code and BB): ``m_k = Σ_{S ⊆ [M]∖k} |S|!(M−|S|−1)!/M! · [F(S ∪ k) − F(S)]``
over the ``2^M − 1`` non-empty coalitions, ``F(S)`` the network with the modalities outside ``S`` zeroed
at the input and ``F(∅) := 0`` (so ``Σ_k m_k = F([M])`` exactly as for M = 2, which is this sum). The
relative strength generalises as ``r_m = exp(mean_{l≠m} σ_l − σ_m)`` (ours: BB's
``exp(M/(M−1)·(σ_m − mean σ))`` with the official sign, i.e. its reciprocal; for M = 2 the official rule).

Params (harness defaults of §29.5 / §32; the same on Kinetics-Sounds, [inferred]): ``alpha`` (1.5, the
authors' CREMA-D value, ``lihongcs/AGM`` #3, #5, #10), ``modulation_starts`` (0) and ``modulation_ends``
(None = to the last epoch, inclusive; the authors modulate over all epochs), ``ratio_cap`` (10, ``min(·, 10)``
of ``CREMAD_main.py:145–152``), ``clip`` (true), ``clip_trigger`` (1.0) and ``clip_max_norm`` (1.0) of the
conditional clip, ``local_stats`` (false: σ from the global batch, §20.4 R2). Logs per modality: ``kappa_<m>``
(the coefficient the hooks used, 1 outside the window), ``ratio_<m>`` (r_m), ``target_<m>`` (r̄_m),
``sigma_<m>``; the epoch metric ``clip_fraction`` (share of steps clipped).

Departures from the official code:

* Under data parallelism the per-sample loss sums and the sample count are summed over ranks
  (``runtime.all_reduce_sum``) before σ is formed (§29.9, R2/R6), so κ and the running means are those of
  a single process on the global batch and identical on every rank; ``local_stats=true`` keeps the
  per-rank σ for κ (κ then differs by rank, harmlessly, since the hooks act before the gradient
  all-reduce); ``σ̄`` is then updated from the mean over ranks of the per-rank σ, so it stays
  rank-identical (R6).
* The zero-input passes are assembled from per-modality eval-mode encoder features (each encoder sees
  its real input or a zero tensor of the same shape and dtype) fused by the head in eval mode: the same
  numbers as running the whole network on the zeroed inputs, because the encoders are separate modules,
  with 2 encoder passes per modality instead of one per coalition. ``F(0, 0)`` (computed, unused by the
  official code) is not computed.
* The iteration count ``t`` is a counter of the steps taken, kept in ``state_dict`` with ``σ̄`` (the
  official ``(e − 1)·N_b + step + 1``; equal when every epoch has ``N_b`` steps), so resume is exact.
* Outside the modulation window the hooks use κ = 1 (plain gradients; [inferred]: the official code only
  says that κ is set inside the window); σ and ``σ̄`` are still updated every step, as in the code. With
  the default window (all epochs) the question does not arise.
* The clip trigger reads every fusion-head parameter's gradient (weight and bias), after the gradient
  all-reduce, so every replica takes the same decision (§29.9).
* Zeroed inputs are ``torch.zeros_like`` of the batch's tensor, whatever the modality: for token-id inputs
  that is token 0 (the official code has image and spectrogram inputs only).
* BalanceBenchmark's variant (no-grad padded passes, the inverted ratio, a cap of 7, direct rescaling of
  the encoders' gradients, §29.6) is not implemented: the official sign and mechanism only.
* Budget: the authors' CREMA-D run is 1500 epochs; the harness protocol is 70 (§29.7, §34.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from midasbench.datasets.loader import Batch, ModalityInputs
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

PROB_FLOOR = 1e-8  # §29.2: σ_m = mean −log max(p_y, 1e-8) (CREMAD_main.py:130–143)
Coalition = frozenset[str]

# --------------------------------------------------------------------------------------- functional core


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale`` (§29.2's hook h_m)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)  # the same values: the forward output does not change

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward, ``scale · ∂L/∂x`` in the backward."""
    return ScaleGradient.apply(x, scale)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own flag restored after, even on error
    (§29.7: the padded passes must never run in train mode, and the switch must not leak)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def shapley_weight(size: int, num_modalities: int) -> float:
    """|S|!(M − |S| − 1)!/M!, the weight of coalition S (not containing k) in m_k (§29.4)."""
    m = num_modalities
    return math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)


def proper_coalitions(modalities: Sequence[str]) -> list[Coalition]:
    """The non-empty coalitions other than the full one: the zero-input passes (2^M − 2 of them)."""
    return [frozenset(c) for size in range(1, len(modalities)) for c in combinations(modalities, size)]


def shapley_contributions(
    outputs: dict[Coalition, torch.Tensor], modalities: Sequence[str]
) -> dict[str, torch.Tensor]:
    """m_k = Σ_{S ⊆ [M]∖k} w(|S|) [F(S ∪ k) − F(S)] with F(∅) := 0 (§29.4). ``outputs`` holds F(S) for
    every non-empty coalition, the full one included. For M = 2: m_a = ½ F(a,0) + ½ (F(a,v) − F(0,v))."""
    m = len(modalities)
    out = {}
    for k in modalities:
        others = [x for x in modalities if x != k]
        total: torch.Tensor | None = None
        for size in range(m):
            for rest in combinations(others, size):
                s = frozenset(rest)
                gain = outputs[s | {k}] if not s else outputs[s | {k}] - outputs[s]
                term = shapley_weight(size, m) * gain
                total = term if total is None else total + term
        assert total is not None
        out[k] = total
    return out


def floored_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample −log max(softmax(logits)[y], 1e-8) (§29.2), shape (b,)."""
    probs = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.log(probs.clamp_min(PROB_FLOOR))


def relative_strengths(sigma: Sequence[float]) -> list[float]:
    """r_m = exp(mean_{l≠m} σ_l − σ_m); for M = 2, r_a = exp(σ_v − σ_a), r_v = exp(σ_a − σ_v) (§29.2)."""
    s = [float(v) for v in sigma]
    if len(s) < 2:
        raise ValueError(f"AGM needs at least two modality scores, got {len(s)}")
    total = sum(s)
    return [math.exp((total - v) / (len(s) - 1) - v) for v in s]


def agm_coefficients(
    sigma: Sequence[float], sigma_bar: Sequence[float], alpha: float, cap: float = 10.0
) -> tuple[list[float], list[float], list[float]]:
    """(r_m, r̄_m, κ_m) with κ_m = exp(α · min(r̄_m − r_m, cap)) (§29.2, CREMAD_main.py:145–152)."""
    r, r_bar = relative_strengths(sigma), relative_strengths(sigma_bar)
    kappa = [math.exp(alpha * min(rb - rr, cap)) for rr, rb in zip(r, r_bar, strict=True)]
    return r, r_bar, kappa


def running_mean(mean: torch.Tensor, value: torch.Tensor, t: int) -> torch.Tensor:
    """The cumulative mean after the t-th value (1-based): mean·(t − 1)/t + value/t (§29.2, :154–155)."""
    return mean * ((t - 1) / t) + value / t


def coalition_outputs(
    model: MultimodalModel, inputs: Mapping[str, torch.Tensor], coalitions: Sequence[Coalition]
) -> dict[Coalition, torch.Tensor]:
    """F(S) for each coalition: modalities outside S zeroed at the input, the whole network in eval mode,
    with gradients (§29.2). Each modality is encoded at most twice (real and zero input) and the
    features are shared between coalitions: the same values as one network pass per coalition."""
    cache: dict[tuple[str, bool], torch.Tensor] = {}

    def feature(m: str, present: bool) -> torch.Tensor:
        if (m, present) not in cache:
            zeroed = {m: torch.zeros_like(inputs[m])}  # zeros of the same rows: their lengths stay
            values = inputs if present else ModalityInputs.of(inputs).replace(zeroed)
            cache[m, present] = model.encode(values, [m])[m]
        return cache[m, present]

    with eval_mode(model):
        return {s: model.fuse({m: feature(m, m in s) for m in model.modalities}) for s in coalitions}


# --------------------------------------------------------------------------------------------- method


class AGMParams(Params):
    alpha: float = Field(default=1.5, ge=0, description="α of κ = exp(α·min(r̄ − r, cap)) (authors: 1.5)")
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch (0-based)")
    modulation_ends: int | None = Field(
        default=None, ge=0, description="last modulated epoch, inclusive; null = to the end"
    )
    ratio_cap: float = Field(default=10.0, description="cap of r̄ − r inside the exponent (official 10)")
    clip: bool = Field(default=True, description="conditional clip: on when a fusion-head |grad| > trigger")
    clip_trigger: float = Field(default=1.0, gt=0, description="max |grad| of the fusion head that clips")
    clip_max_norm: float = Field(default=1.0, gt=0, description="clip_grad_norm_ of all parameters to this")
    local_stats: bool = Field(
        default=False, description="σ from the local batch under DDP instead of the global one (§20.4 R2)"
    )

    @model_validator(mode="after")
    def _window(self) -> AGMParams:
        check_window(self.modulation_starts, self.modulation_ends)
        return self


@register_method("agm")
class AGM(Method):
    fidelity = "official-code"
    Params = AGMParams
    requires = Requirements(min_modalities=2)  # any fusion head: the passes zero inputs, not logit slices

    def __init__(self, params: AGMParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.sigma_bar = torch.zeros(len(context.modalities), dtype=torch.float64)  # σ̄ = 0 on a fresh run
        self.iteration = 0  # steps taken since the start of training (t − 1 of the next step)
        self._clipped = 0
        self._steps = 0

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders and fusion head; the unimodal heads are not part of AGM's model."""
        return without_unimodal_heads(model)

    def modulating(self, epoch: int) -> bool:
        return in_window(epoch, self.params.modulation_starts, self.params.modulation_ends)

    def scores(self, contributions: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """σ_m (float64, CPU) from the per-sample losses; sums and count over ranks unless local (R2)."""
        with torch.no_grad():
            sums = [floored_nll(c.detach(), labels).double().sum() for c in contributions.values()]
            local = torch.stack([*sums, torch.tensor(float(labels.numel()), device=labels.device).double()])
        total = local if self.params.local_stats else self.runtime.all_reduce_sum(local)
        total = total.cpu()
        return total[:-1] / total[-1].clamp_min(1.0)

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        """The §29.2 step: passes, contributions, σ → κ (old σ̄) → σ̄ update, CE of the hooked sum."""
        names = list(model.modalities)
        full = frozenset(names)
        # F(a, v) first, in train mode (it updates BN statistics, which the eval passes then read), then
        # the zero-input passes in eval mode with gradients (§29.2, CREMAD_net.py:61–64)
        full_output = model.fuse(model.encode(batch.inputs))
        outputs = coalition_outputs(model, batch.inputs, proper_coalitions(names))
        outputs[full] = full_output
        contributions = shapley_contributions(outputs, names)
        sigma = self.scores(contributions, batch.labels)
        ratio, target, kappa = agm_coefficients(
            sigma.tolist(), self.sigma_bar.tolist(), self.params.alpha, self.params.ratio_cap
        )  # κ from σ̄ before this step's update (§29.2)
        local_sigma = sigma
        if self.params.local_stats:  # keep σ̄ rank-identical all the same (R6)
            sigma = self.runtime.all_reduce_mean(sigma)
        self.iteration += 1
        self.sigma_bar = running_mean(self.sigma_bar, sigma, self.iteration)
        used = kappa if self.modulating(epoch) else [1.0] * len(names)
        fused = scale_gradient(contributions[names[0]], used[0])  # o = Σ_m h_m(m_m) (§29.2)
        for m, k in zip(names[1:], used[1:], strict=True):
            fused = fused + scale_gradient(contributions[m], k)
        loss = F.cross_entropy(fused, batch.labels)
        logs = {"loss_fused": loss.detach()}
        for i, m in enumerate(names):
            logs[f"kappa_{m}"], logs[f"ratio_{m}"], logs[f"target_{m}"] = used[i], ratio[i], target[i]
            logs[f"sigma_{m}"] = float(local_sigma[i])
        return StepOutput(loss=loss, logs=logs)

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """The conditional clip (§29.2) on the all-reduced gradients: the same decision on every rank."""
        self._steps += 1
        if not self.params.clip:
            return
        head = [p.grad.detach().abs().max() for p in model.fusion.parameters() if p.grad is not None]
        if head and float(torch.stack(head).max()) > self.params.clip_trigger:
            params = [p for p in self.trainable_parameters(model) if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.params.clip_max_norm)
            self._clipped += 1

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        self._clipped = self._steps = 0

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        return {"clip_fraction": self._clipped / max(self._steps, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_bar": self.sigma_bar.clone(), "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sigma_bar = state["sigma_bar"].clone().to(torch.float64)
        self.iteration = int(state["iteration"])
