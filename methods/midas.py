"""MIDAS, misalignment-based data augmentation (Hwang, Choi, Whang, NeurIPS 2025): ``midas``, ``midas-code``
and ``midas-paper``.

For every aligned sample the batch also yields misaligned samples whose modalities come from samples of
different classes (Eq. 1, at feature level Eq. 12). Each is supervised with a soft label built from the
detached unimodal confidences of its sources (Eq. 2-4), its loss is re-weighted by a weak-modality weight
α (Eq. 5-7) and a hard-sample weight from the similarity of the swapped features (Eq. 8, 10), and the
total objective adds it to the aligned and unimodal losses (Eq. 9, 11). Warm-up epochs train only the
encoders and unimodal heads (Algorithm 1). Every ambiguity of the paper is a named switch
(``../shared/spec/methods.md`` §2; decisions A1-A14 there):

* ``pairing`` (§2.2): ``randperm`` (official code: one permutation, no label check), ``randperm_masked``
  (pairs with equal labels are left out of L_mis and of the α statistics), ``resample_diff_label`` (a
  different-label partner drawn for every sample).
* ``alpha_mode`` (§2.4): ``code`` (one scalar α on the batch's weak modality, chosen from the ratio of
  aligned unimodal confidences; the official code's update rule) or ``paper`` (a per-modality vector,
  Eq. 5-7). ``alpha_ratio``: how the code rule forms its ratios, which differs between the official
  files (``first_over_second``: CREMA-D, UCF-101; ``second_over_first``: Food-101; ``dominant_over_weak``:
  Kinetics-Sounds). ``alpha_reset_each_epoch`` (A1), ``alpha_max`` (A12).
* ``uni_reduction`` and ``direction_reduction`` (A2, A3): mean (official code, λ was tuned with it) or the
  sums the paper writes.
* ``similarity``: ``cosine`` (Eq. 8) or ``l2`` for the paper's Table 4. The paper gives no mapping from an
  L2 distance to a similarity; ours is ``s = 2·exp(−d / d̄) − 1`` with ``d̄`` the mean distance over the
  batch's valid pairs, so ``s`` lies in (−1, 1], equals 1 for identical features and falls with distance.
* ``level``: ``feature`` (App. A.3, reuses the aligned features) or ``input`` (re-encodes the misaligned
  inputs; for the cost comparison of Table 8).
* Ablations of Table 2: ``use_warmup`` (W), ``use_weak_modality_weight`` (WM), ``use_hard_sample_weight``
  (HS).

The three registered variants (one class each; per-dataset λ, η, warm-up and code switches in
``dataset_defaults``, keyed by ``data.name``):

* ``midas`` (fidelity ``inferred``, the recommended one): the official code's α rule (scalar α, ratio of
  batch means, A7; never reset, A1) and its mean reductions (A2, A3), because the code is the best
  evidence of what produced the paper's numbers and λ was tuned with them (Table 6); and the paper's
  y_j ≠ y_i through ``randperm_masked``.
  Departures from the official code: same-label pairs and self-pairs are masked instead of trained on as
  up-weighted aligned samples (P-M3); α is capped at 10 on every dataset (the code caps only KS, A12);
  one ratio rule, ``first_over_second``, on every dataset (no Food-101 orientation, no KS flip, P-M5);
  the lr schedule waits for warm-up on every dataset (the Food-101 code does not). Neither the paper nor
  the code alone, hence ``inferred``.
* ``midas-code`` (``official-code``): the official per-dataset model files. One unmasked ``randperm`` per
  step, no α cap but KS's 10, and per dataset the file's ratio rule (Food-101 ``second_over_first``, which
  is the CREMA-D rule with the modality order reversed; KS ``dominant_over_weak``) and, for Food-101, a
  schedule stepped every epoch (``model_midas_food101.py:259`` steps it at each last batch, warm-up or
  not; the other files wait, e.g. ``model_midas_cremad.py:296``).
  Its loss step matches the official CREMA-D and UCF-101 steps to float32 rounding. Departures: α moves
  after the optimiser step from the step's own forward statistics (the code moves it inside the forward,
  after the loss is built: the same α per step); r_mm's two directions are averaged in float64; under data
  parallelism rank 0's α is given to every rank; for M > 2 (no official code) the [inferred] rule of
  spec §2.9. The code's config plumbing, metrics and early stopping (P-M1, P-M4, P-M9, P-M10) are not
  the method's and are not replicated.
* ``midas-paper`` (``paper``): the equations read literally. Eq. 5-7's per-modality α (the non-weak entry
  reset to 1 every step, ties leave α unchanged, A8, A14), no cap (Eq. 7, A12), α re-initialised to 1 at
  every post-warm-up epoch (Alg. 1 line 11 sits inside the epoch loop; A1: Fig. 4 cannot tell the two
  readings apart in the text we have), L_uni summed over modalities (Eq. 9) and both directions summed in
  L_mis (Eq. 11, one L_mis per misaligned sample), and for every x_i a random x_j with y_j ≠ y_i
  (§3.2, ``resample_diff_label``: every anchor gets a partner, so Eq. 11's mean runs over the whole batch).
  Where the paper is silent it keeps the code: detached soft labels and similarities (A4, A5), gradients
  into both encoders (A13), the schedule after warm-up (A11), warm-up in full epochs (A10; the paper
  gives no E_w values, the code's are used). Its departures from the official code are the literal
  readings listed first.

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
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method

PairingMode = Literal["randperm", "randperm_masked", "resample_diff_label"]
AlphaRatio = Literal["first_over_second", "second_over_first", "dominant_over_weak"]

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


@dataclass(frozen=True)
class CodeAlphaDecision:
    """One step of the official code's α rule: its two ratios, the weak modality α multiplies, and whether
    α grows (else it shrinks; ties shrink, A14)."""

    r_uni: float
    r_mm: float
    weak: int
    grow: bool


def _ratio_of_means(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    return float(numerator.mean() / denominator.mean().clamp_min(1e-12))


def _mean_over_shifts(
    class_probs_per_shift: Sequence[torch.Tensor], numerator: int, denominator: int
) -> float:
    """r_mm: per shift the ratio of the mean fused probabilities of two modalities' source classes, then
    the plain mean over shifts (``(mm_ratio_1 + mm_ratio_2) / 2`` in every official file)."""
    return sum(_ratio_of_means(p[numerator], p[denominator]) for p in class_probs_per_shift) / len(
        class_probs_per_shift
    )


def code_weak_modality(aligned_confidence: torch.Tensor, ratio: AlphaRatio = "first_over_second") -> int:
    """The official code's weak modality: from the batch means of the aligned, detached unimodal
    confidences p^m_{i, y_i} (spec §2.4). M = 2: ``first_over_second`` and ``dominant_over_weak``
    (CREMA-D, UCF-101, KS code) take modality 2 if mean p^1 / mean p^2 > 1, else modality 1;
    ``second_over_first`` (Food-101 code) takes modality 1 if mean p^2 / mean p^1 > 1, else modality 2, so
    a tie picks the other modality. M > 2 (spec §2.9 item 5): the argmin."""
    means = aligned_confidence.mean(1)
    if means.numel() == 2:
        if ratio == "second_over_first":
            return 0 if float(means[1] / means[0].clamp_min(1e-12)) > 1 else 1
        return 1 if float(means[0] / means[1].clamp_min(1e-12)) > 1 else 0
    return int(torch.argmin(means))


def code_alpha_decision(
    aligned_confidence: torch.Tensor,
    class_probs_per_shift: Sequence[torch.Tensor],
    ratio: AlphaRatio = "first_over_second",
) -> CodeAlphaDecision:
    """The official code's grow/shrink decision for its scalar α (spec §2.4), one branch per official file.

    ``aligned_confidence`` (M, b): p^m_{i, y_i}; ``class_probs_per_shift``: per misaligned sample shift, the
    fused probabilities (M, n) of the class of each modality's source. Below, p̄^m is the batch mean of
    p^m_{i, y_i} and q̄^m_d the mean fused probability of modality m's source class in shift d.
    """
    means = aligned_confidence.mean(1)
    weak = code_weak_modality(aligned_confidence, ratio)
    if means.numel() != 2:  # M > 2 [inferred, spec §2.9 item 5]: the other modalities' mean over the weak one
        if ratio != "first_over_second":
            raise ValueError(f"alpha_ratio {ratio!r} is the official code's rule for two modalities only")
        others = [m for m in range(means.numel()) if m != weak]
        rho_uni = float(means[others].mean() / means[weak].clamp_min(1e-12))
        rho_mm = sum(
            float(p[others].mean(1).mean() / p[weak].mean().clamp_min(1e-12)) for p in class_probs_per_shift
        ) / len(class_probs_per_shift)
        return CodeAlphaDecision(rho_uni, rho_mm, weak, rho_mm > rho_uni)
    if ratio == "first_over_second":
        # CREMA-D and UCF-101 code (spec §2.4; model_midas_cremad.py:124-169, model_midas_ucf101.py:128-175):
        # r_uni = p̄¹/p̄², r_mm = mean_d q̄¹_d/q̄²_d; grow while the fused model is more skewed toward the
        # dominant modality than the unimodal heads: r_mm > r_uni if r_uni > 1, r_mm < r_uni otherwise.
        r_uni = float(means[0] / means[1].clamp_min(1e-12))
        r_mm = _mean_over_shifts(class_probs_per_shift, 0, 1)
        grow = r_mm > r_uni if r_uni > 1 else r_mm < r_uni
    elif ratio == "second_over_first":
        # Food-101 code (spec §2.4; model_midas_food101.py:124-169): both ratios image/text with the text
        # modality first, i.e. r_uni = p̄²/p̄¹ and r_mm = mean_d q̄²_d/q̄¹_d (not the reciprocal of the
        # CREMA-D r_mm: a mean of ratios), with the same grow test.
        r_uni = float(means[1] / means[0].clamp_min(1e-12))
        r_mm = _mean_over_shifts(class_probs_per_shift, 1, 0)
        grow = r_mm > r_uni if r_uni > 1 else r_mm < r_uni
    else:
        # Kinetics-Sounds code (spec §2.4 "KS variant", P-M5; model_midas_kinetics.py:118-162):
        # r_uni = p̄¹/p̄² always, r_mm oriented dominant/weak (q̄¹/q̄² if r_uni > 1, else q̄²/q̄¹), and one
        # test, r_mm > r_uni. With r_uni ≤ 1 that compares modality 2/1 with 1/2: α grows unless
        # q̄¹/q̄² ≥ p̄²/p̄¹, i.e. unless the fused model leans to the weak modality 1 at least as much as the
        # unimodal heads lean to modality 2.
        r_uni = float(means[0] / means[1].clamp_min(1e-12))
        r_mm = (
            _mean_over_shifts(class_probs_per_shift, 0, 1)
            if r_uni > 1
            else _mean_over_shifts(class_probs_per_shift, 1, 0)
        )
        grow = r_mm > r_uni
    return CodeAlphaDecision(r_uni, r_mm, weak, grow)


def alpha_update_code(
    alpha: float,
    aligned_confidence: torch.Tensor,
    class_probs_per_shift: Sequence[torch.Tensor],
    eta: float,
    alpha_max: float | None,
    ratio: AlphaRatio = "first_over_second",
) -> tuple[float, int]:
    """The official code's α rule (spec §2.4) for one scalar α: α ± η from ``code_alpha_decision``, then
    α ← max(1, α), capped at ``alpha_max`` (the KS code's ``max(1, min(10, α))``). Returns α and the weak
    modality."""
    decision = code_alpha_decision(aligned_confidence, class_probs_per_shift, ratio)
    value = max(1.0, alpha + (eta if decision.grow else -eta))
    return (min(value, alpha_max) if alpha_max is not None else value), decision.weak


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
    alpha_ratio: AlphaRatio = Field(
        default="first_over_second",
        description="alpha_mode=code, two modalities: how the code's rule forms its ratios (spec §2.4). "
        "first_over_second: r_uni = mean p^1 / mean p^2 and r_mm = mean over directions of the fused "
        "ratio for the classes of modality 1 and 2 (the CREMA-D and UCF-101 code); second_over_first: "
        "both ratios modality 2 over modality 1, weak = modality 1 when r_uni > 1 (the Food-101 code, "
        "image/text with text first); dominant_over_weak: r_uni = mean p^1 / mean p^2 but r_mm oriented "
        "dominant/weak, α grows iff r_mm > r_uni (the Kinetics-Sounds code, flipped when r_uni <= 1)",
    )
    alpha_reset_each_epoch: bool = Field(default=False, description="Alg. 1 line 11 read literally (A1)")
    alpha_max: float | None = Field(default=10.0, ge=1, description="cap on α (A12; Eq. 7 has none)")
    similarity: Literal["cosine", "l2"] = "cosine"
    uni_reduction: Literal["mean", "sum"] = Field(
        default="mean", description="L_uni: mean (code) or sum (Eq. 9)"
    )
    direction_reduction: Literal["mean", "sum"] = Field(
        default="mean", description="L_mis directions: mean (code) or sum (Eq. 11)"
    )
    scheduler_after_warmup: bool = Field(
        default=True, description="step the lr schedule only after warm-up (A11)"
    )
    level: Literal["feature", "input"] = "feature"


class MidasCodeParams(MidasParams):
    """The official code's choices: unmasked random permutation, no α cap (the KS defaults set 10)."""

    pairing: PairingMode = "randperm"
    alpha_max: float | None = Field(default=None, ge=1, description="cap on α (the KS code's 10)")


class MidasPaperParams(MidasParams):
    """The paper's equations read literally (spec §2.2, §2.4, §2.6, §2.8)."""

    pairing: PairingMode = "resample_diff_label"  # §3.2: for each x_i, a random x_j with y_j != y_i
    alpha_mode: Literal["code", "paper"] = "paper"  # Eq. 5-7: per-modality vector
    alpha_reset_each_epoch: bool = Field(default=True, description="Alg. 1 line 11 (A1)")
    alpha_max: float | None = Field(default=None, ge=1, description="cap on α (Eq. 7 has none, A12)")
    uni_reduction: Literal["mean", "sum"] = Field(default="sum", description="Eq. 9: Σ_m CE")
    direction_reduction: Literal["mean", "sum"] = Field(
        default="sum", description="Eq. 11: one L_mis per misaligned sample, both directions summed"
    )


# Per-dataset defaults (``data.name`` → ``method.params``), applied under what the user sets. λ and η from
# paper App. A.3 (λ = 5 for Kinetics-Sounds, 1 for the others; η = 5e-2 everywhere), warm-up from the
# official ``configs/default_config.py:get_method_config`` (lines 236-245) where the code has the dataset.
MIDAS_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cremad": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 10},  # A.3; default_config.py:238-239
    "food101": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 2},  # A.3; default_config.py:242-243
    "kinetics_sounds": {"lam": 5.0, "eta": 0.05, "warmup_epochs": 10},  # A.3; default_config.py:244-245
    "mosi": {
        "lam": 1.0,
        "eta": 0.05,
        "warmup_epochs": 10,
    },  # A.3 λ; warm-up as the from-scratch sets [inferred]
    "sarcasm": {
        "lam": 1.0,
        "eta": 0.05,
        "warmup_epochs": 2,
    },  # A.3 λ; warm-up as Food-101, same encoders [inferred]
    "twitter2015": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 2},  # A.3 λ; warm-up as Food-101 [inferred]
    "ucf101": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 0},  # A.3; default_config.py:240-241 (no warm-up)
}

