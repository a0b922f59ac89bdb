"""How a fused model uses each modality: misaligned-pair and zeroed-feature diagnostics.

Aligned accuracy cannot tell whether a model uses every modality, because all modalities of an aligned
sample point to the same class. These diagnostics (methods.md §2.10) expose the imbalance that MIDAS
targets, for every training method alike:

* misaligned pairs (paper §1, §4.5, Fig. 1, 5, 6, 7; App. A.3 Eq. 12): modality ``m`` of row ``i`` is
  replaced by the same modality of a row ``j`` with a different label; a balanced model should rank both
  labels on top (top-2 accuracy) and put probability mass on the class of every modality's source;
* zeroed features (App. A.4, "Shapley value-based modality valuation"): the fused head is evaluated with
  the features of some modalities set to zero *after* the encoders (the head's bias remains), giving the
  accuracy ``v(S)`` of every coalition ``S`` and the exact Shapley value of each modality.

Everything works on features already computed for a whole split (the trainer encodes the split once),
so only the fusion head is re-run, in chunks and under ``torch.no_grad()``, on the features' device. The
caller puts the model in eval mode. All functions are pure: no module state, no global RNG.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

Fuse = Callable[[dict[str, Tensor]], Tensor]
# (features, modalities kept) -> logits with only those modalities taking part
Coalition = Callable[[dict[str, Tensor], frozenset[str]], Tensor]


def zeroing_coalition(fuse: Fuse) -> Coalition:
    """The default coalition: the features outside it are zeroed after the encoder (App. A.4)."""

    def coalition(features: dict[str, Tensor], kept: frozenset[str]) -> Tensor:
        return fuse({m: (f if m in kept else torch.zeros_like(f)) for m, f in features.items()})

    return coalition


_SAFE_NAME = re.compile(r"[A-Za-z0-9_./-]+")


# --------------------------------------------------------------------------------------------------
# Misaligned pairs
# --------------------------------------------------------------------------------------------------


def fixed_misaligned_pairing(labels: np.ndarray, seed: int) -> np.ndarray:
    """A partner ``j`` with ``labels[j] != labels[i]`` for every row ``i`` (``-1`` where none exists).

    Why: the official code pairs rows by a fresh ``randperm`` per batch and epoch, so its misaligned
    accuracy (Fig. 1a, 6) mixes in same-class pairs and differs between methods only by chance. This
    pairing depends on nothing but ``labels`` and ``seed`` (never on a model), so every method and epoch
    is scored on the same pairs, and every pair is truly misaligned (methods.md §2.10 decision).

    Start from ``rng.permutation(n)`` with ``rng = np.random.default_rng(seed)``; every row whose
    partner has its own label gets a new partner drawn uniformly among the rows with a different label.
    Only a split with a single class has rows without a different-label row; they get ``-1``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    partner = rng.permutation(n).astype(np.int64)
    # Rows sorted by class: class c occupies positions [start[c], start[c] + counts[c]) of `order`,
    # and the rows of any other class are the positions outside that block.
    order = np.argsort(codes, kind="stable")
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    others = n - counts[codes]  # rows with a different label, per row
    redraw = np.flatnonzero(codes[partner] == codes)
    impossible = redraw[others[redraw] == 0]
    redraw = redraw[others[redraw] > 0]
    if redraw.size:
        c = codes[redraw]
        u = rng.integers(0, others[redraw])  # uniform over the complement block, per row
        pos = np.where(u < start[c], u, u + counts[c])
        partner[redraw] = order[pos]
    partner[impossible] = -1
    return partner


