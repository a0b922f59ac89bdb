"""Aggregate runs over seeds into mean ± sample standard deviation and print comparison tables.

Statistics: the mean and the *sample* standard deviation (ddof = 1) over the runs of each cell, with n
stated; a cell with a single run has no standard deviation (shown as "±nan"-free "n=1").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DEFAULT_METRICS = ("test/acc", "test/macro_f1")
METRIC_LABELS = {"test/acc": "Acc", "test/macro_f1": "F1", "test/mis_top2": "misaligned top-2"}


def metric_label(metric: str) -> str:
    """Column title of a metric: a fixed label, a pattern's reading, or the name without its split."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    name = metric.split("/", 1)[-1]
    for prefix, template in (
        ("zeroed_acc_", "acc, only {} kept"),  # the other modalities' features zeroed (App. A.4)
        ("acc_only_", "acc on {}-only subset"),  # ground-truth subset: only that modality informs
        ("shapley_", "Shapley {}"),
    ):
        if name.startswith(prefix):
            return template.format(name[len(prefix) :])
    return name


def summarize(
    runs: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS, by: Sequence[str] = ("dataset", "method")
) -> pd.DataFrame:
    """One row per group with ``<metric>/mean``, ``<metric>/std`` (ddof=1) and ``n``."""
    columns = [f"metrics.{m}" for m in metrics]
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise KeyError(f"runs have no metric columns {missing}")
    rows = []
    for key, group in runs.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        row["n"] = len(group)
        for metric, column in zip(metrics, columns, strict=True):
            values = group[column].dropna().to_numpy(dtype=float)
            row[f"{metric}/mean"] = float(np.mean(values)) if len(values) else float("nan")
            row[f"{metric}/std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_cell(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if np.isnan(mean):
        return "–"
    if np.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(
    summary: pd.DataFrame,
    metrics: Sequence[str] = DEFAULT_METRICS,
    row_key: str = "method",
    column_key: str = "dataset",
    scale: float = 100.0,
    digits: int = 2,
) -> str:
    """Methods as rows, one column per (dataset, metric); values in percent by default."""
    datasets = sorted(summary[column_key].unique())
    header = [row_key.capitalize()]
    for dataset in datasets:
        header += [f"{dataset} {metric_label(m)}" for m in metrics]
    header.append("n")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row_value in sorted(summary[row_key].unique()):
        cells = [str(row_value)]
        counts = []
        for dataset in datasets:
            match = summary[(summary[row_key] == row_value) & (summary[column_key] == dataset)]
            for m in metrics:
                if match.empty:
                    cells.append("–")
                else:
                    cells.append(
                        format_cell(match[f"{m}/mean"].iloc[0], match[f"{m}/std"].iloc[0], scale, digits)
                    )
            if not match.empty:
                counts.append(str(int(match["n"].iloc[0])))
        cells.append("/".join(sorted(set(counts))) or "0")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± sample std (ddof=1) over n runs (seeds), values × {scale:g}.")
    return "\n".join(lines)
