"""``smv``: sample-level modality valuation and re-sampling (Wei, Feng, Wang, Hu, CVPR 2024, "Enhancing
multimodal cooperation via sample-level modality valuation"; spec ``../shared/spec/methods.md`` §5,
defaults §18), after the official ``GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation``
(``code/sample_level.py``, ``code/modality_level.py``, ``code/datasets/dataloader.py``,
``code/models/models.py``).

Valuation (§5.1), at the end of every epoch ``e ≥ E_warm − 1``: the whole training set is encoded in eval
mode (``runtime.encode_rows``) and, for every coalition ``S`` of modalities, the fusion head predicts from
the features with the modalities outside ``S`` **zeroed after the encoders**. With the characteristic
function ``v(S) = |S| · 1[argmax g_f(f_S) = y]`` and ``v(∅) = 0`` each sample's Shapley values are

    φ_m = Σ_{S ⊆ M∖{m}} |S|! (M − |S| − 1)! / M! · (v(S ∪ {m}) − v(S)),

for ``M = 2`` ``φ_a = (v_a + v_av − v_v) / 2`` (the official ``execute_modulation``), so φ ∈ {−0.5, 0, 0.5,
1, 1.5}. For ``M > 2`` the same function over the ``2^M`` coalitions (§5.4 [inferred]).

Sample level (§5.2, ``level=sample``, the "SMV" of MIDAS Table 1): the next epoch trains on all N rows plus,
for every row i and modality m, ``k(φ_m(i))`` copies,

    k = 0 if φ ≥ 1;  1 if 0.4 < φ < 1;  2 if −0.1 < φ ≤ 0.4;  3 if φ ≤ −0.1,

each copy tagged with the modality it **keeps**: in ``training_step`` the other modalities' features of a
tagged row are zeroed after the encoders, so the copy trains the low-contributing modality; untagged rows
(tag ``−1``, the N originals) are unmodified. The loss is the plain cross-entropy of the fused logits.

Modality level (§5.3, ``level=modality``): the mean φ over a random ``part_ratio`` share of the rows
(drawn **with** replacement), gaps ``g_m = 1 − mean φ_m``, ``d = α · |g_a − g_v| · 2/3`` (``gap_func``:
``linear``; ``tanh``: ``tanh(d)``; ``square``: ``α (|g_a − g_v| · 2/3)^1.5``) and ``int(d · N)`` rows drawn
with replacement, each keeping the modality of the larger gap.

The plan (``epoch_plan``) of epoch e ≥ E_warm is the N rows plus the copies, shuffled by a generator seeded
from (run seed, epoch): every rank builds the same plan and shards it. The copies (rows and tags) are the
method's state, so a resumed run rebuilds the same plan. Evaluation: the plain fused logits, no zeroing.

Params: ``level`` (``sample``), ``warmup_epochs`` (5, official ``--warmup 5``; ``dataset_defaults``: 10 on
UCF-101, 2 on Food-101, the MIDAS repo's ``Resampling`` config, §5.2), ``threshold_full`` (1.0),
``threshold_high`` (0.4), ``threshold_low`` (−0.1) (§5.2), ``alpha`` (1.0, official ``modality_level.py``
argparse; BB 0.5), ``part_ratio`` (0.2), ``gap_func`` (``linear``) (§5.3). Logs per epoch (from the
valuation, ``method/…``): ``phi_<m>`` (mean φ), ``copies_<m>`` (copies keeping m), ``plan_rows``; at the
modality level also ``gap_<m>`` and ``resample_ratio`` (d); per step ``loss_fused`` and ``copy_fraction``
(the share of the batch's rows that are tagged copies).

Departures from the official code:

* Copy bands: the spec's (§5.2) ``0.4 < φ < 1`` for one copy, where the code has ``0.4 < φ < 0.9``; and the
  code's open gaps at exactly 0.4 and −0.1 (no copy there) are closed (2 and 3 copies). For ``M ≤ 3`` no
  Shapley value lies in [0.9, 1) or on a boundary (they are multiples of 1/6), so the copy counts are the
  code's; the bands are parameters.
* Valuation runs on the training rows in eval mode without augmentation (§5.4 [inferred]; the code values
  the training-mode dataset) and only from epoch ``E_warm − 1`` on (the code also values warm-up epochs, for
  its logs only).
* The enlarged set is shuffled by a seeded generator (R7) instead of the global RNG, and the modality-level
  subset and re-sampled rows come from a generator seeded from (run seed, epoch) rather than ``np.random``;
  under data parallelism rank 0's Shapley values are broadcast (R5/R6), so every rank builds the same plan.
* The plan is sharded across ranks like any epoch (strided, padded by wrap-around, ``datasets/loader.py``).
* Zeroing uses the tag "modality kept" rather than the code's ``drop`` codes (1: zero audio, 2: zero visual;
  the MIDAS repo uses the opposite codes), as §5.2 asks.
* The modality level for ``M > 2`` (not in the paper or code): the kept modality is the one with the
  largest gap (the first on ties) and ``|g_a − g_v|`` becomes ``max g − min g``. For ``M = 2`` a tie gives
  ``d = 0`` (no copies), whichever modality the code would keep.
* The modality-level subset has at least one row (the code divides by ``int(N · part_ratio)``, 0 for tiny
  sets).
* The model's unimodal heads are not trained (left out of the optimiser, as in ``joint``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method, without_unimodal_heads

UNTAGGED = -1  # a plan row that is an original sample: no modality zeroed
PLAN_SALT = 0x5A1  # seeds the plan's shuffle with (seed, epoch)
PART_SALT = 0x5A2  # seeds the modality-level subset and re-sampled rows with (seed, epoch)

# --------------------------------------------------------------------------------------- functional core


def keep_only(features: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero, post-encoder, every modality of a row except those ``kept`` marks (``kept``: (b, M) bool in
    the order of ``features``); §5.1's zero-feature evaluation and §5.2's zeroed copies."""
    out = {}
    for k, (m, f) in enumerate(features.items()):
        mask = kept[:, k].reshape(-1, *([1] * (f.dim() - 1)))
        out[m] = torch.where(mask, f, torch.zeros_like(f))
    return out


