"""``mla``: multimodal learning with alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao, "Multimodal
representation learning by alternating unimodal adaptation", CVPR 2024; spec
``../shared/spec/methods-more.md`` §21, defaults §32; official code [MLA]
``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation`` ``main.py``, ``utils/utils.py``).

There is no concatenation head: one **shared** linear head ``h: R^d → C`` (a method module, so every
encoder must give the same feature width d) reads each modality's feature on its own, ``u^m = h(f^m)``.
Each mini-batch takes M optimiser sub-steps, one per modality in the dataset's order (§21.2)::

    for m in (1 .. M):   f^m = φ_m(x^m);  ℓ_m = mean_i CE(h(f^m_i), y_i);  backward;  [GS];  step

Only φ_m and h get a gradient in sub-step m (the other encoders are skipped by the optimiser, weight decay
and momentum included), so each encoder takes one step per batch and the head M steps; the second
sub-step's gradient is taken at the head the first one already moved. The per-modality forward equals
the official single forward before the sub-steps (§21.2: step m changes only φ_m and h, and h acts after
the features).

**Gradient modification (GS, §21.2, §21.6)**, on the head's weight gradient only (never the bias), from the
second optimiser step of the run on: with the batch index ``i`` of ``N_b`` batches in the epoch,
``a_t = 0.1^(1 + i/N_b)`` and ``r = mean_i sg(f^m_i)`` (1×d) of the current sub-step's modality,
``k = P rᵀ``, ``P ← (P − k kᵀ / D) / ‖·‖_F`` and ``∇W ← E(∇W, P)``, where by variant

* ``code_v1`` (default; the first official release 4735bbc): ``D = a_t + k r`` (the d×d outer product,
  element-wise division), ``E = ∇W Pᵀ`` (replace);
* ``owm_scalar`` (textbook OWM): ``D = a_t + r k`` (a scalar), ``E = ∇W Pᵀ``;
* ``bb`` (BalanceBenchmark): ``D`` as ``code_v1``, ``E = ∇W + ∇W Pᵀ`` (add);
* ``off``: no projection (the official HEAD, where the projection is dead code, §21.6).

P (d×d, ``P₀ = I``) is shared by all modalities and never reset (§21.3). A non-finite P update (§21.8: the
element-wise denominator can be tiny) is skipped: P keeps its previous value, the gradient is projected
with it, and the skip is counted (``method/gs_skipped`` per epoch).

**Inference (§21.5)**: an entropy-gated sum ``z = Σ_m λ_m u^m`` with ``λ = softmax_m(−H_m)`` (=
``exp(max_k H_k − H_m) / Σ_k exp(max_k H_k − H_k)``): ``dynamic_sample`` (default; the paper's and BB's
per-sample gate, ``H_m = H(softmax(u^m_i))``), ``dynamic_batch`` (the official code: one entropy per
modality per evaluation chunk, of the softmax along the *batch* dimension summed over all entries, so a
prediction depends on its batch), ``fixed`` (``z = Σ_m w_m u^m / Σ_m w_m``). Zeroed-feature diagnostics
(§21.4, ``coalition_logits``): a left-out modality is dropped from the sum and the gate (or the fixed
weights) renormalised over the kept ones; with none kept the logits are zeros.

Parameters (defaults, §21.7 / §32):

* ``gs`` = ``code_v1``: the projection variant above (§21.6; which one produced the paper's numbers is
  unknowable, §34.1 item 5; report it with every number: it is in the method's label when not default).
* ``fusion`` = ``dynamic_sample``: the evaluated rule (§21.5 harness default).
* ``fixed_weights`` = null: ``w`` of ``fusion=fixed``, one per modality in the dataset's order; null
  gives the official (0.55, 0.45) for two modalities (``main.py`` passes ``av_alpha = 0.55``), (0.35,
  0.25, 0.4) for three (``--a_alpha/--v_alpha/--t_alpha``), uniform otherwise [inferred].
* ``zero_grad_zeros`` = false: the torch-1.x ``zero_grad`` behaviour of the official loop (§21.2): the
  encoders of modalities already stepped in this batch keep a zero gradient, so momentum and weight decay
  move them again in later sub-steps. The default (``set_to_none``) is the harness' (§32).

Departures from the official code:

* GS is on by default in the ``code_v1`` form, although at HEAD the name test (``module.weight``) makes it
  dead code; ``gs=off`` is the HEAD behaviour (§21.6).
* One forward per sub-step instead of one forward before both (equivalent, §21.2; needed so each sub-step
  is a step of the harness loop and under DDP, R4); BatchNorm statistics are updated once per encoder per
  batch in both.
* Under DDP ``r = Σ_ranks Σ_i f_i / Σ_ranks b`` (all-reduced sums, §21.10, R1) and the projection edits
  the already averaged head gradient, so P and the edit are identical on every rank; on one process this
  is the official batch mean.
* ``set_to_none`` zeroing by default (each encoder takes one SGD step per batch); the official double
  momentum step of the first encoder is ``zero_grad_zeros=true`` (§21.2).
* The non-finite guard (§21.8) is ours: the official code would carry a NaN P into every later step.
* Entropies use ``log_softmax`` (finite where the official ``log(softmax)`` underflows to −inf and makes
  the gate NaN); elsewhere identical.
* The per-sample gate is the default; the official batch-level gate is ``fusion=dynamic_batch``.
* ``fixed`` weights are divided by their sum (a no-op for the official ones, which sum to 1), so a
  coalition's renormalised weights and the full prediction follow one rule.
* The head is PyTorch's default ``Linear`` initialisation (the harness' for every head), not the
  official Xavier-normal weight with zero bias; the harness' fusion and unimodal heads exist on the model
  but are not trained or used.
* Modality order is the dataset's (CREMA-D: audio, visual, as the official); any M ≥ 2 alternates over
  all modalities and gates over all of them (the official code has two- and three-modality versions).
* The harness protocol (§1, §32) replaces the official 100 epochs / StepLR(70); selection on validation,
  not on the test split (which the official code uses as validation, §21.6).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

log = logging.getLogger(__name__)

GsVariant = Literal["off", "code_v1", "owm_scalar", "bb"]
FusionRule = Literal["dynamic_sample", "dynamic_batch", "fixed"]
HEAD = "shared_head"  # the method module: h = Linear(d → C), §20.2
GS_BASE = 0.1  # a_t = 0.1^(1 + i/N_b), [MLA] utils.py:26–27
# [MLA] main.py:968 (av_alpha = 0.55 in training-time validation) and :56–58 (three modalities)
OFFICIAL_FIXED_WEIGHTS = {2: (0.55, 0.45), 3: (0.35, 0.25, 0.4)}


# ------------------------------------------------------------------------------------- functional core


def gs_alpha(batch_index: int, batches_per_epoch: int) -> float:
    """§21.2: ``a_t = 0.1^(1 + i/N_b)``, from 0.1 at an epoch's first batch towards 0.01 at its end."""
    return GS_BASE ** (1.0 + batch_index / max(batches_per_epoch, 1))