def swap_features(
    features: dict[str, Tensor], partner: Tensor, swapped: str, rows: Tensor | None = None
) -> dict[str, Tensor]:
    """Misaligned features: modality ``swapped`` from row ``partner[k]``, every other from row ``k``.

    Why: the paper builds misaligned samples at feature level, ``f̃_i = (f_i^1, f_j^2)`` (Eq. 1 and App.
    A.3 Eq. 12), which reuses the encoded split. ``rows`` (default: all rows, in order) selects the
    rows ``i`` so that a caller can skip rows without a valid partner; ``partner`` then has the length
    of ``rows``. Partners must be valid row indices (filter out ``-1`` from the pairing first).
    """
    if swapped not in features:
        raise KeyError(f"modality {swapped!r} is not among the features {list(features)}")
    if partner.numel() and int(partner.min()) < 0:
        raise ValueError("partner holds negative indices; drop rows without a partner first")
    if rows is not None and rows.shape != partner.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and partner {tuple(partner.shape)} differ in shape")
    out = {}
    for m, f in features.items():
        if m == swapped:
            out[m] = f[partner.to(f.device)]
        else:
            out[m] = f if rows is None else f[rows.to(f.device)]
    return out


def misaligned_top2_accuracy(logits: Tensor, labels_i: Tensor, labels_j: Tensor) -> float:
    """Fraction of misaligned pairs whose two top-scoring classes are exactly ``{y_i, y_j}``.

    Why: the paper's misaligned accuracy (§1, Fig. 1a, Fig. 6; methods.md §2.10) asks whether the fused
    model recognises the content of *both* sources, in either order. A pair with ``y_i == y_j`` can never
    count (the top-2 are two distinct classes). Meaningless for binary tasks, where it is always 1.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, C) with C >= 2, got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return float("nan")
    top2 = logits.topk(2, dim=1).indices
    yi = labels_i.to(top2.device).long()
    yj = labels_j.to(top2.device).long()
    hit = ((top2[:, 0] == yi) & (top2[:, 1] == yj)) | ((top2[:, 0] == yj) & (top2[:, 1] == yi))
    return float(hit.float().mean())


def code_variant_misaligned_top2(
    fuse: Fuse,
    features: dict[str, Tensor],
    labels: Tensor,
    seed: int,
    batch_size: int = 4096,
    modalities: Sequence[str] | None = None,
) -> float:
    """Misaligned top-2 accuracy counted as the official MIDAS code does; for comparability only.

    Why: the numbers of Fig. 1a and Fig. 6 come from this counting, so it is reported next to the
    harness's own metric to compare with the paper. It is *not* the recommended metric: the partner of
    row ``i`` is ``π(i)`` for one seeded ``torch.randperm`` of the whole split (the code draws a fresh one
    per batch from the global RNG), the modality at index 1 of ``modalities`` (default: the features'
    order, i.e. ``model.modalities``) is swapped, labels are not checked, and the denominator is all
    rows, so same-class pairs and fixed points count as wrong.
    """
    names = list(features) if modalities is None else list(modalities)
    if len(names) < 2:
        raise ValueError(f"the code variant swaps the second modality; got modalities {names}")
    n = labels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    logits = _fused_logits(fuse, features, batch_size, swapped=names[1], partner=perm)
    labels = labels.long()
    return misaligned_top2_accuracy(logits, labels, labels[perm.to(labels.device)])


def misaligned_confidences(probs: Tensor, source_labels: dict[str, Tensor]) -> dict[str, float]:
    """Mean fused probability of the class of each modality's source, per modality.

    Why: Fig. 1b, 5 and 7 plot these "modality confidences" (code ``conf_1_swapped``/``conf_2_swapped``):
    a model that relies on one modality gives that modality's class a high probability and the other
    source's class almost none. ``source_labels[k]`` holds, per misaligned row, the label of the row that
    modality ``k`` came from.
    """
    out = {}
    for k, y in source_labels.items():
        p = probs.gather(1, y.to(probs.device).long().view(-1, 1))
        out[k] = float(p.mean()) if p.numel() else float("nan")
    return out


# --------------------------------------------------------------------------------------------------
# Zeroed features and Shapley values
# --------------------------------------------------------------------------------------------------


def zeroed_feature_accuracies(
    model_fuse: Fuse,
    features: dict[str, Tensor],
    labels: Tensor,
    batch_size: int = 4096,
    coalition: Coalition | None = None,
) -> dict[frozenset[str], float]:
    """``v(S)`` = accuracy of the fused head with the features outside ``S`` zeroed, for every ``S``.

    Why: App. A.4 measures each modality's contribution by zeroing the other modalities' features
    *after* the encoder (the head's bias remains; code ``exec_drop``), and calls it Shapley value-based
    modality valuation; with all ``2^M`` coalitions (``∅`` and the full set included) the exact Shapley
    values follow (``shapley_values``). Costs ``2^M`` passes of the head: use it for ``M <= 3`` and
    ``kept_alone_accuracies`` beyond. ``coalition`` replaces the zeroing (``Method.coalition_logits``).
    """
    names = list(features)
    subsets = [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]
    return _coalition_accuracies(
        coalition or zeroing_coalition(model_fuse), features, labels, subsets, batch_size
    )


def kept_alone_accuracies(
    model_fuse: Fuse,
    features: dict[str, Tensor],
    labels: Tensor,
    batch_size: int = 4096,
    coalition: Coalition | None = None,
) -> dict[frozenset[str], float]:
    """``v(S)`` for ``S = ∅``, each single modality and the full set only (``M + 2`` head passes).

    Why: App. A.4's "audio-only"/"video-only" accuracies are ``v({m})``; for ``M > 3`` the ``2^M``
    coalitions of exact Shapley values cost too much, but these ablations stay cheap.
    """
    names = list(features)
    subsets = list(dict.fromkeys([frozenset(), *(frozenset([m]) for m in names), frozenset(names)]))
    return _coalition_accuracies(
        coalition or zeroing_coalition(model_fuse), features, labels, subsets, batch_size
    )


def shapley_values(value: dict[frozenset[str], float], modalities: list[str]) -> dict[str, float]:
    """Exact Shapley values ``φ_m = Σ_{S⊆M∖{m}} |S|!(M−|S|−1)!/M! · [v(S∪{m}) − v(S)]``.

    Why: App. A.4's "Shapley value-based modality valuation" at dataset level (methods.md §2.10): each
    modality's average marginal gain in accuracy over all coalitions of the others. ``value`` must hold
    every subset of ``modalities`` (``zeroed_feature_accuracies``). The values sum to ``v(M) − v(∅)``.
    """
    names = list(modalities)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate modalities in {names}")
    big_m = len(names)
    fact_m = math.factorial(big_m)
    out = {}
    for m in names:
        rest = [k for k in names if k != m]
        phi = 0.0
        for r in range(len(rest) + 1):
            weight = math.factorial(r) * math.factorial(big_m - r - 1) / fact_m
            for coalition in itertools.combinations(rest, r):
                s = frozenset(coalition)
                phi += weight * (_value_of(value, s | {m}) - _value_of(value, s))
        out[m] = phi
    return out


def _value_of(value: dict[frozenset[str], float], s: frozenset[str]) -> float:
    try:
        return value[s]
    except KeyError:
        raise KeyError(f"value function has no entry for coalition {sorted(s)}") from None


# --------------------------------------------------------------------------------------------------
# Everything, as flat metrics
# --------------------------------------------------------------------------------------------------


def modality_diagnostics(
    fuse: Fuse,
    features: dict[str, Tensor],
    labels: Tensor,
    num_classes: int,
    pairing_seed: int,
    batch_size: int = 4096,
    coalition: Coalition | None = None,
) -> dict[str, float]:
    """All modality-usage diagnostics of one split, as flat MLflow-safe metric names.

    Why: one call per evaluated split gives, for any method, the evidence of Fig. 1, 5, 6, 7 and App. A.4:

    * ``mis_top2_swap_<m>``: top-2 accuracy on the fixed different-label pairs with modality ``m``
      swapped; ``mis_top2``: their mean; ``mis_top2_code``: the official code's counting (only for
      ``M == 2``). Not reported when ``num_classes <= 2`` (the top-2 of 2 classes is always right).
    * ``mis_conf_<k>``: mean fused probability of the class of modality ``k``'s source, over every swap
      direction and pair.
    * ``zeroed_acc_<m>``: accuracy with only modality ``m`` kept (the others zeroed after the encoder);
      ``zeroed_acc_none``: all zeroed (the head's bias alone); ``shapley_<m>`` for ``M <= 3``.

    ``features`` are in ``model.modalities`` order (as ``model.encode`` returns them); misaligned keys
    are left out when the split has no different-label pair (a single class). An empty split gives ``{}``.
    """
    names = list(features)
    for m in names:
        if not _SAFE_NAME.fullmatch(m) or m == "none":
            raise ValueError(f"modality name {m!r} cannot be used in metric names")
    n = labels.shape[0]
    if n == 0:
        return {}
    labels = labels.long()
    out: dict[str, float] = {}

    # Misaligned pairs: the same pairs for every swapped modality, method and epoch.
    pairing = torch.from_numpy(fixed_misaligned_pairing(labels.cpu().numpy(), pairing_seed))
    rows = torch.nonzero(pairing >= 0).view(-1)
    if rows.numel():
        partner = pairing[rows]
        y_i = labels[rows.to(labels.device)]
        y_j = labels[partner.to(labels.device)]
        conf_sum = dict.fromkeys(names, 0.0)
        top2 = {}
        for m in names:
            logits = _fused_logits(fuse, features, batch_size, swapped=m, partner=partner, rows=rows)
            if num_classes > 2:
                top2[m] = misaligned_top2_accuracy(logits, y_i, y_j)
            sources = {k: (y_j if k == m else y_i) for k in names}
            for k, conf in misaligned_confidences(torch.softmax(logits, dim=1), sources).items():
                conf_sum[k] += conf
        for m, acc in top2.items():
            out[f"mis_top2_swap_{m}"] = acc
        if top2:
            out["mis_top2"] = float(np.mean(list(top2.values())))
        # Same number of pairs per direction, so the mean of the direction means is the pooled mean.
        for k in names:
            out[f"mis_conf_{k}"] = conf_sum[k] / len(names)
    if num_classes > 2 and len(names) == 2:
        out["mis_top2_code"] = code_variant_misaligned_top2(
            fuse, features, labels, pairing_seed, batch_size, modalities=names
        )

    # Zeroed features after the encoder.
    if len(names) <= 3:
        value = zeroed_feature_accuracies(fuse, features, labels, batch_size, coalition)
    else:
        value = kept_alone_accuracies(fuse, features, labels, batch_size, coalition)
    for m in names:
        out[f"zeroed_acc_{m}"] = value[frozenset([m])]
    out["zeroed_acc_none"] = value[frozenset()]
    if len(names) <= 3:
        for m, phi in shapley_values(value, names).items():
            out[f"shapley_{m}"] = phi
    return out


# --------------------------------------------------------------------------------------------------
# Chunked head passes
# --------------------------------------------------------------------------------------------------


def _chunks(n: int, batch_size: int) -> Iterable[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size))


def _fused_logits(
    fuse: Fuse,
    features: dict[str, Tensor],
    batch_size: int,
    swapped: str,
    partner: Tensor,
    rows: Tensor | None = None,
) -> Tensor:
    """Float32 logits of the misaligned rows (``swap_features``), computed chunk by chunk."""
    n = partner.shape[0]
    if rows is None:
        rows = torch.arange(n)
    parts = []
    with torch.no_grad():
        for sl in _chunks(n, batch_size):
            parts.append(fuse(swap_features(features, partner[sl], swapped, rows[sl])).float())
    if not parts:
        return torch.empty(0, 0)
    return torch.cat(parts)


def _coalition_accuracies(
    coalition: Coalition,
    features: dict[str, Tensor],
    labels: Tensor,
    subsets: list[frozenset[str]],
    batch_size: int,
) -> dict[frozenset[str], float]:
    n = labels.shape[0]
    if n == 0:
        return {s: float("nan") for s in subsets}
    correct = dict.fromkeys(subsets, 0)
    with torch.no_grad():
        for sl in _chunks(n, batch_size):
            chunk = {m: f[sl] for m, f in features.items()}
            y = labels[sl].long()
            for s in subsets:
                pred = coalition(chunk, s).argmax(dim=1)
                correct[s] += int((pred == y.to(pred.device)).sum())
    return {s: correct[s] / n for s in subsets}
