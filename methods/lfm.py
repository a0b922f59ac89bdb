"""``lfm``: "Facilitating multimodal classification via dynamically learning modality gap" (Yang, Wan, Jiang,
Xu, NeurIPS 2024).

Spec ``../shared/spec/methods.md`` §9 (§9.1 what the official code trains, §9.2 paper vs code), defaults
§18, open items §19.3; after the official ``njustkmg/NeurIPS24-LFM`` (ad44fa0: ``Crema_epoch.py``,
``Crema_epoch_learnable.py``, ``model/AudioVideo.py``, ``data/crema.json``; CREMA-D only).

Model (``fusion=late``, official): separate linear heads ``o_m = U_m f^m + e_m`` (``model.unimodal_heads``)
and late fusion ``o = (1/M) Σ_m o_m`` (``½(o_a + o_v)``), used for the loss and for the prediction; the
model's fusion head is unused and left out of the optimiser. ``fusion=sliced`` is BalanceBenchmark's
alternative [BB ``LFM_trainer.py``]: the classification loss is on the fused logits ``z = g_f(f)`` and the
alignment on the sliced shares ``s^m`` (``model.modality_logits``), prediction by the fusion head; it needs
a decomposable head (checked when the model is built) and leaves the unimodal heads out.

Loss per step (§9.1): ``L = 2 · [α_1(e) · CE(o, y) + α_2(e) · A]`` with the alignment ``A``:

* ``align=jsd`` (the code): ``A = D(softmax o_a, softmax o_v)``, batch-mean; M > 2: the mean over all
  modality pairs (BB). The official ``Alignment`` evaluates ``F.kl_div(p.log(), m)``, which is
  ``KL(m‖p)``, so the code's divergence is ``D = ½ KL(m‖p) + ½ KL(m‖q)`` with ``m = ½(p + q)``, not the
  textbook Jensen-Shannon ``½ KL(p‖m) + ½ KL(q‖m)`` that §9.1 writes. ``jsd_form=code`` (default) is the
  code's; ``jsd_form=textbook`` is §9.1's formula.
* ``align=infonce`` (§9.2 [inferred]: the paper's contrastive term, absent from the released code): the
  symmetric cross-modal InfoNCE over the batch, ``½ [CE(S, I) + CE(Sᵀ, I)]``,
  ``S_ij = cos(f^a_i, f^v_j) / τ``, same-index positives, τ = 0.4 (``temperature1`` of ``crema.json``);
  on the encoder features, so every modality must have the same feature width (refused otherwise).

Schedules of ``α`` (``α_2 = 1 − α_1``):

* ``schedule=fitted`` (``Crema_epoch.py``, default): ``α_1(e') = Σ_{k=0..5} a_k e'^k``,
  ``a = (0.2046, 3.355e-3, 1.230e-4, −2.929e-6, 2.238e-8, −5.397e-11)``, fitted for a 200-epoch run and
  evaluated at ``e' = e · 200 / E`` (§9.2 [inferred], ``rescale_fitted``): e.g. α_1 = 0.205, 0.354,
  0.484, 0.539 at e' = 0, 30, 70, 100. The polynomial exceeds 1 slightly near e' ≈ 185 (max 1.0106), so α_2
  dips to −0.011 there; the official code does the same, and so does this.
* ``schedule=learnable`` (``Crema_epoch_learnable.py``): α starts at ``(α_1, α_2) = (0.05, 0.95)``. At the
  start of every epoch, on a fixed probe of training rows: ``g = ∇_θ(α_1 L_cls + α_2 L_align)`` (with
  ``create_graph``), the Hessian-vector product ``H g_cls`` with ``g_cls = ∇_θ L_cls``, ``α_grad`` = the
  mean of its first parameter tensor's block (the first encoder's first tensor; official, §9.1 "looks
  accidental"), then ``η`` is halved at every epoch ``e > 0`` with ``e % 20 == 0``, and
  ``α_2 ← clip(α_2 − η α_grad, 0.05, 0.95)``, ``α_1 = 1 − α_2``; ``η`` starts at 1e-4.

Params: ``fusion`` (late), ``schedule`` (fitted), ``align`` (jsd), ``jsd_form`` (code), ``temperature``
(0.4), ``rescale_fitted`` (true), and for the learnable schedule ``alpha_align_init`` (0.95),
``lr_alpha`` (1e-4), ``lr_alpha_halve_every`` (20), ``probe_rows`` (16; the official 16-row ``val_batch``
of training rows, of which the first half is used) and ``hold_out_probe`` (true: the probe rows are
removed from the training plan, as the official code removes them from the training set). All from the
official code (§18: "JSD + fitted α schedule rescaled to 70 epochs"). Logs: ``alpha_cls``, ``alpha_align``,
``loss_cls``, ``loss_align``; ``on_epoch_end`` adds ``alpha_grad`` for the learnable schedule.

Departures from the official code:

* The fitted schedule is evaluated at the rescaled epoch ``e · 200 / E`` so that a 70-epoch run covers the
  whole fitted curve (§9.2; ``rescale_fitted=false`` is the official ``α_1(e)``).
* Learnable schedule: the probe rows are drawn from a generator seeded from the run seed (not the global
  ``torch.randperm``), so every rank holds the same rows; the probe pass runs in eval mode (no BatchNorm
  statistic update, no dropout), which is the official mode from epoch 1 on (its model is left in eval
  mode by ``val()``) but not at epoch 0 (train mode there); ``α_grad`` is rank 0's, broadcast (R1/R6), so
  every replica holds the same α. α and η are method state (checkpointed).
* The HVP is restricted to the first tensor's block (``autograd.grad`` with that tensor as the only input),
  which is the official ``hessian_vector_prod[0]`` without computing the other blocks; θ is the method's
  trainable parameters (encoders and unimodal heads: the official model's ``parameters()``).
* Logs of probabilities are ``log_softmax`` (the code takes ``softmax(·).log()``, which underflows to −∞).
* M > 2 (not in the official code): ``o`` is the mean of the M heads and the alignment the mean over pairs
  (BB). ``fusion=sliced`` and ``align=infonce`` are the §9.2 alternatives, not the official model.
* Under data parallelism the loss is the rank's batch mean (gradients then averaged), and InfoNCE's
  negatives are the rank's own batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

# §9.1 ``getAlpha_Learnable_Fitted``: α_1(e) = Σ_k a_k e^k, fitted over a 200-epoch run
FITTED_ALPHA_CLS = (
    2.04623704e-01,
    3.35472727e-03,
    1.22989557e-04,
    -2.92947416e-06,
    2.23835486e-08,
    -5.39717505e-11,
)
FITTED_EPOCHS = 200
LOSS_SCALE = 2.0  # §9.1: L = 2 · [α_1 CE + α_2 A]
ALPHA_CLIP = (0.05, 0.95)  # §9.1: α_2 clipped to [0.05, 0.95]

Fusion = Literal["late", "sliced"]
Schedule = Literal["fitted", "learnable"]
Align = Literal["jsd", "infonce"]
JsdForm = Literal["code", "textbook"]

# --------------------------------------------------------------------------------------- functional core


def fitted_alpha_cls(epoch: float) -> float:
    """§9.1: the fitted α_1(e) = Σ_{k=0..5} a_k e^k (e in the 200-epoch run's epochs)."""
    return sum(a * epoch**k for k, a in enumerate(FITTED_ALPHA_CLS))


def fitted_epoch(epoch: int, epochs: int, rescale: bool) -> float:
    """§9.2: the epoch at which the fitted schedule is read, e' = e · 200 / E (or e without rescaling)."""
    return epoch * FITTED_EPOCHS / epochs if rescale else float(epoch)


def divergence(a_logits: torch.Tensor, b_logits: torch.Tensor, form: JsdForm = "code") -> torch.Tensor:
    """§9.1 alignment between softmax(a) = p and softmax(b) = q, m = ½(p + q), batch mean.

    ``code``: the official ``Alignment``, ½ KL(m‖p) + ½ KL(m‖q) (``F.kl_div(p.log(), m)`` is KL(m‖p));
    ``textbook``: the Jensen-Shannon divergence ½ KL(p‖m) + ½ KL(q‖m)."""
    log_p, log_q = F.log_softmax(a_logits, dim=1), F.log_softmax(b_logits, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    if form == "code":
        m = log_m.exp()
        per_row = 0.5 * (m * (log_m - log_p)).sum(1) + 0.5 * (m * (log_m - log_q)).sum(1)
    else:
        per_row = 0.5 * (log_p.exp() * (log_p - log_m)).sum(1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(1)
    return per_row.mean()


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """§9.2 [inferred]: ½ [CE(S, I) + CE(Sᵀ, I)], S_ij = cos(a_i, b_j) / τ, same-index positives."""
    similarity = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets))


def pairwise_mean(items: list[torch.Tensor], term: Any) -> torch.Tensor:
    """The mean of ``term(x, y)`` over all unordered modality pairs (M = 2: the one pair; BB for M > 2)."""
    values = [term(x, y) for x, y in itertools.combinations(items, 2)]
    return torch.stack(values).mean()


def lfm_loss(cls: torch.Tensor, align: torch.Tensor, alpha_cls: float, alpha_align: float) -> torch.Tensor:
    """§9.1: L = 2 · [α_1 · L_cls + α_2 · L_align]."""
    return LOSS_SCALE * (alpha_cls * cls + alpha_align * align)


def hvp_alpha_gradient(total: torch.Tensor, cls: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """§9.1 learnable rule: mean of the first tensor's block of H·g_cls, H = ∇²_θ L_total, g_cls = ∇_θ L_cls.

    ``g = ∇_θ L_total`` keeps its graph (``create_graph``); differentiating ``Σ_j ⟨g_j, sg(g_cls,j)⟩``
    with respect to ``θ_0`` alone is the official ``hessian_vector_prod[0]``."""
    grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    cls_grads = torch.autograd.grad(cls, params, retain_graph=True, allow_unused=True)
    pairs = [
        (g, v)
        for g, v in zip(grads, cls_grads, strict=True)
        if g is not None and v is not None and g.requires_grad
    ]
    first = params[0]
    if not pairs:
        return torch.zeros((), device=first.device)
    (block,) = torch.autograd.grad(
        [g for g, _ in pairs], [first], grad_outputs=[v for _, v in pairs], allow_unused=True
    )
    return torch.zeros((), device=first.device) if block is None else block.detach().mean()


def learnable_alpha_step(
    alpha_align: float, lr_alpha: float, alpha_grad: float, epoch: int, halve_every: int
) -> tuple[float, float]:
    """§9.1 learnable rule at the start of ``epoch``: η halves at every ``epoch > 0`` divisible by
    ``halve_every``, then α_2 ← clip(α_2 − η α_grad, 0.05, 0.95). Returns (α_2, η)."""
    if epoch != 0 and epoch % halve_every == 0:
        lr_alpha = lr_alpha / 2
    low, high = ALPHA_CLIP
    return max(low, min(high, alpha_align - lr_alpha * alpha_grad)), lr_alpha


def probe_rows(num_rows: int, count: int, seed: int) -> np.ndarray:
    """The learnable schedule's fixed probe: ``count`` training rows drawn once from the run seed (the
    official ``torch.randperm(n)[:16]``), identical on every rank."""
    generator = torch.Generator().manual_seed(104_729 * seed + 24)
    return torch.randperm(num_rows, generator=generator)[: min(count, num_rows)].numpy()


# --------------------------------------------------------------------------------------------- method


class LFMParams(Params):
    fusion: Fusion = Field(
        default="late",
        description="late: mean of the unimodal heads (official); sliced: BB's fused CE + sliced shares",
    )
    schedule: Schedule = Field(
        default="fitted", description="fitted: the official α_1 polynomial; learnable: the HVP update"
    )
    align: Align = Field(default="jsd", description="jsd: the code's alignment; infonce: §9.2 [inferred]")
    jsd_form: JsdForm = Field(
        default="code",
        description="code: ½KL(m‖p)+½KL(m‖q) (official Alignment); textbook: ½KL(p‖m)+½KL(q‖m)",
    )
    temperature: float = Field(default=0.4, gt=0, description="InfoNCE τ (crema.json temperature1)")
    rescale_fitted: bool = Field(default=True, description="read the fitted α_1 at e' = e·200/E (§9.2)")
    alpha_align_init: float = Field(default=0.95, ge=0.05, le=0.95, description="learnable: initial α_2")
    lr_alpha: float = Field(default=1e-4, gt=0, description="learnable: initial η_α (official 1e-4)")
    lr_alpha_halve_every: int = Field(default=20, ge=1, description="learnable: η_α halves every n epochs")
    probe_rows: int = Field(default=16, ge=2, description="learnable: probe rows (the first half is used)")
    hold_out_probe: bool = Field(default=True, description="learnable: remove the probe rows from training")


@register_method("lfm")
class LFM(Method):
    fidelity = "official-code"
    Params = LFMParams
    # fusion=sliced also needs a decomposable head: checked in build_modules (``requires`` is per class)
    requires = Requirements(min_modalities=2)

    DEFAULTS: ClassVar[dict[str, str]] = {"schedule": "fitted", "fusion": "late", "align": "jsd"}

    def __init__(self, params: LFMParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.alpha_align = params.alpha_align_init  # learnable state (α_2, η_α), checkpointed
        self.lr_alpha = params.lr_alpha
        self.alpha_grad = 0.0
        self._probe: np.ndarray | None = None

    @property
    def label(self) -> str:
        p = self.params
        parts = [getattr(p, k) for k, v in self.DEFAULTS.items() if getattr(p, k) != v]
        parts += ["textbook-jsd"] if p.jsd_form == "textbook" and p.align == "jsd" else []
        return f"{self.name}[{','.join(parts)}]" if parts else self.name

    @property
    def learnable(self) -> bool:
        return self.params.schedule == "learnable"

    # ---- the model
    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        """No modules of its own; refuses a model its options cannot run on, before training."""
        if self.params.fusion == "sliced" and not model.fusion_decomposable:
            raise ConfigError(
                "model.fusion.name: method 'lfm' with fusion=sliced needs a decomposable fusion head "
                "(sliced per-modality logits); use fusion=late or a decomposable head such as concat or sum"
            )
        widths = set(model.feature_dims.values())
        if self.params.align == "infonce" and len(widths) > 1:
            raise ConfigError(
                f"method.params.align: infonce compares encoder features across modalities, which needs "
                f"equal feature widths, but they are {model.feature_dims}; use align=jsd or equal out_dim"
            )
        return {}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """late: encoders + unimodal heads (the official model); sliced: encoders + fusion head."""
        unused = "fusion." if self.params.fusion == "late" else "unimodal_heads."
        return (p for name, p in model.named_parameters() if not name.startswith(unused))

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.params.fusion == "sliced":
            return model.fuse(features)
        return torch.stack(list(model.unimodal(features).values())).mean(0)  # §9.1: ½(o_a + o_v)

    # ---- the loss
    def alphas(self, epoch: int) -> tuple[float, float]:
        """(α_1, α_2) of ``epoch``: the fitted polynomial, or the learnable state."""
        if self.learnable:
            return 1.0 - self.alpha_align, self.alpha_align
        alpha_cls = fitted_alpha_cls(fitted_epoch(epoch, self.context.epochs, self.params.rescale_fitted))
        return alpha_cls, 1.0 - alpha_cls

    def losses(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cls, L_align) of §9.1 (late) or BB's sliced version."""
        p = self.params
        if p.fusion == "late":
            outputs = list(model.unimodal(features).values())
            fused = torch.stack(outputs).mean(0)
        else:
            outputs = list(model.modality_logits(features).values())
            fused = model.fuse(features)
        if p.align == "jsd":
            align = pairwise_mean(outputs, lambda a, b: divergence(a, b, p.jsd_form))
        else:
            align = pairwise_mean(
                list(features.values()), lambda a, b: symmetric_infonce(a, b, p.temperature)
            )
        return F.cross_entropy(fused, labels), align

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        cls, align = self.losses(model, features, batch.labels)
        alpha_cls, alpha_align = self.alphas(epoch)
        loss = lfm_loss(cls, align, alpha_cls, alpha_align)
        logs = {"loss_cls": cls.detach(), "loss_align": align.detach(), "alpha_cls": alpha_cls}
        logs["alpha_align"] = alpha_align
        return StepOutput(loss=loss, logs=logs)

    # ---- the learnable schedule
    def probe(self) -> np.ndarray:
        if self._probe is None:
            split = self.runtime.train_split
            if split is None:
                raise RuntimeError(
                    "lfm schedule=learnable needs a runtime bound to a run (its training split)"
                )
            self._probe = probe_rows(len(split), self.params.probe_rows, self.context.seed)
        return self._probe

    def epoch_plan(self, epoch: int, default: EpochPlan) -> EpochPlan:
        if not (self.learnable and self.params.hold_out_probe):
            return default
        keep = ~np.isin(default.rows, self.probe())  # the official code trains without the probe rows
        return EpochPlan(default.rows[keep], None if default.tags is None else default.tags[keep])

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if not self.learnable:
            return
        rows = self.probe()[: len(self.probe()) // 2]  # the official half batch
        batch = self.runtime.rows_batch(rows)
        params = [p for p in self.trainable_parameters(model) if p.requires_grad]
        was_training = model.training
        model.eval()  # no BatchNorm update, no dropout: the same pass on every rank
        try:
            with torch.enable_grad():
                features = model.encode(batch.inputs)
                cls, align = self.losses(model, features, batch.labels)
                alpha_cls, alpha_align = self.alphas(epoch)
                grad = hvp_alpha_gradient(alpha_cls * cls + alpha_align * align, cls, params)
        finally:
            model.train(was_training)
        self.alpha_grad = float(self.runtime.broadcast(grad.reshape(1).float()))  # rank 0's (R6)
        p = self.params
        self.alpha_align, self.lr_alpha = learnable_alpha_step(
            self.alpha_align, self.lr_alpha, self.alpha_grad, epoch, p.lr_alpha_halve_every
        )

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        if not self.learnable:
            return {}
        return {"alpha_align": self.alpha_align, "alpha_grad": self.alpha_grad, "lr_alpha": self.lr_alpha}

    def state_dict(self) -> dict[str, Any]:
        if not self.learnable:
            return {}
        return {"alpha_align": self.alpha_align, "lr_alpha": self.lr_alpha, "alpha_grad": self.alpha_grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.learnable:
            super().load_state_dict(state)
            return
        self.alpha_align = float(state["alpha_align"])
        self.lr_alpha = float(state["lr_alpha"])
        self.alpha_grad = float(state["alpha_grad"])
