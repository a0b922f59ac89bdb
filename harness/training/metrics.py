"""Classification metrics over a whole split (never averaged per batch; methods.md pitfall P-M9)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(np.mean(labels == preds)) if len(labels) else float("nan")


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    if not len(labels):
        return float("nan")
    return float(f1_score(labels, preds, average="macro", zero_division=0))


def split_metrics(
    labels: np.ndarray, preds: np.ndarray, subsets: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """``acc``, ``macro_f1`` and ``acc_<subset>`` for every non-empty ground-truth subset mask."""
    out = {"acc": accuracy(labels, preds), "macro_f1": macro_f1(labels, preds)}
    for name, mask in (subsets or {}).items():
        if mask.any():
            out[f"acc_{name}"] = accuracy(labels[mask], preds[mask])
    return out
