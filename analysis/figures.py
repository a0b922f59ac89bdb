"""The paper's figures from MLflow runs, as PNG files (matplotlib, no display needed).

Each figure is made only when its metrics exist in the runs; otherwise it is skipped with the reason.
Curves over training are means over the seeds' per-epoch histories (step = epoch) with a ±1 sample-std
band; MIDAS curves use the full configuration and, where several λ ran, the one chosen on validation
accuracy (``report.default_midas``).

* ``fig3_train_confidence.png`` (Fig. 3): MIDAS's training confidences on misaligned samples, unimodal
  classifiers ("Uni", ``method/train_conf_uni_<m>``) against the fused classifier ("Multi",
  ``method/train_conf_multi_<m>``); one panel per dataset and weak-modality-weighting setting.
* ``fig4_alpha.png`` (Fig. 4): the weak-modality weight α per modality over training, one panel per dataset.
* ``fig5_misaligned_confidence.png`` (Fig. 5/7): the fused model's confidence in each modality's class on
  misaligned validation pairs (``val/mis_conf_<m>``), per method, one panel per dataset.
* ``fig6_misaligned_top2.png`` (Fig. 6): misaligned top-2 test accuracy (``test/mis_top2``) per method.
* ``lambda_sensitivity.png`` (Table 6): validation and test accuracy against λ, per dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .render import FigureFile
from .report import ReportError, _datasets, _full, _methods, dataset_title, default_midas, prepare_runs
from .runs import metric_histories

DPI = 110


@dataclass
class FigureOutcome:
    written: list[FigureFile]
    skipped: list[str]  # "name (why)"


class _History:
    """Per-epoch histories fetched once per (run, key)."""

    def __init__(self, client) -> None:
        self.client = client
        self.cache: dict[tuple[tuple[str, ...], str], pd.DataFrame] = {}

    def __call__(self, runs: pd.DataFrame, key: str) -> pd.DataFrame:
        column = f"metrics.{key}"
        if column not in runs:
            return pd.DataFrame()
        ids = tuple(runs.loc[runs[column].notna(), "run_id"])
        if (ids, key) not in self.cache:
            self.cache[(ids, key)] = metric_histories(self.client, ids, key)
        return self.cache[(ids, key)]


def _keys(runs: pd.DataFrame, prefix: str) -> list[str]:
    """Metric names starting with ``prefix`` that some run logged (the suffix is the modality)."""
    return sorted(
        c[len("metrics.") :]
        for c in runs.columns
        if c.startswith(f"metrics.{prefix}") and runs[c].notna().any()
    )


def _new_figure(panels: int, height: float = 3.0):
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(4.4 * cols, height * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return figure, axes


def _epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _curve(ax, history: pd.DataFrame, **style) -> None:
    mean = history.mean(axis=1)
    line = ax.plot(mean.index, mean.to_numpy(), **style)[0]
    if history.shape[1] > 1:
        std = history.std(axis=1, ddof=1)
        ax.fill_between(mean.index, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)


def _midas(runs: pd.DataFrame, free: tuple[str, ...] = ()) -> pd.DataFrame:
    chosen, _ = default_midas(runs, free)
    return chosen[chosen["_midas"].astype(bool)]


def fig3_train_confidence(runs: pd.DataFrame, history: _History):
    midas = _midas(runs, free=("WM",))
    keys = _keys(midas, "method/train_conf_uni_")
    if not keys:
        return None, "no method/train_conf_uni_<m> histories"
    modalities = [k[len("method/train_conf_uni_") :] for k in keys]
    panels = [(d, wm, g) for (d, wm), g in midas.groupby(["dataset", "_WM"], sort=True)]
    figure, axes = _new_figure(len(panels))
    colors = [f"C{k}" for k in range(len(modalities))]
    for ax, (dataset, wm, group) in zip(axes, panels, strict=False):
        for m, color in zip(modalities, colors, strict=True):
            for kind, style in (("uni", "-"), ("multi", "--")):
                h = history(group, f"method/train_conf_{kind}_{m}")
                if not h.empty:
                    _curve(
                        ax,
                        h,
                        color=color,
                        linestyle=style,
                        label=f"{m} {'Uni' if kind == 'uni' else 'Multi'}",
                    )
        ax.set_title(f"{dataset_title(dataset)}, MIDAS {'with' if wm else 'without'} WM (n={len(group)})")
        _epochs(ax)
        ax.set_ylabel("normalised confidence")
        ax.legend(fontsize="small")
    figure.suptitle("Training confidences on\nmisaligned samples (Fig. 3)")
    return (
        figure,
        "Fig. 3 — MIDAS training confidences on misaligned samples: unimodal (Uni) vs fused (Multi)",
    )


def fig4_alpha(runs: pd.DataFrame, history: _History):
    midas = _midas(runs)
    keys = _keys(midas, "method/alpha_")
    if not keys:
        return None, "no method/alpha_<m> histories"
    datasets = _datasets(midas)
    figure, axes = _new_figure(len(datasets))
    for ax, dataset in zip(axes, datasets, strict=False):
        group = midas[midas["dataset"] == dataset]
        for key in keys:
            h = history(group, key)
            if not h.empty:
                _curve(ax, h, label=f"α {key[len('method/alpha_') :]}")
        ax.set_title(f"{dataset_title(dataset)} (n={len(group)})")
        _epochs(ax)
        ax.set_ylabel("weak-modality weight α")
        ax.legend(fontsize="small")
    figure.suptitle("Weak-modality weight α\nduring training (Fig. 4)")
    return figure, "Fig. 4 — weak-modality weight α over training, mean ± std over seeds"


def method_styles(methods: list[str]) -> dict[str, dict[str, str]]:
    """A colour (and, past 20 methods, a line style) per method, stable across panels: matplotlib's
    10-colour default cycle repeats colours once a sweep holds every baseline."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    styles = ["-", "--", ":", "-."]
    return {
        m: {"color": palette[k % len(palette)], "linestyle": styles[(k // len(palette)) % len(styles)]}
        for k, m in enumerate(methods)
    }


def _legend_outside(figure, axes) -> None:
    """One legend for the whole figure, right of the panels, so no curve or bar is hidden under it."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    columns = 1 if len(labels) <= 18 else 2
    figure.legend(handles, labels, loc="outside right upper", fontsize="small", ncols=columns)


def fig5_misaligned_confidence(runs: pd.DataFrame, history: _History):
    """One panel per dataset and modality (the confidence in that modality's class), a line per method."""
    chosen, _ = default_midas(runs)
    keys = _keys(chosen, "val/mis_conf_")
    if not keys:
        return None, "no val/mis_conf_<m> histories"
    panels = []
    for dataset in _datasets(chosen):
        subset = chosen[chosen["dataset"] == dataset]
        panels += [(dataset, key) for key in keys if subset[f"metrics.{key}"].notna().any()]
    logged = chosen[chosen[[f"metrics.{k}" for k in keys]].notna().any(axis=1)]
    style = method_styles(_methods(logged))  # the methods Fig. 6 shows, so colours agree between them
    figure, axes = _new_figure(len(panels), height=3.3)
    for ax, (dataset, key) in zip(axes, panels, strict=False):
        subset = chosen[chosen["dataset"] == dataset]
        for method in _methods(subset[subset[f"metrics.{key}"].notna()]):
            h = history(subset[subset["method"] == method], key)
            if not h.empty:
                _curve(ax, h, label=method, **style[method])
        ax.set_title(f"{dataset_title(dataset)}: {key[len('val/mis_conf_') :]}'s class")
        _epochs(ax)
        ax.set_ylabel("confidence on misaligned val pairs")
    _legend_outside(figure, axes)
    figure.suptitle("Fused-model confidence per modality on misaligned validation pairs (Fig. 5/7)")
    return (
        figure,
        "Fig. 5/7 — fused model's confidence in each modality's class on misaligned validation pairs",
    )


def fig6_misaligned_top2(runs: pd.DataFrame, history: _History):
    chosen, _ = default_midas(runs)
    if "metrics.test/mis_top2" not in chosen or chosen["metrics.test/mis_top2"].notna().sum() == 0:
        return None, "no test/mis_top2 metric"
    data = chosen[chosen["metrics.test/mis_top2"].notna()]
    stats = data.groupby(["dataset", "method"])["metrics.test/mis_top2"].agg(["mean", "std", "size"])
    datasets = _datasets(data)
    methods = _methods(data)
    style = method_styles(methods)
    figure, axes = _new_figure(1, height=3.4)
    figure.set_figwidth(max(4.4, 0.25 * len(methods) * len(datasets) + 3.0))  # room for every bar
    ax = axes[0]
    width = min(0.8 / len(methods), 0.3)
    x = np.arange(len(datasets))
    for k, method in enumerate(methods):
        means = [100 * stats["mean"].get((d, method), np.nan) for d in datasets]
        stds = [100 * stats["std"].get((d, method), np.nan) for d in datasets]
        ax.bar(
            x + (k - (len(methods) - 1) / 2) * width,
            means,
            width,
            yerr=np.nan_to_num(stds),
            capsize=2,
            label=method,
            color=style[method]["color"],
        )
    ax.set_xticks(x, [dataset_title(d) for d in datasets])
    ax.set_ylabel("misaligned top-2 accuracy (%)")
    _legend_outside(figure, [ax])
    figure.suptitle("Accuracy on misaligned test pairs (Fig. 6)")
    return figure, "Fig. 6 — misaligned top-2 test accuracy per method, mean ± std over seeds"


def lambda_sensitivity(runs: pd.DataFrame, history: _History):
    midas = runs[runs["_midas"].astype(bool) & runs["_lam"].notna()]
    midas = midas[_full(midas)]
    datasets = [d for d in _datasets(midas) if midas.loc[midas["dataset"] == d, "_lam"].nunique() > 1]
    if not datasets:
        return None, "no MIDAS runs with two or more λ on one dataset"
    figure, axes = _new_figure(len(datasets))
    for ax, dataset in zip(axes, datasets, strict=False):
        group = midas[midas["dataset"] == dataset]
        val = None
        for column, label in (("metrics.best/val_acc", "val acc"), ("metrics.test/acc", "test acc")):
            if column not in group:
                continue
            stats = group.groupby("_lam")[column].agg(["mean", "std"]).dropna(subset=["mean"])
            val = stats if val is None else val
            ax.errorbar(
                stats.index,
                100 * stats["mean"],
                yerr=100 * stats["std"].fillna(0),
                marker="o",
                capsize=3,
                label=label,
            )
        lams = sorted(group["_lam"].unique())
        ax.set_xscale("log")
        ax.set_xticks(lams, [f"{v:g}" for v in lams])
        ax.minorticks_off()
        if val is not None and "metrics.best/val_acc" in group:
            chosen = float(val.index[val["mean"] == val["mean"].max()].min())
            ax.axvline(chosen, color="0.6", linestyle=":", label=f"chosen on val: λ = {chosen:g}")
        runs_per = group.groupby("_lam").size()
        spread = (
            f"{runs_per.min()}" if runs_per.min() == runs_per.max() else f"{runs_per.min()}–{runs_per.max()}"
        )
        ax.set_title(f"{dataset_title(dataset)} (n = {spread} per λ)")
        ax.set_xlabel("λ")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize="small")
    figure.suptitle("Sensitivity to λ (Table 6)")
    return figure, "λ sensitivity — validation and test accuracy against λ, mean ± std over seeds"


FIGURES: dict[str, Callable] = {
    "fig3_train_confidence.png": fig3_train_confidence,
    "fig4_alpha.png": fig4_alpha,
    "fig5_misaligned_confidence.png": fig5_misaligned_confidence,
    "fig6_misaligned_top2.png": fig6_misaligned_top2,
    "lambda_sensitivity.png": lambda_sensitivity,
}


def write_figures(runs: pd.DataFrame, client, directory: Path) -> FigureOutcome:
    """Every figure whose metrics exist, as PNG files in ``directory``; the others skipped with a reason."""
    runs = prepare_runs(runs)
    directory = Path(directory)
    history = _History(client)
    outcome = FigureOutcome([], [])
    for name, make in FIGURES.items():
        try:
            figure, caption = make(runs, history) if not runs.empty else (None, "no runs")
        except ReportError as exc:
            figure, caption = None, str(exc)
        if figure is None:
            outcome.skipped.append(f"{name} ({caption})")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        figure.savefig(path, format="png")
        outcome.written.append(FigureFile(path, caption))
    return outcome
