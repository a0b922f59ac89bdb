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
  inputs; for the cost comparison of Table 8). At feature level the aligned batch and the M misaligned
  batches go through the fusion head as one batch of (1 + M)·b rows (the official code calls it once per
  direction): the same values for every fusion head of the registry, which all act row by row; a fusion
  head with batch statistics would see the rows together.
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

import functools
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
#
# Every function works on whole batches and on all M misaligned samples of an anchor at once (a leading
# "shift" axis S = M), with the valid anchors as a mask rather than a selection: nothing here reads a
# value back to the host, so a step issues its kernels without waiting for the device (issue 13).


@dataclass(frozen=True)
class Misalignment:
    """Sources of the misaligned samples of one batch.

    ``sources[0]`` is the anchor itself (``arange(b)``) and ``sources[r]`` its r-th partner; ``valid`` marks
    the anchors whose misaligned samples enter L_mis and the α statistics.
    """

    sources: torch.Tensor  # (M, b) long, on the labels' device
    valid: torch.Tensor  # (b,) bool, on the labels' device


def _different_label_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each i a uniform draw among the rows with another label (spec §2.2 ``resample_diff_label``),
    among all rows when there is none: the k-th candidate for k = ⌊u · #candidates⌋, u ~ U[0, 1) from the
    (host) generator, found on the device by counting the candidates before it."""
    candidates = labels[None, :] != labels[:, None]
    candidates |= ~candidates.any(1, keepdim=True)
    counts = candidates.sum(1)
    u = torch.rand(labels.numel(), generator=generator, dtype=torch.float64)
    k = torch.minimum((u.to(labels.device, non_blocking=True) * counts).long(), counts - 1)
    return (candidates.cumsum(1) <= k[:, None]).sum(1)


def draw_sources(
    labels: torch.Tensor, num_modalities: int, mode: PairingMode, generator: torch.Generator
) -> Misalignment:
    """Eq. 1 / Eq. 12 (and App. A.2 for M > 2): partners drawn within the batch.

    The draws come from a host generator (the same on every rank and after a resume); the permutation
    travels to the device without a wait, the label checks run there.
    """
    b, device = labels.numel(), labels.device
    partners = [
        _different_label_partners(labels, generator)
        if mode == "resample_diff_label"
        else torch.randperm(b, generator=generator).to(device, non_blocking=True)
        for _ in range(num_modalities - 1)
    ]
    sources = torch.stack([torch.arange(b, device=device), *partners])
    if mode == "randperm":  # the official code: every pair counts, same-label pairs and fixed points too
        return Misalignment(sources=sources, valid=torch.ones(b, dtype=torch.bool, device=device))
    source_labels = labels[sources]  # the paper's y_j != y_i (A.2: at least two distinct labels)
    return Misalignment(sources=sources, valid=(source_labels != source_labels[:1]).any(0))


def all_shifts(sources: torch.Tensor) -> torch.Tensor:
    """(M, b) sources → (S = M, M, b): ``[s, m]`` is the row that provides modality m in misaligned sample
    s, the cyclic shift ``sources[(m − s) mod M]``.

    For M = 2: shift 0 is ``(x_i^1, x_j^2)`` (direction A), shift 1 is ``(x_j^1, x_i^2)`` (direction B).
    """
    return sources[_shift_order(sources.shape[0], sources.device)]


@functools.cache
def _shift_order(num_modalities: int, device: torch.device) -> torch.Tensor:
    """(S, M): ``(m − s) mod M``, made once per modality count and device."""
    m = torch.arange(num_modalities)
    return ((m[None, :] - m[:, None]) % num_modalities).to(device)


def swapped_mask(num_modalities: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(S, M) bool: the modalities that come from a partner in misaligned sample s (App. A.2's R_i)."""
    return _shift_order(num_modalities, torch.device(device)) != 0