# ``midas-code``: the same, plus what the official per-dataset model files do differently. Our food101
# modalities are (text, visual), the code's concatenation order (model_midas_food101.py:96), and
# kinetics_sounds (audio, visual), as in model_midas_kinetics.py:95.
MIDAS_CODE_DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cremad": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 10},  # model_midas_cremad.py:105-106, 124-169
    "food101": {  # model_midas_food101.py:124-171 (image/text ratios); :259-260 schedule stepped every epoch
        "lam": 1.0,
        "eta": 0.05,
        "warmup_epochs": 2,
        "alpha_ratio": "second_over_first",
        "scheduler_after_warmup": False,
    },
    "kinetics_sounds": {  # model_midas_kinetics.py:118-164 (flipped r_mm, α capped at 10, λ = 5)
        "lam": 5.0,
        "eta": 0.05,
        "warmup_epochs": 10,
        "alpha_ratio": "dominant_over_weak",
        "alpha_max": 10.0,
    },
    "mosi": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 10},  # no official code: as midas [inferred]
    "sarcasm": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 2},  # no official code: as midas [inferred]
    "twitter2015": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 2},  # no official code: as midas [inferred]
    "ucf101": {"lam": 1.0, "eta": 0.05, "warmup_epochs": 0},  # model_midas_ucf101.py:128-175; config :240-241
}


