"""``midas``: MIDAS, misalignment-based data augmentation (Hwang, Choi, Whang, NeurIPS 2025).

For every aligned sample the batch also yields misaligned samples whose modalities come from samples of
different classes (Eq. 1, at feature level Eq. 12). Each is supervised with a soft label built from the
detached unimodal confidences of its sources (Eq. 2-4), its loss is re-weighted by a weak-modality weight
α (Eq. 5-7) and a hard-sample weight from the similarity of the swapped features (Eq. 8, 10), and the
total objective adds it to the aligned and unimodal losses (Eq. 9, 11). Warm-up epochs train only the
encoders and unimodal heads (Algorithm 1). Every ambiguity of the paper is a named switch
(``../shared/spec/methods.md`` §2; decisions A1-A14 there):

* ``pairing`` (§2.2): ``randperm`` (official code: one permutation, no label check), ``randperm_masked``
  (default: pairs with equal labels are left out of L_mis and of the α statistics), ``resample_diff_label``.
* ``alpha_mode`` (§2.4): ``code`` (one scalar α on the batch's weak modality, chosen from the ratio of
  aligned unimodal confidences; the official code's update rule) or ``paper`` (a per-modality vector,
  Eq. 5-7). ``alpha_reset_each_epoch`` (A1), ``alpha_max`` (A12).
* ``uni_reduction`` and ``direction_reduction`` (A2, A3): mean (official code, λ was tuned with it) or the
  sums the paper writes.
* ``similarity``: ``cosine`` (Eq. 8) or ``l2`` for the paper's Table 4. The paper gives no mapping from an
  L2 distance to a similarity; ours is ``s = 2·exp(−d / d̄) − 1`` with ``d̄`` the mean distance over the
  batch's valid pairs, so ``s`` lies in (−1, 1], equals 1 for identical features and falls with distance.
* ``level``: ``feature`` (App. A.3, reuses the aligned features) or ``input`` (re-encodes the misaligned
  inputs; for the cost comparison of Table 8).
* Ablations of Table 2: ``use_warmup`` (W), ``use_weak_modality_weight`` (WM), ``use_hard_sample_weight``
  (HS).

M > 2 modalities (App. A.2, spec §2.9): M − 1 source permutations and the M cyclic shifts of
``(i, j_1, …, j_{M−1})`` over the modalities give M misaligned samples per anchor (for M = 2 exactly the
two directions of the code); an anchor counts only if its sources carry at least two distinct labels.

The functions below are the functional core (pure, no module state); the ``Midas`` class wires them into
the training loop through the ``Method`` hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from midasbench.datasets.loader import Batch
from midasbench.harness.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method

PairingMode = Literal["randperm", "randperm_masked", "resample_diff_label"]

# --------------------------------------------------------------------------------------- functional core


@dataclass(frozen=True)
class Misalignment:
    """Sources of the misaligned samples of one batch.

    ``sources[0]`` is the anchor itself (``arange(b)``) and ``sources[r]`` its r-th partner; ``valid`` marks
    the anchors whose misaligned samples enter L_mis and the α statistics.
    """

    sources: torch.Tensor  # (M, b) long
    valid: torch.Tensor  # (b,) bool


def _different_label_partners(
    labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each i a uniform draw among the rows with another label (spec §2.2 ``resample_diff_label``)."""
    candidates = (labels[None, :] != labels[:, None]).float()
    has_any = candidates.sum(1) > 0
    weights = torch.where(has_any[:, None], candidates, torch.ones_like(candidates))
    partners = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return partners, has_any