def normalized_unimodal_confidences(
    aligned_confidence: torch.Tensor, assignments: torch.Tensor
) -> torch.Tensor:
    """Eq. 2 (App. A.2 for M > 2): c̃^m = (p^m_{k_m})_{y_{k_m}} / Σ_l (p^l_{k_l})_{y_{k_l}}.

    ``aligned_confidence`` (M, b): the aligned, detached (A4) unimodal confidences p^m_{i, y_i}, so the
    soft labels are constants and train no head; ``assignments`` (..., M, b): the source rows. Returns
    (..., M, b).
    """
    expanded = aligned_confidence.expand(*assignments.shape[:-2], *aligned_confidence.shape)
    confidences = torch.gather(expanded, -1, assignments)
    return confidences / confidences.sum(-2, keepdim=True).clamp_min(torch.finfo(confidences.dtype).tiny)


def soft_labels(normalized: torch.Tensor, source_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 3: ỹ = Σ_m c̃^m · onehot(y of modality m's source), (b, C) from (M, b) inputs; rows sum to one."""
    target = torch.zeros(
        source_labels.shape[1], num_classes, dtype=normalized.dtype, device=normalized.device
    )
    return target.scatter_add_(1, source_labels.t(), normalized.t())


def feature_similarity(
    features: torch.Tensor, rows: torch.Tensor, metric: Literal["cosine", "l2"], valid: torch.Tensor
) -> torch.Tensor:
    """Eq. 8: similarity of the features swapped in from ``rows`` (..., b) to each anchor's own
    (``features``, (b, d)), detached (A5), in [−1, 1], shape (..., b).

    ``cosine``: x·y / (max(‖x‖, ε) · max(‖y‖, ε)), ``F.cosine_similarity``'s formula with each row's norm
    taken once per batch. ``l2``: ``2·exp(−d / d̄) − 1`` with d̄ the mean distance over the valid anchors
    (over all when none is valid).
    """
    features = features.detach().float()
    if metric == "cosine":
        unit = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return (unit[rows] * unit).sum(-1)
    distance = (features[rows] - features).norm(dim=-1)
    n_valid = valid.sum()
    scale = torch.where(n_valid > 0, masked_mean(distance, valid), distance.mean(-1)).clamp_min(1e-8)
    return 2.0 * torch.exp(-distance / scale[..., None]) - 1.0


def hard_sample_weight(similarity: torch.Tensor) -> torch.Tensor:
    """Eq. 10's factor 1 + (s̃ + 1)/2, in [1, 2]: harder (more similar) swaps weigh more."""
    return 1.0 + (similarity + 1.0) / 2.0


def misaligned_loss_per_sample(
    logits: torch.Tensor,
    source_labels: torch.Tensor,
    normalized: torch.Tensor,
    modality_weights: torch.Tensor,
    sample_weights: torch.Tensor,
) -> torch.Tensor:
    """Eq. 10 (with Eq. 4): w_i · Σ_m α_m c̃^m_i · CE(z̃_i, y of modality m's source).

    ``logits`` (..., b, C); ``source_labels`` and ``normalized`` (..., M, b); ``modality_weights`` (M,);
    ``sample_weights`` (..., b). Returns (..., b). The α-weighted target is not renormalised (spec §2.6):
    α also scales the loss.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    per_modality = -log_probs.gather(-1, source_labels.transpose(-1, -2)).transpose(-1, -2)  # (..., M, b)
    weighted = modality_weights[:, None].to(per_modality) * normalized.to(per_modality) * per_modality
    return sample_weights.to(per_modality) * weighted.sum(-2)


def reduce_misaligned_loss(
    per_shift: torch.Tensor | Sequence[torch.Tensor],
    valid: torch.Tensor,
    direction_reduction: Literal["mean", "sum"],
) -> torch.Tensor:
    """L_mis of Eq. 11 from the (S, b) per-sample losses: directions averaged (code, A2) or summed
    (paper), then the mean over valid anchors; zero (still part of the graph) when no anchor is valid,
    e.g. a single-class batch."""
    stacked = per_shift if isinstance(per_shift, torch.Tensor) else torch.stack(list(per_shift))
    per_anchor = stacked.mean(0) if direction_reduction == "mean" else stacked.sum(0)
    valid = valid.to(per_anchor.device)
    return torch.where(valid, per_anchor, 0.0).sum() / valid.sum().clamp_min(1)


def source_class_probs(probs: torch.Tensor, source_labels: torch.Tensor) -> torch.Tensor:
    """The fused probability of each modality's source class: (..., b, C), (..., M, b) → (..., M, b)."""
    return probs.gather(-1, source_labels.transpose(-1, -2)).transpose(-1, -2)


def normalized_multimodal_confidences(probs: torch.Tensor, source_labels: torch.Tensor) -> torch.Tensor:
    """Eq. 6's (c̃_i)_{ỹ^m} = p̃_{class of m} / Σ over the *distinct* source classes of p̃, (..., M, b)."""
    present = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, source_labels.transpose(-1, -2), True)
    denominator = (probs * present).sum(-1).clamp_min(torch.finfo(probs.dtype).tiny)  # (..., b)
    return source_class_probs(probs, source_labels) / denominator.unsqueeze(-2)


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(..., b) → (...): the mean over the anchors, the valid ones only when ``valid`` is given."""
    if valid is None:
        return values.mean(-1)
    return torch.where(valid, values, 0.0).sum(-1) / valid.sum().clamp_min(1)


def masked_modality_means(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(..., M, b) → (M,): per modality the mean over every leading index and the valid anchors."""
    return masked_mean(values, valid).reshape(-1, values.shape[-2]).mean(0)


def _at(values: torch.Tensor, index: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``values[..., index]`` along ``dim`` for a 0-d index tensor, without reading the index on the host."""
    return values.index_select(dim, index.reshape(1)).squeeze(dim)


def alpha_update_paper(
    alpha: torch.Tensor,
    unimodal_normalized: torch.Tensor,
    multimodal_normalized: torch.Tensor,
    eta: float,
    alpha_max: float | None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5-7 on the batch's valid misaligned samples (inputs (..., M, b), all shifts pooled).

    m̂ = argmin_m E[c̃^m]; Δ = sign(E[c̃^m̂] − E[(c̃)_{ỹ^m̂}]); α_m̂ ← max(1, α_m̂ + ηΔ), every other α ← 1.
    Returns the new α, m̂ and Δ (0-d tensors; the arithmetic in float64 as on a Python float).
    """
    uni, multi = (
        masked_modality_means(unimodal_normalized, valid),
        masked_modality_means(multimodal_normalized, valid),
    )
    weak = torch.argmin(uni)
    delta = torch.sign(_at(uni, weak) - _at(multi, weak))
    value = (_at(alpha, weak).double() + eta * delta.double()).clamp_min(1.0)
    if alpha_max is not None:
        value = value.clamp_max(alpha_max)
    modalities = torch.arange(alpha.numel(), device=alpha.device)
    return torch.where(modalities == weak, value.to(alpha.dtype), 1.0).to(alpha.dtype), weak, delta


@dataclass(frozen=True)
class CodeAlphaDecision:
    """One step of the official code's α rule: its two ratios, the weak modality α multiplies, and whether
    α grows (else it shrinks; ties shrink, A14). 0-d tensors, so the step never waits for them."""

    r_uni: torch.Tensor
    r_mm: torch.Tensor
    weak: torch.Tensor
    grow: torch.Tensor


def _mean_of_shift_ratios(shift_means: torch.Tensor, numerator: int, denominator: int) -> torch.Tensor:
    """r_mm: per shift the ratio of the mean fused probabilities of two modalities' source classes (in
    float32), then the plain mean over shifts in float64 (``(mm_ratio_1 + mm_ratio_2) / 2`` on Python
    floats in every official file)."""
    ratios = shift_means[:, numerator] / shift_means[:, denominator].clamp_min(1e-12)
    return ratios.double().mean()


def code_weak_modality(
    aligned_confidence: torch.Tensor, ratio: AlphaRatio = "first_over_second"
) -> torch.Tensor:
    """The official code's weak modality: from the batch means of the aligned, detached unimodal
    confidences p^m_{i, y_i} (spec §2.4). M = 2: ``first_over_second`` and ``dominant_over_weak``
    (CREMA-D, UCF-101, KS code) take modality 2 if mean p^1 / mean p^2 > 1, else modality 1;
    ``second_over_first`` (Food-101 code) takes modality 1 if mean p^2 / mean p^1 > 1, else modality 2, so
    a tie picks the other modality. M > 2 (spec §2.9 item 5): the argmin. A 0-d long tensor."""
    means = aligned_confidence.mean(1)
    if means.numel() != 2:
        return torch.argmin(means)
    if ratio == "second_over_first":
        return (~(means[1] / means[0].clamp_min(1e-12) > 1)).long()
    return (means[0] / means[1].clamp_min(1e-12) > 1).long()


def code_alpha_decision(
    aligned_confidence: torch.Tensor,
    class_probs: torch.Tensor | Sequence[torch.Tensor],
    ratio: AlphaRatio = "first_over_second",
    valid: torch.Tensor | None = None,
    weak: torch.Tensor | None = None,
) -> CodeAlphaDecision:
    """The official code's grow/shrink decision for its scalar α (spec §2.4), one branch per official file.

    ``aligned_confidence`` (M, b): p^m_{i, y_i}; ``class_probs`` (S, M, b): per misaligned sample shift the
    fused probability of the class of each modality's source, averaged over the ``valid`` anchors. Below,
    p̄^m is the batch mean of p^m_{i, y_i} and q̄^m_d the mean fused probability of modality m's source
    class in shift d. ``weak``: the step's ``code_weak_modality``, when it was already chosen.
    """
    means = aligned_confidence.mean(1)
    weak = code_weak_modality(aligned_confidence, ratio) if weak is None else weak
    if not isinstance(class_probs, torch.Tensor):
        class_probs = torch.stack(list(class_probs))
    shift_means = masked_mean(class_probs, valid)  # (S, M)
    if means.numel() != 2:  # M > 2 [inferred, spec §2.9 item 5]: the other modalities' mean over the weak one
        if ratio != "first_over_second":
            raise ValueError(f"alpha_ratio {ratio!r} is the official code's rule for two modalities only")
        others = torch.arange(means.numel(), device=means.device) != weak
        rho_uni = (means * others).sum() / (means.numel() - 1) / _at(means, weak).clamp_min(1e-12)
        other_means = (shift_means * others).sum(1) / (means.numel() - 1)
        rho_mm = (other_means / _at(shift_means, weak).clamp_min(1e-12)).double().mean()
        return CodeAlphaDecision(rho_uni, rho_mm, weak, rho_mm > rho_uni)
    r_uni = means[0] / means[1].clamp_min(1e-12)
    if ratio == "first_over_second":
        # CREMA-D and UCF-101 code (spec §2.4; model_midas_cremad.py:124-169, model_midas_ucf101.py:128-175):
        # r_uni = p̄¹/p̄², r_mm = mean_d q̄¹_d/q̄²_d; grow while the fused model is more skewed toward the
        # dominant modality than the unimodal heads: r_mm > r_uni if r_uni > 1, r_mm < r_uni otherwise.
        r_mm = _mean_of_shift_ratios(shift_means, 0, 1)
        grow = torch.where(r_uni > 1, r_mm > r_uni, r_mm < r_uni)
    elif ratio == "second_over_first":
        # Food-101 code (spec §2.4; model_midas_food101.py:124-169): both ratios image/text with the text
        # modality first, i.e. r_uni = p̄²/p̄¹ and r_mm = mean_d q̄²_d/q̄¹_d (not the reciprocal of the
        # CREMA-D r_mm: a mean of ratios), with the same grow test.
        r_uni = means[1] / means[0].clamp_min(1e-12)
        r_mm = _mean_of_shift_ratios(shift_means, 1, 0)
        grow = torch.where(r_uni > 1, r_mm > r_uni, r_mm < r_uni)
    else:
        # Kinetics-Sounds code (spec §2.4 "KS variant", P-M5; model_midas_kinetics.py:118-162):
        # r_uni = p̄¹/p̄² always, r_mm oriented dominant/weak (q̄¹/q̄² if r_uni > 1, else q̄²/q̄¹), and one
        # test, r_mm > r_uni. With r_uni ≤ 1 that compares modality 2/1 with 1/2: α grows unless
        # q̄¹/q̄² ≥ p̄²/p̄¹, i.e. unless the fused model leans to the weak modality 1 at least as much as the
        # unimodal heads lean to modality 2.
        r_mm = torch.where(
            r_uni > 1, _mean_of_shift_ratios(shift_means, 0, 1), _mean_of_shift_ratios(shift_means, 1, 0)
        )
        grow = r_mm > r_uni
    return CodeAlphaDecision(r_uni, r_mm, weak, grow)


def alpha_update_code(
    alpha: float | torch.Tensor,
    aligned_confidence: torch.Tensor,
    class_probs: torch.Tensor | Sequence[torch.Tensor],
    eta: float,
    alpha_max: float | None,
    ratio: AlphaRatio = "first_over_second",
    valid: torch.Tensor | None = None,
    weak: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's α rule (spec §2.4) for one scalar α: α ± η from ``code_alpha_decision``, then
    α ← max(1, α), capped at ``alpha_max`` (the KS code's ``max(1, min(10, α))``). Returns α (a float64
    0-d tensor: the code's Python-float arithmetic) and the weak modality."""
    decision = code_alpha_decision(aligned_confidence, class_probs, ratio, valid, weak)
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=aligned_confidence.device)
    value = (alpha + eta * (decision.grow.double() * 2 - 1)).clamp_min(1.0)  # ±η exactly
    return (value.clamp_max(alpha_max) if alpha_max is not None else value), decision.weak


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
        # α lives on the training device as tensors (moved there at the first step), so that choosing the
        # weak modality and updating α never reads a value back to the host.
        self.alpha = torch.ones(self.num_modalities)  # paper mode: the vector
        self.alpha_code = 1.0  # code mode: the scalar, at [weak_code]
        self.weak_code = self.num_modalities - 1
        self._pending: dict[str, torch.Tensor] | None = None
        self._stats: dict[str, torch.Tensor] | None = None

    @property
    def alpha_code(self) -> torch.Tensor:
        """Code mode's scalar α (a float64 0-d tensor); set from a number or a tensor."""
        return self._alpha_code

    @alpha_code.setter
    def alpha_code(self, value: float | torch.Tensor) -> None:
        self._alpha_code = torch.as_tensor(value, dtype=torch.float64)

    @property
    def weak_code(self) -> torch.Tensor:
        """Code mode's weak modality, the one α multiplies (a long 0-d tensor)."""
        return self._weak_code

    @weak_code.setter
    def weak_code(self, value: int | torch.Tensor) -> None:
        self._weak_code = torch.as_tensor(value, dtype=torch.long)

    # ---- schedule
    @property
    def warmup_epochs(self) -> int:
        return self.params.warmup_epochs if self.params.use_warmup else 0

    def scheduler_should_step(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs or not self.params.scheduler_after_warmup

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        if self.params.alpha_reset_each_epoch and epoch >= self.warmup_epochs:
            self.alpha = torch.ones_like(self.alpha)
            self.alpha_code = torch.ones_like(self.alpha_code)
        self._stats = None

    def _place(self, device: torch.device) -> None:
        """Keep α and the epoch's statistics on the training device (a no-op once they are there)."""
        if self.alpha_code.device != device:
            self.alpha, self.alpha_code = self.alpha.to(device), self.alpha_code.to(device)
            self.weak_code = self.weak_code.to(device)
        if self._stats is None:
            zeros = torch.zeros(self.num_modalities, dtype=torch.float64, device=device)
            self._stats = {"uni": zeros, "multi": zeros.clone(), "weak": zeros.clone()}
            self._stats |= {"count": zeros.new_zeros(()), "steps": zeros.new_zeros(())}

    # ---- the step
    def _modality_weights(self) -> torch.Tensor:
        if not self.params.use_weak_modality_weight:
            return torch.ones_like(self.alpha)
        if self.params.alpha_mode == "paper":
            return self.alpha.clone()
        modalities = torch.arange(self.num_modalities, device=self.alpha.device)
        return torch.where(modalities == self.weak_code, self.alpha_code.to(self.alpha.dtype), 1.0)

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
        self._place(labels.device)

        detached = torch.stack([unimodal_logits[m] for m in model.modalities]).detach().float()
        unimodal_probs = F.softmax(detached, dim=2)  # (M, b, C), detached (A4)
        aligned = unimodal_probs.gather(2, labels.expand(self.num_modalities, -1)[..., None]).squeeze(2)
        if p.alpha_mode == "code":  # from p^m_{i, y_i} (M, b): the weak modality, per batch, before the loss
            self.weak_code = code_weak_modality(aligned, p.alpha_ratio)

        mis = draw_sources(labels, self.num_modalities, p.pairing, self.generator)
        assignments = all_shifts(mis.sources)  # (S, M, b)
        source_labels = labels[assignments]
        normalized = normalized_unimodal_confidences(aligned, assignments)  # Eq. 2
        fused = self._fused_logits(model, batch, features, mis.sources, assignments)  # (1 + S, b, C)
        loss_align, logits = F.cross_entropy(fused[0], labels), fused[1:]  # Eq. 9; the misaligned
        if p.use_hard_sample_weight:
            sample_weights = hard_sample_weight(
                self._swap_similarity(model, features, assignments, mis.valid)
            )
        else:
            sample_weights = torch.ones(assignments.shape[0], labels.numel(), device=labels.device)
        per_shift = misaligned_loss_per_sample(
            logits, source_labels, normalized, self._modality_weights(), sample_weights
        )  # Eq. 10
        loss_mis = reduce_misaligned_loss(per_shift, mis.valid, p.direction_reduction)  # Eq. 11, A2
        loss = loss_align + loss_uni + p.lam * loss_mis  # Eq. 11

        probs = F.softmax(logits.detach().float(), dim=-1)
        self._pending = {
            "uni": normalized,
            "multi": normalized_multimodal_confidences(probs, source_labels),
            "class_probs": source_class_probs(probs, source_labels),
            "aligned": aligned,
            "valid": mis.valid,
            "weak": self.weak_code,
        }
        self._accumulate_confidences(self._pending)
        logs.update(
            loss_align=loss_align.detach(),
            loss_misaligned=loss_mis.detach(),
            valid_pairs=mis.valid.float().mean(),
        )
        return StepOutput(loss=loss, logs=logs)

    def _fused_logits(
        self,
        model: MultimodalModel,
        batch: Batch,
        features: dict[str, torch.Tensor],
        sources: torch.Tensor,
        assignments: torch.Tensor,
    ) -> torch.Tensor:
        """Fused logits of the aligned samples and of the S misaligned samples of every anchor, (1 + S, b, C).

        Feature level (Eq. 12): the aligned features regathered, all through the fusion head as one batch
        of (1 + S)·b. Input level (Eq. 1): each shift's misaligned inputs encoded again, one shift at a
        time, so that encoders with batch statistics see batches of the usual size.
        """
        names = model.modalities
        if self.params.level == "feature":
            rows = torch.cat([sources[:1].expand(len(names), -1)[None], assignments])  # (1 + S, M, b)
            mixed = {m: features[m].index_select(0, rows[:, k].reshape(-1)) for k, m in enumerate(names)}
            return model.fuse(mixed).view(rows.shape[0], rows.shape[2], -1)
        aligned = model.fuse(features)
        shifts = [
            model.fuse(model.encode(batch.inputs.rows(dict(zip(names, rows, strict=True)))))
            for rows in assignments
        ]
        return torch.stack([aligned, *shifts])

    def _swap_similarity(
        self,
        model: MultimodalModel,
        features: dict[str, torch.Tensor],
        assignments: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. 8 per misaligned sample, (S, b): the mean over the replaced modalities (App. A.2) of the
        similarity of each swapped-in feature to the anchor's own."""
        swapped = swapped_mask(self.num_modalities, valid.device)  # (S, M)
        similarity = torch.stack(
            [
                feature_similarity(features[m], assignments[:, k], self.params.similarity, valid)
                for k, m in enumerate(model.modalities)
            ],
            dim=1,
        )  # (S, M, b); the entries of modalities not swapped are masked out below
        return torch.where(swapped[..., None], similarity, 0.0).sum(1) / swapped.sum(1, keepdim=True)

    def _accumulate_confidences(self, pending: dict[str, torch.Tensor]) -> None:
        """Fig. 3's training confidences, summed on the device over the epoch's valid misaligned samples."""
        assert self._stats is not None
        valid = pending["valid"]
        sums = torch.where(valid, torch.stack([pending["uni"], pending["multi"]]).double(), 0.0).sum((1, 3))
        self._stats["uni"] += sums[0]
        self._stats["multi"] += sums[1]
        self._stats["count"] += valid.sum() * pending["uni"].shape[0]

    def after_optimizer_step(self, model: MultimodalModel, epoch: int) -> None:
        """Algorithm 1, lines 24-27: α moves after the step, from statistics of the step's forward pass; a
        batch without a valid anchor (a single class) moves nothing (spec §2.2)."""
        pending, self._pending = self._pending, None
        if epoch < self.warmup_epochs or not self.params.use_weak_modality_weight:
            return
        if pending is not None:
            p, valid = self.params, pending["valid"]
            moves = valid.any()
            if p.alpha_mode == "paper":
                alpha, weak, _ = alpha_update_paper(
                    self.alpha, pending["uni"], pending["multi"], p.eta, p.alpha_max, valid
                )
                self.alpha = torch.where(moves, alpha, self.alpha)
            else:
                alpha_code, weak = alpha_update_code(
                    self.alpha_code, pending["aligned"], pending["class_probs"], p.eta, p.alpha_max,
                    p.alpha_ratio, valid, pending["weak"],
                )  # fmt: skip
                self.alpha_code = torch.where(moves, alpha_code, self.alpha_code)
            assert self._stats is not None
            self._stats["steps"] += moves
            modalities = torch.arange(self.num_modalities, device=weak.device)
            self._stats["weak"] += (modalities == weak) & moves
        self._share_alpha_across_ranks(model)

    def _share_alpha_across_ranks(self, model: MultimodalModel) -> None:
        """Under data parallelism every rank updates α from its own batch; rank 0's α is then given to
        all ranks through the runtime (spec §20.4 R6), so the loss weights stay identical everywhere and
        match the checkpointed α. Every rank calls this at every post-warm-up step, whatever its batch
        held, so the collectives line up; on one process it changes nothing. Sent in float64: α's code
        value exactly."""
        if not self.runtime.distributed:
            return
        state = torch.cat(
            [self.alpha.double(), self.alpha_code.reshape(1), self.weak_code.double().reshape(1)]
        )
        state = self.runtime.broadcast(state, src=0)
        m = self.num_modalities
        self.alpha = state[:m].to(self.alpha.dtype)
        self.alpha_code, self.weak_code = state[m].clone(), state[m + 1].long()

    def current_alpha(self) -> torch.Tensor:
        """α per modality as applied to the next step's loss (on the host: for logs and tests)."""
        if self.params.alpha_mode == "paper":
            return self.alpha.detach().cpu().clone()
        modalities = torch.arange(self.num_modalities)
        return torch.where(modalities == self.weak_code.cpu(), self.alpha_code.cpu().float(), 1.0)

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        """α per modality and the training confidences of Fig. 3 (means over the epoch's valid misaligned
        samples of c̃^m, "Uni", and of the normalised fused confidence for modality m's class, "Multi")."""
        out = {f"alpha_{m}": float(a) for m, a in zip(model.modalities, self.current_alpha(), strict=True)}
        if self._stats is None:
            return out
        stats = {key: value.cpu() for key, value in self._stats.items()}  # one read an epoch
        count, steps = float(stats["count"]), float(stats["steps"])
        for k, m in enumerate(model.modalities):
            if count:
                out[f"train_conf_uni_{m}"] = float(stats["uni"][k] / count)
                out[f"train_conf_multi_{m}"] = float(stats["multi"][k] / count)
            if steps:
                out[f"weak_share_{m}"] = float(stats["weak"][k] / steps)
        return out

    # ---- state kept across steps (spec P-M6: α must survive a checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.detach().cpu().clone(),
            "alpha_code": float(self.alpha_code),
            "weak_code": int(self.weak_code),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = state["alpha"].clone()
        self.alpha_code, self.weak_code = float(state["alpha_code"]), int(state["weak_code"])
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