@register_method("midas")
class Midas(Method):
    """MIDAS with the official code's α rule and mean reductions, same-label pairs masked (recommended)."""

    fidelity = "inferred"
    Params = MidasParams
    dataset_defaults = MIDAS_DATASET_DEFAULTS

    def __init__(self, params: MidasParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.num_modalities = len(context.modalities)
        uses_two_modality_rule = params.alpha_mode == "code" and params.alpha_ratio != "first_over_second"
        if uses_two_modality_rule and self.num_modalities != 2:
            raise ConfigError(
                f"method.params.alpha_ratio: {params.alpha_ratio!r} is the official code's rule for two "
                f"modalities; this dataset has {self.num_modalities}, use 'first_over_second'"
            )
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
        logs = {"loss_unimodal": loss_uni.detach()}
        if epoch < self.warmup_epochs:  # Algorithm 1, lines 4-8: encoders and unimodal heads only
            return StepOutput(loss=loss_uni, logs=logs)

        loss_align = F.cross_entropy(model.fuse(features), labels)  # Eq. 9
        unimodal_probs = torch.stack(
            [F.softmax(unimodal_logits[m].detach().float(), dim=1) for m in model.modalities]
        )  # (M, b, C), detached (A4)
        rows = torch.arange(labels.numel(), device=labels.device)
        aligned_confidence = unimodal_probs[:, rows, labels]  # (M, b): p^m_{i, y_i}
        if p.alpha_mode == "code":
            # chosen per batch, before the loss
            self.weak_code = code_weak_modality(aligned_confidence, p.alpha_ratio)
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
                mixed = model.encode(batch.inputs.rows({m: assignment[k] for k, m in enumerate(names)}))
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
            loss_align=loss_align.detach(),
            loss_misaligned=loss_mis.detach(),
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
                    self.alpha_code,
                    pending["aligned"],
                    pending["class_probs"],
                    p.eta,
                    p.alpha_max,
                    p.alpha_ratio,
                )
            self._stats["steps"] += 1
            self._stats["weak"][weak] += 1
        self._share_alpha_across_ranks(model)

    def _share_alpha_across_ranks(self, model: MultimodalModel) -> None:
        """Under data parallelism every rank updates α from its own batch; rank 0's α is then given to
        all ranks through the runtime (spec §20.4 R6), so the loss weights stay identical everywhere and
        match the checkpointed α. Every rank calls this at every post-warm-up step, whatever its batch
        held, so the collectives line up; on one process it changes nothing."""
        if not self.runtime.distributed:
            return
        state = torch.cat([self.alpha, torch.tensor([self.alpha_code, float(self.weak_code)])])
        state = self.runtime.broadcast(state, src=0)
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
    """MIDAS as the official per-dataset model files compute it, quirks included."""

    fidelity = "official-code"
    Params = MidasCodeParams
    dataset_defaults = MIDAS_CODE_DATASET_DEFAULTS


@register_method("midas-paper")
class MidasPaper(Midas):
    """MIDAS as the paper's equations read literally (Eq. 5-7 vector α, sums of Eq. 9 and 11)."""

    fidelity = "paper"
    Params = MidasPaperParams
    dataset_defaults = MIDAS_DATASET_DEFAULTS  # λ, η and warm-up as ``midas`` (the paper gives no E_w)