def draw_sources(
    labels: torch.Tensor, num_modalities: int, mode: PairingMode, generator: torch.Generator
) -> Misalignment:
    """Eq. 1 / Eq. 12 (and App. A.2 for M > 2): partners drawn within the batch."""
    labels = labels.cpu()
    b = labels.numel()
    sources = [torch.arange(b)]
    found = torch.ones(b, dtype=torch.bool)
    for _ in range(num_modalities - 1):
        if mode == "resample_diff_label":
            partners, has_any = _different_label_partners(labels, generator)
            found &= has_any
        else:
            partners = torch.randperm(b, generator=generator)
        sources.append(partners)
    stacked = torch.stack(sources)
    if mode == "randperm":  # the official code: every pair counts, same-label pairs and fixed points too
        valid = torch.ones(b, dtype=torch.bool)
    else:  # the paper's y_j != y_i (A.2: at least two distinct labels among the sources)
        source_labels = labels[stacked]
        valid = (source_labels != source_labels[:1]).any(0) & found
    return Misalignment(sources=stacked, valid=valid)


def shift_sources(sources: torch.Tensor, shift: int) -> torch.Tensor:
    """Row of the sample that provides each modality in misaligned sample ``shift`` (a cyclic shift).

    For M = 2: shift 0 is ``(x_i^1, x_j^2)`` (direction A), shift 1 is ``(x_j^1, x_i^2)`` (direction B).
    """
    m = sources.shape[0]
    return torch.stack([sources[(modality - shift) % m] for modality in range(m)])


def normalized_unimodal_confidences(
    unimodal_probs: torch.Tensor, labels: torch.Tensor, assignment: torch.Tensor
) -> torch.Tensor:
    """Eq. 2 (App. A.2 for M > 2): c̃^m = (p^m_{k_m})_{y_{k_m}} / Σ_l (p^l_{k_l})_{y_{k_l}}, shape (M, b).

    ``unimodal_probs`` (M, b, C) are the aligned unimodal probabilities, detached (A4): the soft labels
    are constants and train no head.
    """
    confidences = torch.stack([unimodal_probs[m, rows, labels[rows]] for m, rows in enumerate(assignment)])
    return confidences / confidences.sum(0, keepdim=True).clamp_min(torch.finfo(confidences.dtype).tiny)