def update_projection(
    projection: torch.Tensor, r: torch.Tensor, alpha: float, variant: GsVariant
) -> torch.Tensor:
    """§21.2 / §21.6: ``k = P rᵀ``, ``P − k kᵀ / D`` then Frobenius-normalised (a new tensor; may be
    non-finite, the caller guards). ``D = a + r k`` (scalar) for ``owm_scalar``, else the d×d matrix
    ``a + k r`` divided element-wise (``code_v1``, ``bb``)."""
    row = r.reshape(1, -1)  # 1×d
    k = projection @ row.T  # d×1
    denominator = alpha + (row @ k if variant == "owm_scalar" else k @ row)  # 1×1 or d×d
    updated = projection - (k @ k.T) / denominator
    return updated / torch.linalg.matrix_norm(updated, ord="fro")  # ‖P‖_F = 1, utils.py:38–40


def project_gradient(grad: torch.Tensor, projection: torch.Tensor, variant: GsVariant) -> torch.Tensor:
    """§21.6: ``∇W Pᵀ`` (replace: ``code_v1``, ``owm_scalar``) or ``∇W + ∇W Pᵀ`` (add: ``bb``)."""
    projected = grad @ projection.T
    return grad + projected if variant == "bb" else projected


def sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """§21.5 per sample: ``H(softmax(u_i))`` along the classes, shape (B,)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def batch_entropy(logits: torch.Tensor) -> torch.Tensor:
    """§21.5 official (``main.py:65–70``): the softmax along the *batch* dimension, its entropy summed over
    all B×C entries: one scalar for the whole batch."""
    log_p = F.log_softmax(logits, dim=0)
    return -(log_p.exp() * log_p).sum()


def gated_fusion(
    logits: dict[str, torch.Tensor], rule: FusionRule, weights: dict[str, float] | None = None
) -> torch.Tensor:
    """§21.5: ``z = Σ_m λ_m u^m`` over the modalities in ``logits`` (a coalition passes only its kept
    ones, so the gate is renormalised over them, §21.4). ``λ = softmax_m(−H_m)`` per sample
    (``dynamic_sample``) or per batch (``dynamic_batch``); ``fixed``: ``λ_m = w_m / Σ_kept w``."""
    names = list(logits)
    stacked = torch.stack([logits[m] for m in names])  # (M, B, C)
    if rule == "fixed":
        if weights is None:
            raise ValueError("gated_fusion: rule 'fixed' needs weights")
        w = torch.tensor([weights[m] for m in names], dtype=stacked.dtype, device=stacked.device)
        gate = (w / w.sum())[:, None, None]
    elif rule == "dynamic_sample":
        entropy = torch.stack([sample_entropy(logits[m]) for m in names])  # (M, B)
        gate = torch.softmax(-entropy, dim=0)[:, :, None]  # = exp(max_k H_k − H_m) / Σ
    else:
        entropy = torch.stack([batch_entropy(logits[m]) for m in names])  # (M,)
        gate = torch.softmax(-entropy, dim=0)[:, None, None]
    return (gate * stacked).sum(dim=0)


def default_fixed_weights(num_modalities: int) -> tuple[float, ...]:
    """The official fixed weights for 2 and 3 modalities (§21.5), uniform otherwise [inferred]."""
    return OFFICIAL_FIXED_WEIGHTS.get(num_modalities, (1.0 / num_modalities,) * num_modalities)


def check_shared_head_dims(dims: dict[str, int]) -> int:
    """SH (§20.3, §21.4): the shared head needs ``d_1 = … = d_M``; returns d or raises a ``ConfigError``."""
    if len(set(dims.values())) != 1:
        listed = ", ".join(f"{m}={d}" for m, d in dims.items())
        raise ConfigError(
            f"model.encoders: method 'mla' applies one shared head to every modality's feature, so all "
            f"encoders must give the same feature dim, but they give {listed}; set the encoders' out_dim "
            f"equal (e.g. model.default_encoder.params.out_dim)"
        )
    return next(iter(dims.values()))


# --------------------------------------------------------------------------------------------- method


class MLAParams(Params):
    gs: GsVariant = Field(
        default="code_v1",
        description="head-gradient projection (§21.6): off (official HEAD), code_v1 (first release), "
        "owm_scalar (textbook OWM), bb (BalanceBenchmark, add mode)",
    )
    fusion: FusionRule = Field(
        default="dynamic_sample",
        description="evaluated rule (§21.5): per-sample entropy gate, official per-batch gate, or fixed",
    )
    fixed_weights: tuple[float, ...] | None = Field(
        default=None,
        description="fusion=fixed weights per modality (dataset order); null: (0.55, 0.45) for 2, "
        "(0.35, 0.25, 0.4) for 3 modalities, else uniform",
    )
    zero_grad_zeros: bool = Field(
        default=False,
        description="torch-1.x zero_grad (§21.2): earlier sub-steps' encoders keep zero grads and step again",
    )

    @field_validator("gs", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as false (``method.params.gs=off``): take it as the variant."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _weights(self) -> MLAParams:
        w = self.fixed_weights
        if w is not None and (any(v < 0 for v in w) or sum(w) <= 0):
            raise ValueError("fixed_weights must be ≥ 0 with a positive sum")
        return self


@dataclass(frozen=True)
class _SubStep:
    """What ``after_backward`` needs of the sub-step just taken: its modality and r's local sums."""

    modality: str
    feature_sum: torch.Tensor  # Σ_i sg(f^m_i), (d,)
    count: torch.Tensor  # b, (1,)