def coalition_masks(num_modalities: int) -> torch.Tensor:
    """Row s is the coalition with bit k of s set when modality k is in it: shape (2^M, M), bool."""
    codes = torch.arange(2**num_modalities)[:, None]
    return (codes >> torch.arange(num_modalities)[None, :]) & 1 == 1


@torch.no_grad()
def coalition_correct(
    model: MultimodalModel,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    batch_size: int = 512,
) -> torch.Tensor:
    """(N, 2^M) bool: is ``argmax g_f`` of coalition s's features (the others zeroed) the label? The empty
    coalition is never correct (v(∅) = 0 by definition, §5.1). Run with the model in eval mode."""
    masks = coalition_masks(len(features))
    n = labels.shape[0]
    correct = torch.zeros(n, len(masks), dtype=torch.bool)
    for start in range(0, n, batch_size):
        chunk = {m: f[start : start + batch_size] for m, f in features.items()}
        y = labels[start : start + batch_size]
        for s in range(1, len(masks)):
            kept = masks[s].to(y.device).expand(y.shape[0], -1)
            pred = model.fuse(keep_only(chunk, kept)).argmax(dim=1)  # first maximum, as np.argmax
            correct[start : start + y.shape[0], s] = (pred == y).cpu()
    return correct


def shapley_values(correct: torch.Tensor) -> torch.Tensor:
    """§5.1: φ (N, M) float64 from coalition correctness (N, 2^M), with v(S) = |S| · 1[correct]."""
    num_modalities = correct.shape[1].bit_length() - 1  # 2^M columns
    masks = coalition_masks(num_modalities)
    size = masks.sum(dim=1).double()
    value = correct.double() * size[None, :]  # v(S) = |S| · 1[correct]; v(∅) = 0
    phi = torch.zeros(correct.shape[0], num_modalities, dtype=torch.float64)
    for m in range(num_modalities):
        for s in range(len(masks)):
            if masks[s, m]:
                continue
            k = int(size[s])  # |S| of the coalition without m
            weight = (
                math.factorial(k) * math.factorial(num_modalities - k - 1) / math.factorial(num_modalities)
            )
            phi[:, m] += weight * (value[:, s | (1 << m)] - value[:, s])
    return phi


