"""``mmpareto``: Pareto integration of multimodal and unimodal gradients (Wei, Hu, "MMPareto: Boosting
Multimodal Learning with Innocent Unimodal Assistance", ICML 2024).

Spec ``../shared/spec/methods-more.md`` §31 (supersedes ``methods.md`` §16; errata §34.2), after the official
``GeWu-Lab/MMPareto_ICML2024`` (``code/MMPareto.py``, ``code/min_norm_solvers.py``). The model has the
fusion head ``g_f`` and **separate** unimodal heads ``g_m`` (``model.unimodal_heads``). Per step (§31.2):

* Losses ``ℓ_mm = CE(z)``, ``ℓ_m = CE(u^m)``; the trained loss is ``ℓ_mm + Σ_m ℓ_m`` (gradient ``g_sum``).
* Probe gradients, per loss, of each modality's encoder tensors: ``G_m[mm]`` and ``G_m[m]`` (one
  ``torch.autograd.grad`` for ``ℓ_mm`` on every encoder, one per ``ℓ_m`` on its own encoder).
* Per modality, over all of its encoder tensors concatenated: if ``cos(G_m[mm], G_m[m]) > 0`` the weights
  are ``(w_mm, w_m) = (½, ½)``; otherwise the two-task MinNorm ``w_mm = (v22 − v12)/(v11 + v22 − 2 v12)``
  with ``v11 = ⟨G_mm, G_mm⟩, v12 = ⟨G_mm, G_m⟩, v22 = ⟨G_m, G_m⟩``, replaced by 0.999 if ``v12 ≥ v11``,
  else by 0.001 if ``v12 ≥ v22``; ``w_m = 1 − w_mm`` (``min_norm_solvers.py:6–27``).
* After the backward, per encoder tensor θ of modality m: ``ĝ = 2(w_mm G_m[mm](θ) + w_m G_m[m](θ))``; if
  ``‖g_sum(θ)‖ > ‖ĝ‖`` then ``ĝ ← ĝ · ‖g_sum(θ)‖/‖ĝ‖``; ``θ.grad = γ ĝ``. The heads keep ``g_sum``.
* Evaluation: the fusion head (``argmax z``), ``Method.logits_from_features``' default.

Params (harness defaults, §31.5 / §32; the same on Kinetics-Sounds): ``gamma`` (1.5, hard-coded in
``MMPareto.py:178``), ``constant_lr`` (false: the harness protocol's StepLR, §1; true: the scheduler never
steps, as in the official script, §31.3). Logs per modality: ``w_mm_<m>``, ``w_uni_<m>``,
``conflict_<m>`` (1 when cos ≤ 0, i.e. MinNorm was used), ``cos_<m>``, ``loss_uni_<m>``; and
``loss_fused``.

Departures from the official code:

* The probes are ``torch.autograd.grad(..., retain_graph=True)`` calls inside the step instead of three
  ``.backward()`` passes with ``zero_grad`` in between (the same gradients; §20.4 R3: one normal backward
  per forward). ``ℓ_m``'s probe reads only modality m's encoder, on which the other unimodal losses have
  no gradient.
* Under data parallelism the probe gradients are averaged over ranks (``runtime.all_reduce_mean``, one
  flat buffer) before the cosine and MinNorm, so the weights are those of a single process on the global
  batch and identical on every rank (§31.9, R1); the final gradient ``g_sum`` is the trainer's all-reduced
  mean. The cost is one flat all-reduce of twice the encoders' size per step. §31.9's cheaper
  ``local_probe`` option (local G, only the dot products all-reduced) is not offered: ``ĝ`` is built from
  the probe gradients themselves, not only from the weights, so local probes would edit each replica's
  gradient differently after the all-reduce and the replicas would drift apart (R1).
* Encoder tensors are those of ``model.encoders[m]`` that require a gradient (selected by module, not by
  the official name test ``m in name and "head" not in name``; the same tensors, BN affine included).
* A tensor whose ``ĝ`` is zero is not rescaled (the official division would give NaN); a tensor with no
  gradient after the backward is left without one.
* ``constant_lr`` defaults to false: the harness protocol (§1 StepLR) applies to every method (§31.5);
  the official constant learning rate is the flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method

MIN_NORM_HIGH, MIN_NORM_LOW = 0.999, 0.001  # min_norm_solvers.py: the clamped MinNorm weights

# --------------------------------------------------------------------------------------- functional core


def min_norm_weight(v11: float, v12: float, v22: float) -> float:
    """The weight w of the first vector in min_w ‖w g1 + (1 − w) g2‖² (MGDA's two-task solver, §31.2):
    0.999 if v12 ≥ v11, else 0.001 if v12 ≥ v22, else (v22 − v12)/(v11 + v22 − 2 v12)."""
    if v12 >= v11:
        return MIN_NORM_HIGH
    if v12 >= v22:
        return MIN_NORM_LOW
    return (v22 - v12) / (v11 + v22 - 2.0 * v12)


@dataclass(frozen=True)
class ParetoWeights:
    """One modality's weights of its multimodal and unimodal gradients, and why (§31.2)."""

    w_mm: float
    w_uni: float
    conflict: bool
    cos: float


def pareto_weights(v11: float, v12: float, v22: float) -> ParetoWeights:
    """(½, ½) when cos(G_mm, G_m) > 0, else MinNorm (§31.2); ``cos`` from the dot products (0 when a
    gradient is zero, which counts as a conflict, as the official ``cos > 0`` test does)."""
    norm = math.sqrt(max(v11, 0.0)) * math.sqrt(max(v22, 0.0))
    cos = v12 / norm if norm > 0 else 0.0
    if cos > 0:
        return ParetoWeights(0.5, 0.5, False, cos)
    w = min_norm_weight(v11, v12, v22)
    return ParetoWeights(w, 1.0 - w, True, cos)


def dot_products(g_mm: Sequence[torch.Tensor], g_uni: Sequence[torch.Tensor]) -> torch.Tensor:
    """(v11, v12, v22) over all tensors concatenated, float64 (§31.7: one vector per modality)."""
    a = torch.cat([g.detach().reshape(-1) for g in g_mm]).double()
    b = torch.cat([g.detach().reshape(-1) for g in g_uni]).double()
    return torch.stack([a @ a, a @ b, b @ b])


def integrated_gradient(
    g_mm: torch.Tensor, g_uni: torch.Tensor, g_sum: torch.Tensor, weights: ParetoWeights, gamma: float
) -> torch.Tensor:
    """γ ĝ for one tensor (§31.2): ĝ = 2(w_mm G_mm + w_m G_m), rescaled to ‖g_sum‖ when that is larger
    (per tensor, §31.7); no host sync (the comparison stays on the device)."""
    g_hat = 2.0 * (weights.w_mm * g_mm + weights.w_uni * g_uni)
    n_sum, n_hat = torch.linalg.vector_norm(g_sum), torch.linalg.vector_norm(g_hat)
    scale = torch.where((n_sum > n_hat) & (n_hat > 0), n_sum / n_hat.clamp_min(1e-30), torch.ones_like(n_hat))
    return gamma * (g_hat * scale)


def probe_gradients(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """∂loss/∂θ for each θ, zeros where θ is unused; the graph is kept for the next probe and the final
    backward (§20.4 R3: no probe backward touches ``.grad``)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]


# --------------------------------------------------------------------------------------------- method


class MMParetoParams(Params):
    gamma: float = Field(default=1.5, gt=0, description="γ, the final amplification (official 1.5)")
    constant_lr: bool = Field(
        default=False, description="never step the lr scheduler, as the official script (§31.3)"
    )


@dataclass
class _Probe:
    """One modality's probes and weights, from ``training_step`` to ``after_backward``."""

    params: list[nn.Parameter]
    g_mm: list[torch.Tensor]
    g_uni: list[torch.Tensor]
    weights: ParetoWeights


@register_method("mmpareto")
class MMPareto(Method):
    fidelity = "official-code"
    Params = MMParetoParams
    requires = Requirements(min_modalities=2)  # any fusion head (MMPareto issue #3)

    def __init__(self, params: MMParetoParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self._probes: dict[str, _Probe] = {}

    @property
    def label(self) -> str:
        return f"{self.name}[constant lr]" if self.params.constant_lr else self.name

    def encoder_parameters(self, model: MultimodalModel, modality: str) -> list[nn.Parameter]:
        return [p for p in model.encoders[modality].parameters() if p.requires_grad]

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        """Losses, probe gradients (kept for ``after_backward``) and each modality's weights (§31.2)."""
        names = list(model.modalities)
        features = model.encode(batch.inputs)
        loss_mm = F.cross_entropy(model.fuse(features), batch.labels)
        unimodal = model.unimodal(features)  # separate heads g_m (§31.2)
        loss_uni = {m: F.cross_entropy(unimodal[m], batch.labels) for m in names}
        params = {m: self.encoder_parameters(model, m) for m in names}
        everything = [p for m in names for p in params[m]]
        g_mm_all = probe_gradients(loss_mm, everything)  # G_m[mm] for every m in one call
        g_mm, start = {}, 0
        for m in names:
            g_mm[m], start = g_mm_all[start : start + len(params[m])], start + len(params[m])
        g_uni = {m: probe_gradients(loss_uni[m], params[m]) for m in names}  # G_m[m]
        g_mm, g_uni = self._averaged(names, g_mm, g_uni)  # the global batch's probes (§31.9, R1)
        dots = torch.stack([dot_products(g_mm[m], g_uni[m]) for m in names])
        self._probes = {}
        logs = {"loss_fused": loss_mm.detach()}
        for m, (v11, v12, v22) in zip(names, dots.tolist(), strict=True):
            weights = pareto_weights(v11, v12, v22)
            self._probes[m] = _Probe(params[m], g_mm[m], g_uni[m], weights)
            logs[f"loss_uni_{m}"] = loss_uni[m].detach()
            logs[f"w_mm_{m}"], logs[f"w_uni_{m}"] = weights.w_mm, weights.w_uni
            logs[f"conflict_{m}"], logs[f"cos_{m}"] = float(weights.conflict), weights.cos
        loss = loss_mm + sum(loss_uni.values())
        return StepOutput(loss=loss, logs=logs)

    def _averaged(
        self, names: list[str], g_mm: dict[str, list[torch.Tensor]], g_uni: dict[str, list[torch.Tensor]]
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Every probe gradient averaged over ranks in one flat collective (a no-op on one process)."""
        if not self.runtime.distributed:
            return g_mm, g_uni
        tensors = [g for m in names for g in (*g_mm[m], *g_uni[m])]
        flat = self.runtime.all_reduce_mean(torch.cat([g.reshape(-1) for g in tensors]))
        pieces, offset = [], 0
        for g in tensors:
            pieces.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        out_mm, out_uni, i = {}, {}, 0
        for m in names:
            n = len(g_mm[m])
            out_mm[m], out_uni[m] = pieces[i : i + n], pieces[i + n : i + 2 * n]
            i += 2 * n
        return out_mm, out_uni

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """Encoder gradients ← γ ĝ per tensor (§31.2); ``.grad`` is the all-reduced ``g_sum`` here, and
        the heads keep it."""
        for probe in self._probes.values():
            for param, g_mm, g_uni in zip(probe.params, probe.g_mm, probe.g_uni, strict=True):
                if param.grad is None:
                    continue
                param.grad = integrated_gradient(
                    g_mm.to(param.grad), g_uni.to(param.grad), param.grad, probe.weights, self.params.gamma
                )
        self._probes = {}  # free the probes

    def scheduler_should_step(self, epoch: int) -> bool:
        return not self.params.constant_lr  # official: the scheduler is never stepped (§31.3)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