@register_method("mla")
class MLA(Method):
    fidelity = "official-code"
    Params = MLAParams
    requires = Requirements(min_modalities=2)

    def __init__(self, params: MLAParams, context: MethodContext) -> None:
        super().__init__(params, context)
        weights = params.fixed_weights or default_fixed_weights(len(context.modalities))
        if len(weights) != len(context.modalities):
            raise ConfigError(
                f"method.params.fixed_weights: {len(weights)} weights for {len(context.modalities)} "
                f"modalities ({', '.join(context.modalities)})"
            )
        self.fixed_weights = dict(zip(context.modalities, weights, strict=True))
        self.projection: torch.Tensor | None = None  # P, d×d; I_d once the head is built (§21.2)
        self.steps = 0  # optimiser sub-steps taken in the run (n_steps of §21.2)
        self.skipped = 0  # non-finite P updates skipped in the run (§21.8)
        self._epoch, self._batch = -1, 0  # the batch index i within the current epoch
        self._skipped_before_epoch = 0
        self._pending: _SubStep | None = None
        self._stepped_in_batch: list[str] = []

    @property
    def label(self) -> str:
        parts = [f"gs={self.params.gs}"] if self.params.gs != "code_v1" else []
        if self.params.fusion != "dynamic_sample":
            parts.append(f"fusion={self.params.fusion}")
        return f"{self.name}[{','.join(parts)}]" if parts else self.name

    # ---- the shared head (SH) and what is trained
    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        d = check_shared_head_dims(model.feature_dims)
        if self.projection is None or self.projection.shape != (d, d):
            self.projection = torch.eye(d, device=self.runtime.device)  # P₀ = I_d
        return {HEAD: nn.Linear(d, model.num_classes)}

    @staticmethod
    def head(model: MultimodalModel) -> nn.Linear:
        return model.method_modules[HEAD]

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """The encoders and the shared head; the fusion and unimodal heads are never used (§21.1)."""
        yield from model.encoders.parameters()
        yield from self.head(model).parameters()

    # ---- the step: one optimiser sub-step per modality (ALT, §21.2)
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        raise NotImplementedError("mla takes one optimiser step per modality: use training_steps")

    def training_steps(self, model: MultimodalModel, batch: Batch, epoch: int) -> Iterator[StepOutput]:
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0
        head = self.head(model)
        self._stepped_in_batch = []
        for m in model.modalities:
            feature = model.encode(batch.inputs, [m])[m]  # per-modality forward (§21.2, §21.10)
            loss = F.cross_entropy(head(feature), batch.labels)  # ℓ_m = mean_i CE(h(f^m_i), y_i)
            detached = feature.detach()
            count = torch.full((1,), float(detached.shape[0]), device=detached.device)
            self._pending = _SubStep(m, detached.sum(dim=0), count)
            yield StepOutput(loss=loss, logs={f"loss_{m}": loss.detach()})
            self._stepped_in_batch.append(m)
        self._batch += 1

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self.params.zero_grad_zeros:
            self._keep_zero_grads(model)
        if self.params.gs == "off" or self.steps == 0:  # the run's first step is never projected (§21.2)
            return
        projection = self._update_projection(pending)
        weight = self.head(model).weight  # the weight only: the bias is not projected (§21.8)
        if weight.grad is not None:
            weight.grad = project_gradient(weight.grad, projection.to(weight.grad.device), self.params.gs)

    def _update_projection(self, pending: _SubStep) -> torch.Tensor:
        """P from r = Σ_ranks Σ_i f_i / Σ_ranks b (§21.10, R1: identical on every rank); a non-finite
        update is skipped and counted (§21.8). Returns the P to project with."""
        if self.projection is None:
            raise RuntimeError("mla: the projection is built with the shared head (build_modules)")
        totals = self.runtime.all_reduce_sum(torch.cat([pending.feature_sum, pending.count]))
        r = (totals[:-1] / totals[-1]).to(self.projection.device)
        alpha = gs_alpha(self._batch, self.context.steps_per_epoch)
        updated = update_projection(self.projection, r, alpha, self.params.gs)
        if bool(torch.isfinite(updated).all()):
            self.projection = updated
        else:
            self.skipped += 1
            if self.runtime.rank == 0:
                log.warning("mla: non-finite projection update skipped (a_t=%.4g); P kept", alpha)
        return self.projection

    def _keep_zero_grads(self, model: MultimodalModel) -> None:
        """``zero_grad_zeros``: encoders stepped earlier in this batch hold zero (not absent) gradients."""
        for m in self._stepped_in_batch:
            for param in model.encoders[m].parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)

    def after_optimizer_step(self, model: MultimodalModel, epoch: int) -> None:
        self.steps += 1

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        skipped, self._skipped_before_epoch = self.skipped - self._skipped_before_epoch, self.skipped
        return {"gs_skipped": float(skipped)}

    # ---- the evaluated prediction (EVAL, §21.5) and the coalitions (§21.4)
    def unimodal_logits(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], kept: frozenset[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """``u^m = h(f^m)`` for every modality (or the kept ones), in the model's order."""
        head = self.head(model)
        return {m: head(features[m]) for m in model.modalities if kept is None or m in kept}

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return gated_fusion(self.unimodal_logits(model, features), self.params.fusion, self.fixed_weights)

    def coalition_logits(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], kept: frozenset[str]
    ) -> torch.Tensor:
        """§21.4: the left-out modalities are dropped from the gated sum (gate renormalised over the kept
        ones), not zeroed (``h(0)`` is the head's bias); with none kept, zero logits."""
        logits = self.unimodal_logits(model, features, kept)
        if not logits:
            first = next(iter(features.values()))
            return torch.zeros(first.shape[0], model.num_classes, device=first.device)
        return gated_fusion(logits, self.params.fusion, self.fixed_weights)

    # ---- state (STATE, R6)
    def state_dict(self) -> dict[str, Any]:
        return {
            "projection": None if self.projection is None else self.projection.clone(),
            "steps": self.steps,
            "skipped": self.skipped,
            "epoch": self._epoch,
            "batch": self._batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        projection = state["projection"]
        self.projection = None if projection is None else projection.to(self.runtime.device).clone()
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._skipped_before_epoch = self.skipped