def copy_counts(phi: torch.Tensor, full: float = 1.0, high: float = 0.4, low: float = -0.1) -> torch.Tensor:
    """§5.2: copies per row and modality, 0 if φ ≥ full, 1 if high < φ < full, 2 if low < φ ≤ high, else 3."""
    counts = torch.full(phi.shape, 3, dtype=torch.int64)
    counts[phi > low] = 2
    counts[phi > high] = 1
    counts[phi >= full] = 0
    return counts


def sample_level_copies(counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The copies of §5.2 as (rows, kept modality): row i repeated ``counts[i, m]`` times keeping m."""
    n, num_modalities = counts.shape
    rows, kept = [], []
    for m in range(num_modalities):
        repeated = np.repeat(np.arange(n, dtype=np.int64), counts[:, m].numpy())
        rows.append(repeated)
        kept.append(np.full(len(repeated), m, dtype=np.int64))
    return np.concatenate(rows), np.concatenate(kept)


def resample_ratio(gaps: np.ndarray, alpha: float, func: str) -> float:
    """§5.3: d from the gaps g_m = 1 − mean φ_m (the code's ``abs(g_a − g_v) / 3 * 2``; M > 2: max − min)."""
    spread = float(gaps.max() - gaps.min()) / 3 * 2
    if func == "linear":
        return spread * alpha
    if func == "tanh":
        return math.tanh(spread * alpha)
    return spread**1.5 * alpha  # square


def modality_level_copies(
    phi: torch.Tensor, part_ratio: float, alpha: float, func: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """§5.3: (rows, kept modality, gaps, d): ``int(d · N)`` rows drawn with replacement, each keeping the
    modality of the largest gap, the gaps from the mean φ over a with-replacement ``part_ratio`` subset."""
    n = phi.shape[0]
    part = rng.choice(n, max(int(n * part_ratio), 1))  # with replacement, as np.random.choice(n, k)
    gaps = 1.0 - phi[torch.from_numpy(part)].mean(dim=0).numpy()
    d = resample_ratio(gaps, alpha, func)
    rows = rng.choice(n, int(d * n)).astype(np.int64)
    kept = np.full(len(rows), int(np.argmax(gaps)), dtype=np.int64)
    return rows, kept, gaps, d


def build_plan(num_rows: int, rows: np.ndarray, kept: np.ndarray, seed: int, epoch: int) -> EpochPlan:
    """All N rows (untagged) plus the copies (tagged with the kept modality), shuffled by (seed, epoch)."""
    all_rows = np.concatenate([np.arange(num_rows, dtype=np.int64), rows])
    tags = np.concatenate([np.full(num_rows, UNTAGGED, dtype=np.int64), kept])
    order = np.random.default_rng([seed, epoch, PLAN_SALT]).permutation(len(all_rows))
    return EpochPlan(all_rows[order], tags[order])


# --------------------------------------------------------------------------------------------- method


class SMVParams(Params):
    level: Literal["sample", "modality"] = Field(
        default="sample", description="§5.2 sample-level copies (MIDAS Table 1) or §5.3 modality level"
    )
    warmup_epochs: int = Field(default=5, ge=0, description="plain joint epochs first (official --warmup 5)")
    threshold_full: float = Field(default=1.0, description="§5.2: no copy when φ ≥ this (code: 0.9)")
    threshold_high: float = Field(default=0.4, description="§5.2: 1 copy above this, 2 at or below")
    threshold_low: float = Field(default=-0.1, description="§5.2: 2 copies above this, 3 at or below")
    alpha: float = Field(default=1.0, ge=0, description="§5.3 α of d (official argparse 1; BB 0.5)")
    part_ratio: float = Field(default=0.2, gt=0, le=1, description="§5.3 share of rows for the mean φ")
    gap_func: Literal["linear", "tanh", "square"] = Field(default="linear", description="§5.3 d's form")

    @model_validator(mode="after")
    def _bands(self) -> SMVParams:
        if not self.threshold_low < self.threshold_high < self.threshold_full:
            raise ValueError("thresholds must satisfy threshold_low < threshold_high < threshold_full")
        return self


@register_method("smv")
class SMV(Method):
    fidelity = "official-code"
    Params = SMVParams
    requires = Requirements(min_modalities=2)
    # §5.2: the MIDAS repo's Resampling warm-up per dataset (5 on CREMA-D and KS, the default)
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "ucf101": {"warmup_epochs": 10},
        "food101": {"warmup_epochs": 2},
    }

    def __init__(self, params: SMVParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.num_rows: int | None = None
        self.copy_rows: torch.Tensor | None = None  # the copies of the next epoch's plan (int64)
        self.copy_kept: torch.Tensor | None = None  # the modality each copy keeps (index, int64)
        self.valued_epoch = -1

    @property
    def label(self) -> str:
        return self.name if self.params.level == "sample" else f"{self.name}[modality]"

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        return without_unimodal_heads(model)

    # ---- the epoch: the plan from the last valuation, and the valuation itself
    def epoch_plan(self, epoch: int, default: EpochPlan) -> EpochPlan:
        if self.copy_rows is None or self.copy_kept is None or epoch < self.params.warmup_epochs:
            return default
        if self.num_rows != len(default.rows):
            raise ValueError(f"smv: valued {self.num_rows} rows but the epoch has {len(default.rows)}")
        return build_plan(
            self.num_rows, self.copy_rows.numpy(), self.copy_kept.numpy(), self.context.seed, epoch
        )

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        if epoch < self.params.warmup_epochs - 1:  # §5.2: first valuation at the end of epoch E_warm − 1
            return {}
        phi = self.valuate(model)
        p = self.params
        metrics = {f"phi_{m}": float(v) for m, v in zip(model.modalities, phi.mean(dim=0), strict=True)}
        if p.level == "sample":
            counts = copy_counts(phi, p.threshold_full, p.threshold_high, p.threshold_low)
            rows, kept = sample_level_copies(counts)
        else:
            rng = np.random.default_rng([self.context.seed, epoch, PART_SALT])
            rows, kept, gaps, d = modality_level_copies(phi, p.part_ratio, p.alpha, p.gap_func, rng)
            metrics.update({f"gap_{m}": float(g) for m, g in zip(model.modalities, gaps, strict=True)})
            metrics["resample_ratio"] = d
        self.num_rows, self.valued_epoch = phi.shape[0], epoch
        self.copy_rows, self.copy_kept = torch.from_numpy(rows), torch.from_numpy(kept)
        for k, m in enumerate(model.modalities):
            metrics[f"copies_{m}"] = float((kept == k).sum())
        metrics["plan_rows"] = float(phi.shape[0] + len(rows))
        return metrics

    def valuate(self, model: MultimodalModel) -> torch.Tensor:
        """§5.1 over the whole training set: φ (N, M), rank 0's on every rank (R5/R6)."""
        split = self.runtime.train_split
        if split is None:
            raise RuntimeError("smv: the valuation needs a runtime bound to a run (its train split)")
        features, labels = self.runtime.encode_rows(model, np.arange(len(split)))
        was_training = model.training
        model.eval()
        try:
            correct = coalition_correct(model, features, labels, self.runtime.eval_batch_size)
        finally:
            model.train(was_training)
        return self.runtime.broadcast(shapley_values(correct))

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        copies = 0.0
        if batch.tags is not None:  # §5.2: a copy keeps its tagged modality, the others are zeroed
            tags = batch.tags.to(batch.labels.device)
            index = torch.arange(len(model.modalities), device=tags.device)
            kept = (tags[:, None] == UNTAGGED) | (tags[:, None] == index[None, :])
            features = keep_only(features, kept)
            copies = float((tags != UNTAGGED).float().mean())
        loss = F.cross_entropy(model.fuse(features), batch.labels)
        return StepOutput(loss=loss, logs={"loss_fused": loss.detach(), "copy_fraction": copies})

    # ---- state: the copies, so a resumed run rebuilds the same plan
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "copy_rows": None if self.copy_rows is None else self.copy_rows.clone(),
            "copy_kept": None if self.copy_kept is None else self.copy_kept.clone(),
            "valued_epoch": self.valued_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_rows = None if state["num_rows"] is None else int(state["num_rows"])
        rows, kept = state["copy_rows"], state["copy_kept"]
        self.copy_rows = None if rows is None else rows.clone().long()
        self.copy_kept = None if kept is None else kept.clone().long()
        self.valued_epoch = int(state["valued_epoch"])