def soft_labels(
    normalized: torch.Tensor, labels: torch.Tensor, assignment: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Eq. 3: ỹ = Σ_m c̃^m · onehot(y of modality m's source); rows sum to one."""
    target = torch.zeros(assignment.shape[1], num_classes, dtype=normalized.dtype, device=normalized.device)
    for m, rows in enumerate(assignment):
        target.scatter_add_(1, labels[rows][:, None], normalized[m][:, None])
    return target


def swapped_modalities(num_modalities: int, shift: int) -> list[int]:
    """Modalities that come from a partner in misaligned sample ``shift`` (App. A.2's R_i)."""
    return [m for m in range(num_modalities) if (m - shift) % num_modalities != 0]


def feature_similarity(
    original: torch.Tensor, swapped_in: torch.Tensor, metric: Literal["cosine", "l2"], valid: torch.Tensor
) -> torch.Tensor:
    """Eq. 8: similarity of the swapped-in feature to the one it replaced, detached (A5), in [−1, 1]."""
    original, swapped_in = original.detach().float(), swapped_in.detach().float()
    if metric == "cosine":
        return F.cosine_similarity(original, swapped_in, dim=1, eps=1e-8)
    distance = (original - swapped_in).norm(dim=1)
    reference = distance[valid] if valid.any() else distance
    scale = reference.mean().clamp_min(1e-8)
    return 2.0 * torch.exp(-distance / scale) - 1.0


def hard_sample_weight(similarity: torch.Tensor) -> torch.Tensor:
    """Eq. 10's factor 1 + (s̃ + 1)/2, in [1, 2]: harder (more similar) swaps weigh more."""
    return 1.0 + (similarity + 1.0) / 2.0


def misaligned_loss_per_sample(
    logits: torch.Tensor,
    labels: torch.Tensor,
    assignment: torch.Tensor,
    normalized: torch.Tensor,
    modality_weights: torch.Tensor,
    sample_weights: torch.Tensor,
) -> torch.Tensor:
    """Eq. 10 (with Eq. 4): w_i · Σ_m α_m c̃^m_i · CE(z̃_i, y of modality m's source), shape (b,).

    The α-weighted target is not renormalised (spec §2.6): α also scales the loss.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    per_modality = torch.stack(
        [-log_probs.gather(1, labels[rows][:, None]).squeeze(1) for rows in assignment]
    )  # (M, b)
    weighted = modality_weights[:, None].to(per_modality) * normalized.to(per_modality) * per_modality
    return sample_weights.to(per_modality) * weighted.sum(0)


def reduce_misaligned_loss(
    per_shift: Sequence[torch.Tensor], valid: torch.Tensor, direction_reduction: Literal["mean", "sum"]
) -> torch.Tensor:
    """L_mis of Eq. 11: directions averaged (code, A2) or summed (paper), then the mean over valid anchors;
    zero (still part of the graph) when no anchor is valid, e.g. a single-class batch."""
    stacked = torch.stack(list(per_shift))
    per_anchor = stacked.mean(0) if direction_reduction == "mean" else stacked.sum(0)
    valid = valid.to(per_anchor.device)
    if not bool(valid.any()):
        return per_anchor.sum() * 0.0
    return per_anchor[valid].mean()


def normalized_multimodal_confidences(
    probs: torch.Tensor, labels: torch.Tensor, assignment: torch.Tensor
) -> torch.Tensor:
    """Eq. 6's (c̃_i)_{ỹ^m} = p̃_{class of m} / Σ over the *distinct* source classes of p̃, shape (M, b)."""
    present = torch.zeros_like(probs, dtype=torch.bool)
    for rows in assignment:
        present.scatter_(1, labels[rows][:, None], True)
    denominator = (probs * present).sum(1).clamp_min(torch.finfo(probs.dtype).tiny)
    return (
        torch.stack([probs.gather(1, labels[rows][:, None]).squeeze(1) for rows in assignment]) / denominator
    )


def alpha_update_paper(
    alpha: torch.Tensor,
    unimodal_normalized: torch.Tensor,
    multimodal_normalized: torch.Tensor,
    eta: float,
    alpha_max: float | None,
) -> tuple[torch.Tensor, int, int]:
    """Eq. 5-7 on the batch's valid misaligned samples (inputs (M, n), all shifts pooled).

    m̂ = argmin_m E[c̃^m]; Δ = sign(E[c̃^m̂] − E[(c̃)_{ỹ^m̂}]); α_m̂ ← max(1, α_m̂ + ηΔ), every other α ← 1.
    Returns the new α, m̂ and Δ.
    """
    weak = int(torch.argmin(unimodal_normalized.mean(1)))
    delta = int(torch.sign(unimodal_normalized[weak].mean() - multimodal_normalized[weak].mean()))
    new = torch.ones_like(alpha)
    value = max(1.0, float(alpha[weak]) + eta * delta)
    new[weak] = min(value, alpha_max) if alpha_max is not None else value
    return new, weak, delta


def code_weak_modality(aligned_confidence: torch.Tensor) -> int:
    """The official code's weak modality: from the batch means of the aligned, detached unimodal
    confidences p^m_{i, y_i} (spec §2.4). M = 2: modality 2 if mean p^1 / mean p^2 > 1, else modality 1;
    M > 2 (spec §2.9 item 5): the argmin."""
    means = aligned_confidence.mean(1)
    if means.numel() == 2:
        return 1 if float(means[0] / means[1].clamp_min(1e-12)) > 1 else 0
    return int(torch.argmin(means))


def alpha_update_code(
    alpha: float,
    aligned_confidence: torch.Tensor,
    class_probs_per_shift: Sequence[torch.Tensor],
    eta: float,
    alpha_max: float | None,
) -> tuple[float, int]:
    """The official code's α rule (spec §2.4) for one scalar α.

    ``aligned_confidence`` (M, b): p^m_{i, y_i}; ``class_probs_per_shift``: per misaligned sample shift, the
    fused probabilities (M, n) of the class of each modality's source. M = 2, literally the code:
    r_uni = mean p^1 / mean p^2, r_mm = mean over directions of (mean p̃_{class 1} / mean p̃_{class 2});
    if r_uni > 1 (modality 2 weak) α grows when r_mm > r_uni, else α grows when r_mm < r_uni; otherwise
    it shrinks (ties shrink, A14); α ← max(1, α), capped at ``alpha_max``. M > 2 [inferred]: the same with
    ratios of the other modalities' mean to the weak modality's.
    """
    means = aligned_confidence.mean(1)
    weak = code_weak_modality(aligned_confidence)
    if means.numel() == 2:
        r_uni = float(means[0] / means[1].clamp_min(1e-12))
        r_mm = sum(float(p[0].mean() / p[1].mean().clamp_min(1e-12)) for p in class_probs_per_shift) / len(
            class_probs_per_shift
        )
        grow = r_mm > r_uni if r_uni > 1 else r_mm < r_uni
    else:
        others = [m for m in range(means.numel()) if m != weak]
        rho_uni = float(means[others].mean() / means[weak].clamp_min(1e-12))
        rho_mm = sum(
            float(p[others].mean(1).mean() / p[weak].mean().clamp_min(1e-12)) for p in class_probs_per_shift
        ) / len(class_probs_per_shift)
        grow = rho_mm > rho_uni
    value = max(1.0, alpha + (eta if grow else -eta))
    return (min(value, alpha_max) if alpha_max is not None else value), weak


# ------------------------------------------------------------------------------------------- the method


class MidasParams(Params):
    lam: float = Field(
        default=1.0, ge=0, description="λ of Eq. 11 (paper A.3: 5 for Kinetics-Sounds, else 1)"
    )
    eta: float = Field(default=0.05, gt=0, description="η of Eq. 7")
    warmup_epochs: int = Field(default=10, ge=0, description="Algorithm 1's E_w, in full epochs (A10)")
    use_warmup: bool = Field(default=True, description="ablation W (Table 2)")
    use_weak_modality_weight: bool = Field(default=True, description="ablation WM (Table 2)")
    use_hard_sample_weight: bool = Field(default=True, description="ablation HS (Table 2)")
    pairing: PairingMode = "randperm_masked"
    alpha_mode: Literal["code", "paper"] = "code"
    alpha_reset_each_epoch: bool = False
    alpha_max: float | None = Field(default=10.0, ge=1)
    similarity: Literal["cosine", "l2"] = "cosine"
    uni_reduction: Literal["mean", "sum"] = "mean"
    direction_reduction: Literal["mean", "sum"] = "mean"
    scheduler_after_warmup: bool = Field(
        default=True, description="step the lr schedule only after warm-up (A11)"
    )
    level: Literal["feature", "input"] = "feature"


class MidasCodeParams(MidasParams):
    """The official code's choices: unmasked random permutation, no α cap (the KS preset sets 10)."""

    pairing: PairingMode = "randperm"
    alpha_max: float | None = Field(default=None, ge=1)


@register_method("midas")
class Midas(Method):
    fidelity = "paper"
    Params = MidasParams

    def __init__(self, params: MidasParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.num_modalities = len(context.modalities)
        self.generator = torch.Generator().manual_seed(10_007 * context.seed + 17)
        self.alpha = torch.ones(self.num_modalities)  # paper mode: the vector; code mode: α at [weak]
        self.alpha_code = 1.0
        self.weak_code = self.num_modalities - 1
        self._pending: dict[str, Any] | None = None
        self._reset_epoch_stats()

    # ---- schedule
    @property
    def warmup_epochs(self) -> int:
        return self.params.warmup_epochs if self.params.use_warmup else 0

    def scheduler_should_step(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs or not self.params.scheduler_after_warmup

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self.params.alpha_reset_each_epoch and epoch >= self.warmup_epochs:
            self.alpha = torch.ones(self.num_modalities)
            self.alpha_code = 1.0
        self._reset_epoch_stats()

    def _reset_epoch_stats(self) -> None:
        m = self.num_modalities
        self._stats = {
            "uni": torch.zeros(m, dtype=torch.float64),
            "multi": torch.zeros(m, dtype=torch.float64),
            "count": 0,
            "weak": torch.zeros(m, dtype=torch.float64),
            "steps": 0,
        }

    # ---- the step
    def _modality_weights(self) -> torch.Tensor:
        if not self.params.use_weak_modality_weight:
            return torch.ones(self.num_modalities)
        if self.params.alpha_mode == "paper":
            return self.alpha.clone()
        weights = torch.ones(self.num_modalities)
        weights[self.weak_code] = self.alpha_code
        return weights

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        p = self.params
        labels = batch.labels
        features = model.encode(batch.inputs)
        unimodal_logits = model.unimodal(features)
        unimodal_ce = torch.stack([F.cross_entropy(unimodal_logits[m], labels) for m in model.modalities])
        loss_uni = unimodal_ce.mean() if p.uni_reduction == "mean" else unimodal_ce.sum()  # Eq. 9, A3
        logs = {"loss_unimodal": loss_uni.item()}
        if epoch < self.warmup_epochs:  # Algorithm 1, lines 4-8: encoders and unimodal heads only
            return StepOutput(loss=loss_uni, logs=logs)

        loss_align = F.cross_entropy(model.fuse(features), labels)  # Eq. 9
        unimodal_probs = torch.stack(
            [F.softmax(unimodal_logits[m].detach().float(), dim=1) for m in model.modalities]
        )  # (M, b, C), detached (A4)
        rows = torch.arange(labels.numel(), device=labels.device)
        aligned_confidence = unimodal_probs[:, rows, labels]  # (M, b): p^m_{i, y_i}
        if p.alpha_mode == "code":
            self.weak_code = code_weak_modality(aligned_confidence)  # chosen per batch, before the loss
        modality_weights = self._modality_weights().to(labels.device)

        mis = draw_sources(labels, self.num_modalities, p.pairing, self.generator)
        sources, valid = mis.sources.to(labels.device), mis.valid.to(labels.device)
        names = model.modalities
        per_shift, uni_norm, multi_norm, class_probs = [], [], [], []
        for shift in range(self.num_modalities):
            assignment = shift_sources(sources, shift)
            normalized = normalized_unimodal_confidences(unimodal_probs, labels, assignment)  # Eq. 2
            if p.level == "feature":  # Eq. 12: reuse the aligned features
                mixed = {m: features[m][assignment[k]] for k, m in enumerate(names)}
            else:  # Eq. 1 at the input level: encode the misaligned inputs again
                mixed = model.encode({m: batch.inputs[m][assignment[k]] for k, m in enumerate(names)})
            logits = model.fuse(mixed)
            if p.use_hard_sample_weight:
                swapped = swapped_modalities(self.num_modalities, shift)
                similarity = torch.stack(
                    [
                        feature_similarity(
                            features[names[k]], features[names[k]][assignment[k]], p.similarity, valid
                        )
                        for k in swapped
                    ]
                ).mean(0)  # App. A.2: mean over the replaced modalities
                sample_weights = hard_sample_weight(similarity)
            else:
                sample_weights = torch.ones_like(labels, dtype=torch.float32)
            per_shift.append(
                misaligned_loss_per_sample(
                    logits, labels, assignment, normalized, modality_weights, sample_weights
                )
            )
            probs = F.softmax(logits.detach().float(), dim=1)
            uni_norm.append(normalized[:, valid])
            multi_norm.append(normalized_multimodal_confidences(probs, labels, assignment)[:, valid])
            class_probs.append(torch.stack([probs[valid, labels[r][valid]] for r in assignment]))
        loss_mis = reduce_misaligned_loss(per_shift, valid, p.direction_reduction)  # Eq. 11, A2
        loss = loss_align + loss_uni + p.lam * loss_mis  # Eq. 11

        n_valid = int(valid.sum())
        if n_valid:
            uni_all, multi_all = torch.cat(uni_norm, 1).cpu(), torch.cat(multi_norm, 1).cpu()
            self._stats["uni"] += uni_all.double().sum(1)
            self._stats["multi"] += multi_all.double().sum(1)
            self._stats["count"] += uni_all.shape[1]
            self._pending = {
                "uni": uni_all,
                "multi": multi_all,
                "aligned": aligned_confidence.cpu(),
                "class_probs": [c.cpu() for c in class_probs],
            }
        else:  # single-class batch: no misaligned loss and no α update (spec §2.2)
            self._pending = None
        logs.update(
            loss_align=loss_align.item(),
            loss_misaligned=loss_mis.item(),
            valid_pairs=n_valid / labels.numel(),
        )
        return StepOutput(loss=loss, logs=logs)

    def after_optimizer_step(self, model: MultimodalModel, epoch: int) -> None:
        """Algorithm 1, lines 24-27: α moves after the step, from statistics of the step's forward pass."""
        pending, self._pending = self._pending, None
        if epoch < self.warmup_epochs or not self.params.use_weak_modality_weight:
            return
        if pending is not None:
            p = self.params
            if p.alpha_mode == "paper":
                self.alpha, weak, _ = alpha_update_paper(
                    self.alpha, pending["uni"], pending["multi"], p.eta, p.alpha_max
                )
            else:
                self.alpha_code, weak = alpha_update_code(
                    self.alpha_code, pending["aligned"], pending["class_probs"], p.eta, p.alpha_max
                )
            self._stats["steps"] += 1
            self._stats["weak"][weak] += 1
        self._share_alpha_across_ranks(model)

    def _share_alpha_across_ranks(self, model: MultimodalModel) -> None:
        """Under data parallelism every rank updates α from its own batch; rank 0's α is then given to
        all ranks so the loss weights stay identical everywhere (and match the checkpointed α). Every rank
        calls this at every post-warm-up step, whatever its batch held, so the collectives line up."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = next(model.parameters()).device  # NCCL reduces GPU tensors only
        state = torch.cat([self.alpha, torch.tensor([self.alpha_code, float(self.weak_code)])]).to(device)
        dist.broadcast(state, src=0)
        state = state.cpu()
        self.alpha = state[: self.num_modalities].clone()
        self.alpha_code, self.weak_code = float(state[-2]), int(state[-1])

    def current_alpha(self) -> torch.Tensor:
        """α per modality as applied to the next step's loss."""
        if self.params.alpha_mode == "paper":
            return self.alpha.clone()
        alpha = torch.ones(self.num_modalities)
        alpha[self.weak_code] = self.alpha_code
        return alpha

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        """α per modality and the training confidences of Fig. 3 (means over the epoch's valid misaligned
        samples of c̃^m, "Uni", and of the normalised fused confidence for modality m's class, "Multi")."""
        out = {f"alpha_{m}": float(a) for m, a in zip(model.modalities, self.current_alpha(), strict=True)}
        count, steps = self._stats["count"], self._stats["steps"]
        for k, m in enumerate(model.modalities):
            if count:
                out[f"train_conf_uni_{m}"] = float(self._stats["uni"][k] / count)
                out[f"train_conf_multi_{m}"] = float(self._stats["multi"][k] / count)
            if steps:
                out[f"weak_share_{m}"] = float(self._stats["weak"][k] / steps)
        return out

    # ---- state kept across steps (spec P-M6: α must survive a checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.clone(),
            "alpha_code": self.alpha_code,
            "weak_code": self.weak_code,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = state["alpha"].clone()
        self.alpha_code = float(state["alpha_code"])
        self.weak_code = int(state["weak_code"])
        self.generator.set_state(state["generator"])


@register_method("midas-code")
class MidasCode(Midas):
    fidelity = "official-code"
    Params = MidasCodeParams
