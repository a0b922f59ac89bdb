"""The paper's tables from MLflow runs: layouts, aggregation over seeds, best/second-best, Welch tests.

Every cell aggregates the runs of one row (a method, an ablation setting or a λ) on one dataset: the
test metrics each run logged for its best-validation epoch, as mean and *sample* standard deviation
(ddof = 1) with n stated. A cell only averages runs that differ in their seed: runs that mix split
protocols (``split_protocol``/``split_seed``), method fidelities or method parameters are refused
(:class:`MixedRunsError`) unless ``allow_mixed``. Layouts (``LAYOUTS``):

* ``main`` (paper Table 1): rows methods, columns datasets × {Acc, F1}.
* ``ablation`` (Table 2): MIDAS runs only, rows (W, WM, HS) from ``method.params.use_warmup``,
  ``use_weak_modality_weight`` and ``use_hard_sample_weight`` (a missing param counts as the default, on).
* ``augment`` (Table 3): the rows among joint, mixup, powmix, lemda and midas that have runs.
* ``lambda`` (Table 6): full-configuration MIDAS runs, rows λ (``method.params.lam``), columns datasets ×
  {val Acc, Acc, F1}; the validation column is the one λ is chosen on.
* ``modality``: one table per dataset, rows methods, columns accuracy with one modality kept, Shapley
  values and misaligned top-2 accuracy (test split).

A method or dataset without runs is simply not a row or column; a row with no runs on one dataset shows
"–" there. In ``main``, ``augment`` and ``modality`` a MIDAS row uses the full configuration (W, WM, HS
on); where its runs hold several λ, the λ with the best mean validation accuracy (ties: the smaller), as
``midasbench tune lambda`` chooses; a footnote says so. Per column the best mean (higher is better,
compared as displayed) is bold and the second best underlined; with two distinct values only the best is
marked. A cell with fewer runs than the table's most common n carries a †. Rows whose runs carry the
fidelity ``reconstructed`` (no public code: AMCo, PowMix) or ``inferred`` are named in a footnote each.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .tables import metric_label

LAYOUTS = ("main", "ablation", "augment", "lambda", "modality")
MIDAS_NAMES = ("midas", "midas-code", "midas-paper")
AUGMENT_METHODS = ("joint", "mixup", "powmix", "lemda", "midas")
PARAM = "params.method.params."
SWITCHES = (("W", "use_warmup"), ("WM", "use_weak_modality_weight"), ("HS", "use_hard_sample_weight"))
CHECK, CROSS = "✓", "✗"
DAGGER, SIGNIFICANT = "†", "*"
ALPHA = 0.05
DATASET_NAMES = {
    "kinetics_sounds": "Kinetics-Sounds",
    "cremad": "CREMA-D",
    "ucf101": "UCF-101",
    "food101": "Food-101",
    "mosi": "CMU-MOSI",
    "sarcasm": "Sarcasm",
    "twitter2015": "Twitter2015",
}
TABLE_METRICS = ("test/acc", "test/macro_f1")
LAMBDA_METRICS = ("best/val_acc", "test/acc", "test/macro_f1")
LABELS = {"best/val_acc": "val Acc"}


class ReportError(ValueError):
    """The runs cannot make the requested table (nothing ran wrong: exit code 2)."""


class MixedRunsError(ReportError):
    """A cell's runs differ in more than their seed."""


@dataclass
class Column:
    dataset: str  # the runs' dataset name
    metric: str  # e.g. test/acc
    group: str  # header group: the dataset's display name, "" where the table is for one dataset
    label: str  # e.g. Acc

    @property
    def title(self) -> str:
        return f"{self.group} {self.label}".strip()


@dataclass
class Row:
    header: tuple[str, ...]  # one value per row-header column
    name: str  # what --reference matches
    description: str  # how errors and footnotes name it


@dataclass
class Cell:
    values: np.ndarray  # the runs' values, unscaled
    rank: int | None = None  # 1: best (bold), 2: second best (underlined)
    flagged: bool = False  # † fewer runs than the table's most common n
    p_value: float | None = None  # Welch's t-test against the reference row
    significant: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan


@dataclass
class Table:
    title: str
    row_header: tuple[str, ...]
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[int, int], Cell]
    notes: list[str] = field(default_factory=list)
    modal_n: int = 0
    reference: str | None = None
    scale: float = 100.0
    digits: int = 2

    def cell(self, row: str, column: str) -> Cell | None:
        """The cell of the row named ``row`` and the column titled ``column`` (None when empty)."""
        rows = [k for k, r in enumerate(self.rows) if r.name == row]
        columns = [k for k, c in enumerate(self.columns) if c.title == column]
        if not rows or not columns:
            raise KeyError(f"no row {row!r} or no column {column!r} in table {self.title!r}")
        return self.cells.get((rows[0], columns[0]))

    def number(self, value: float) -> str:
        return f"{value * self.scale:.{self.digits}f}"


# ---- runs: identity columns and MIDAS switches


def _as_bool(value: object) -> bool:
    """A logged boolean param; missing means the default (on)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return str(value).strip().lower() not in ("false", "0", "no", "off")


def prepare_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs naming a dataset and a method, plus ``_midas``, switches ``_W``/``_WM``/``_HS`` and ``_lam``."""
    if runs.empty or "dataset" not in runs or "method" not in runs:
        return pd.DataFrame(columns=["dataset", "method"])
    runs = runs[runs["dataset"].notna() & runs["method"].notna()].copy()
    for column in ("fidelity", "split_protocol", "split_seed", "seed"):
        if column not in runs:
            runs[column] = None
    names = runs["tags.method.name"] if "tags.method.name" in runs else runs["method"]
    runs["_midas"] = names.isin(MIDAS_NAMES) | runs["method"].isin(MIDAS_NAMES)
    for short, param in SWITCHES:
        column = PARAM + param
        runs[f"_{short}"] = runs[column].map(_as_bool) if column in runs else True
    column = PARAM + "lam"
    runs["_lam"] = pd.to_numeric(runs[column], errors="coerce") if column in runs else math.nan
    return runs


def _full(runs: pd.DataFrame, free: Sequence[str] = ()) -> pd.Series:
    mask = pd.Series(True, index=runs.index)
    for short, _ in SWITCHES:
        if short not in free:
            mask &= runs[f"_{short}"].astype(bool)
    return mask


def default_midas(runs: pd.DataFrame, free: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Keep, of the MIDAS runs, the full configuration (switches in ``free`` may vary) and, per dataset
    and MIDAS variant, one λ: the best mean validation accuracy among its full-configuration runs (ties: the
    smaller λ). Other methods' runs are kept as they are. Returns the runs and what was chosen."""
    if runs.empty:
        return runs, []
    midas = runs["_midas"].astype(bool)
    keep = ~midas | _full(runs, free)
    dropped_ablations = int((midas & ~keep).sum())
    notes = []
    if dropped_ablations:
        notes.append(
            f"MIDAS rows use the full configuration (W, WM, HS on); "
            f"{dropped_ablations} ablation run(s) left out."
        )
    chosen_text = []
    for (dataset, method), group in runs[midas & keep].groupby(["dataset", "method"], sort=True):
        lams = group["_lam"].dropna().unique()
        if len(lams) < 2:
            continue
        full = group[_full(group)]
        basis = full if not full.empty else group
        val = (
            basis["metrics.best/val_acc"]
            if "metrics.best/val_acc" in basis
            else pd.Series(math.nan, basis.index)
        )
        means = pd.to_numeric(val, errors="coerce").groupby(basis["_lam"]).mean().dropna()
        if means.empty:
            raise ReportError(
                f"{method} on {dataset}: runs with λ {', '.join(f'{v:g}' for v in sorted(lams))} and no "
                "best/val_acc to choose one on"
            )
        lam = float(means.index[means == means.max()].min())
        keep &= ~((runs["dataset"] == dataset) & (runs["method"] == method) & (runs["_lam"] != lam))
        among = ", ".join(f"{v:g}" for v in sorted(lams))
        chosen_text.append(f"{method} on {dataset_title(dataset)}: λ = {lam:g} (of {among})")
    if chosen_text:
        notes.append(
            "λ chosen on mean validation accuracy (never test), as midasbench tune lambda does: "
            + "; ".join(chosen_text)
            + "."
        )
    return runs[keep], notes


# ---- ordering and naming


def dataset_title(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def _dataset_key(name: str) -> tuple:
    order = list(DATASET_NAMES)
    return (order.index(name) if name in order else len(order), name)


def _method_key(label: str) -> tuple:
    base = label.split("[", 1)[0]
    group = 0 if base == "unimodal" else 1 if base == "joint" else 3 if base in MIDAS_NAMES else 2
    return (group, label)


def _label(metric: str) -> str:
    return LABELS.get(metric) or metric_label(metric)


def _datasets(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["dataset"].unique(), key=_dataset_key)


def _methods(runs: pd.DataFrame) -> list[str]:
    return sorted(runs["method"].unique(), key=_method_key)


def _dataset_columns(datasets: Sequence[str], metrics: Sequence[str]) -> list[Column]:
    return [Column(d, m, dataset_title(d), _label(m)) for d in datasets for m in metrics]


# ---- layouts: each gives the runs and a row per run


@dataclass
class _Layout:
    title: str
    row_header: tuple[str, ...]
    runs: pd.DataFrame
    row_of: Callable[[pd.Series], tuple]  # a run → its row's sort key
    make_row: Callable[[tuple], Row]
    columns: list[Column]
    notes: list[str]


def _method_row(key: tuple) -> Row:
    (label,) = key[1:]
    return Row((label,), label, f"method {label!r}")


def _main(runs: pd.DataFrame, title: str, methods: Sequence[str] | None = None) -> _Layout:
    runs, notes = default_midas(runs)
    order = {m: k for k, m in enumerate(methods or ())}
    if methods is not None:
        runs = runs[runs["method"].isin(methods)]
        if runs.empty:
            raise ReportError(f"no runs of {', '.join(methods)} to compare")

    def row_of(run: pd.Series) -> tuple:
        return (order[run["method"]] if order else _method_key(run["method"])[0], run["method"])

    return _Layout(
        title, ("Method",), runs, row_of, _method_row, _dataset_columns(_datasets(runs), TABLE_METRICS), notes
    )


def _midas_runs(runs: pd.DataFrame, what: str) -> pd.DataFrame:
    midas = runs[runs["_midas"].astype(bool)]
    if midas.empty:
        raise ReportError(f"the {what} table needs MIDAS runs (method midas or midas-code); there are none")
    return midas


def _ablation(runs: pd.DataFrame) -> _Layout:
    runs, notes = default_midas(_midas_runs(runs, "ablation"), free=tuple(s for s, _ in SWITCHES))
    several = runs["method"].nunique() > 1

    def row_of(run: pd.Series) -> tuple:
        on = tuple(bool(run[f"_{s}"]) for s, _ in SWITCHES)
        return (run["method"] if several else "", sum(on), *(not v for v in on))

    def make_row(key: tuple) -> Row:
        method, on = key[0], tuple(not v for v in key[2:])
        marks = tuple(CHECK if v else CROSS for v in on)
        enabled = "+".join(s for (s, _), v in zip(SWITCHES, on, strict=True) if v) or "none"
        described = ", ".join(f"{s} {m}" for (s, _), m in zip(SWITCHES, marks, strict=True))
        if several:
            return Row((method, *marks), f"{method}:{enabled}", f"{method} with {described}")
        return Row(marks, enabled, described)

    header = (("Method",) if several else ()) + tuple(s for s, _ in SWITCHES)
    columns = _dataset_columns(_datasets(runs), TABLE_METRICS)
    notes.append(
        f"W warm-up, WM weak-modality weighting, HS hard-sample weighting ({CHECK} on, {CROSS} off)."
    )
    return _Layout("Ablation of MIDAS (Table 2)", header, runs, row_of, make_row, columns, notes)


def _lambda(runs: pd.DataFrame) -> _Layout:
    runs = _midas_runs(runs, "lambda")
    full = runs[_full(runs)]
    notes = []
    if len(full) < len(runs):
        notes.append(
            f"full MIDAS configuration (W, WM, HS on); {len(runs) - len(full)} ablation run(s) left out."
        )
    runs = full[full["_lam"].notna()]
    if runs.empty:
        raise ReportError(
            "the lambda table needs MIDAS runs with the param method.params.lam; there are none"
        )
    several = runs["method"].nunique() > 1

    def row_of(run: pd.Series) -> tuple:
        return (run["method"] if several else "", float(run["_lam"]))

    def make_row(key: tuple) -> Row:
        method, lam = key
        text = f"{lam:g}"
        if several:
            return Row((method, text), f"{method}:{text}", f"{method} with λ = {text}")
        return Row((text,), text, f"λ = {text}")

    header = ("Method", "λ") if several else ("λ",)
    columns = _dataset_columns(_datasets(runs), LAMBDA_METRICS)
    notes.append("λ is chosen on the validation column (best mean), never on test.")
    return _Layout("Sensitivity to λ (Table 6)", header, runs, row_of, make_row, columns, notes)


def _modality_metrics(runs: pd.DataFrame) -> list[str]:
    present = [
        c[len("metrics.") :] for c in runs.columns if c.startswith("metrics.test/") and runs[c].notna().any()
    ]
    zeroed = sorted(m for m in present if m.startswith("test/zeroed_acc_") and m != "test/zeroed_acc_none")
    shapley = sorted(m for m in present if m.startswith("test/shapley_"))
    return zeroed + shapley + (["test/mis_top2"] if "test/mis_top2" in present else [])


def _modality(runs: pd.DataFrame) -> list[_Layout]:
    runs, notes = default_midas(runs)
    layouts = []
    for dataset in _datasets(runs):
        subset = runs[runs["dataset"] == dataset]
        metrics = _modality_metrics(subset)
        if not metrics:
            continue
        has_any = subset[[f"metrics.{m}" for m in metrics]].notna().any(axis=1)
        subset = subset[has_any]
        layouts.append(
            _Layout(
                f"Modality use on {dataset_title(dataset)} (test split)",
                ("Method",),
                subset,
                lambda run: (_method_key(run["method"])[0], run["method"]),
                _method_row,
                [Column(dataset, m, "", _label(m)) for m in metrics],
                [
                    *notes,
                    "acc, only m kept: accuracy with the other modalities' features zeroed (App. A.4); "
                    "Shapley m: exact Shapley value of modality m for accuracy; "
                    "misaligned top-2: top-2 accuracy on different-label pairs.",
                ],
            )
        )
    if not layouts:
        raise ReportError(
            "no modality diagnostics (test/zeroed_acc_<m>, test/shapley_<m>, test/mis_top2) in these runs"
        )
    return layouts


# ---- assembling a table: cells, checks, ranks, tests, footnotes


def _identity(value: object) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _mixing(group: pd.DataFrame) -> list[str]:
    """How the runs of one cell differ beyond their seed (empty when they do not)."""
    problems = []
    splits = Counter(
        f"{_identity(p)}/seed {_identity(s)}"
        for p, s in zip(group["split_protocol"], group["split_seed"], strict=True)
    )
    if len(splits) > 1:
        problems.append("split protocols " + ", ".join(f"{k} ({v} runs)" for k, v in sorted(splits.items())))
    fidelities = Counter(_identity(f) for f in group["fidelity"])
    if len(fidelities) > 1:
        problems.append("fidelities " + ", ".join(f"{k} ({v} runs)" for k, v in sorted(fidelities.items())))
    differing = [
        c[len(PARAM) :]
        for c in group.columns
        if c.startswith(PARAM) and group[c].dropna().astype(str).nunique() > 1
    ]
    if differing:
        problems.append("method params " + ", ".join(sorted(differing)))
    return problems


def _assemble(layout: _Layout, reference: str | None, allow_mixed: bool) -> tuple[Table, list[str]]:
    runs = layout.runs
    keys = [layout.row_of(run) for _, run in runs.iterrows()]
    row_keys = sorted(set(keys))
    rows = [layout.make_row(k) for k in row_keys]
    position = {k: i for i, k in enumerate(row_keys)}
    runs = runs.assign(_row=[position[k] for k in keys])

    problems, repeated = [], []
    cells: dict[tuple[int, int], Cell] = {}
    for (i, dataset), group in runs.groupby(["_row", "dataset"], sort=True):
        where = f"dataset {dataset!r}, {rows[i].description}"
        problems += [f"{where}: {p}" for p in _mixing(group)]
        seeds = Counter(_identity(s) for s in group["seed"])
        if any(v > 1 for v in seeds.values()):
            repeated.append(f"{rows[i].name} on {dataset} (seeds {', '.join(sorted(seeds))})")
        for j, column in enumerate(layout.columns):
            name = f"metrics.{column.metric}"
            if column.dataset != dataset or name not in group:
                continue
            values = pd.to_numeric(group[name], errors="coerce").dropna().to_numpy(dtype=float)
            if len(values):
                cells[(i, j)] = Cell(values)
    if problems and not allow_mixed:
        raise MixedRunsError(
            "refusing to aggregate runs that differ in more than their seed "
            "(pass --allow-mixed to aggregate them anyway):\n  " + "\n  ".join(problems)
        )

    table = Table(layout.title, layout.row_header, rows, layout.columns, cells, reference=reference)
    counts = Counter(c.n for c in cells.values())
    table.modal_n = max(counts, key=lambda n: (counts[n], n)) if counts else 0
    flagged = {}
    for (i, j), cell in cells.items():
        if cell.n < table.modal_n:
            cell.flagged = True
            flagged[(rows[i].name, layout.columns[j].dataset)] = cell.n
    _rank(table)
    missing_reference = reference is not None and _test(table, reference)

    notes = [
        f"Test metrics at each run's best-validation epoch; mean ± sample std (ddof=1) over n runs (seeds), "
        f"values × {table.scale:g}; n = {table.modal_n} per cell unless marked {DAGGER}; "
        "a cell of one run has no std."
    ]
    if flagged:
        notes.append(
            f"{DAGGER} fewer runs than the most common n = {table.modal_n}: "
            + "; ".join(f"{r} on {dataset_title(d)} (n = {n})" for (r, d), n in flagged.items())
            + "."
        )
    notes.append(
        "Per column, bold = best mean and underlined = second best (higher is better, compared as displayed)."
    )
    if reference is not None and not missing_reference:
        ns = sorted({c.n for c in cells.values()})
        notes.append(
            f"Marked {SIGNIFICANT}: p < {ALPHA:g} in a two-sided Welch's t-test (unequal variances, "
            f"scipy.stats.ttest_ind(equal_var=False)) of the cell's runs against {reference}'s runs "
            f"in the same column; n = {'/'.join(map(str, ns))} runs per cell, so the test has little "
            f"power (a missing {SIGNIFICANT} is no evidence of equality) and no correction for multiple "
            "comparisons is made."
        )
    if missing_reference:
        notes.append(f"No {reference} row in this table: no significance markers.")
    if problems:
        notes.append("Mixed runs aggregated (--allow-mixed): " + "; ".join(problems) + ".")
    if repeated:
        notes.append("Cells with a seed run more than once: " + "; ".join(repeated) + ".")
    notes += _fidelity_notes(runs, rows)
    table.notes = [*notes, *layout.notes]
    return table, ([reference] if missing_reference else [])


FIDELITY_NOTES = {
    "reconstructed": "no authors' code exists; re-implemented from the paper's abstract or a third-party "
    "implementation and the spec, so these numbers are ours, not the authors' method as they ran it",
    "inferred": "the sources leave choices open; the spec's inferred reading is implemented, see the "
    "method's docstring",
}


def _fidelity_notes(runs: pd.DataFrame, rows: Sequence[Row]) -> list[str]:
    """A footnote per weaker-than-code fidelity, naming the rows whose runs carry it."""
    notes = []
    for fidelity, text in FIDELITY_NOTES.items():
        hit = sorted({rows[i].name for i in runs.loc[runs["fidelity"] == fidelity, "_row"]})
        if hit:
            notes.append(f"Fidelity {fidelity!r} ({text}): {', '.join(hit)}.")
    return notes


def _rank(table: Table) -> None:
    """Dense ranks on the displayed means, per column: 1 (bold) needs two distinct values, 2 (underline)
    three, so that second best is never also the worst."""
    for j in range(len(table.columns)):
        column = {i: c for (i, jj), c in table.cells.items() if jj == j}
        shown = {i: round(c.mean * table.scale, table.digits) for i, c in column.items()}
        distinct = sorted(set(shown.values()), reverse=True)
        for i, value in shown.items():
            if len(distinct) >= 2 and value == distinct[0]:
                column[i].rank = 1
            elif len(distinct) >= 3 and value == distinct[1]:
                column[i].rank = 2


def _test(table: Table, reference: str) -> bool:
    """Welch's t-test of every cell against the reference row's cell in its column. True when the table has
    no row named ``reference``."""
    from scipy import stats

    matches = [i for i, r in enumerate(table.rows) if r.name == reference]
    if not matches:
        return True
    ref = matches[0]
    for (i, j), cell in table.cells.items():
        base = table.cells.get((ref, j))
        if i == ref or base is None or cell.n < 2 or base.n < 2:
            continue
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            p = float(stats.ttest_ind(cell.values, base.values, equal_var=False).pvalue)
        if math.isfinite(p):
            cell.p_value = p
            cell.significant = p < ALPHA
    return False


def build_tables(
    runs: pd.DataFrame, layout: str = "main", *, reference: str | None = None, allow_mixed: bool = False
) -> list[Table]:
    """The tables of ``layout`` (one, or one per dataset for ``modality``) from ``load_runs``' frame."""
    if layout not in LAYOUTS:
        raise ReportError(f"unknown table {layout!r}; choose one of {', '.join(LAYOUTS)}")
    runs = prepare_runs(runs)
    if runs.empty:
        raise ReportError("no finished runs with dataset and method tags")
    if layout == "main":
        layouts = [_main(runs, "Comparison with baselines (Table 1)")]
    elif layout == "augment":
        layouts = [_main(runs, "Comparison with data augmentation (Table 3)", AUGMENT_METHODS)]
    elif layout == "ablation":
        layouts = [_ablation(runs)]
    elif layout == "lambda":
        layouts = [_lambda(runs)]
    else:
        layouts = _modality(runs)
    tables, missing = [], []
    for item in layouts:
        table, absent = _assemble(item, reference, allow_mixed)
        tables.append(table)
        missing += absent
    if reference is not None and len(missing) == len(tables):
        names = sorted({r.name for t in tables for r in t.rows})
        raise ReportError(
            f"reference {reference!r} is not a row of the {layout} table; its rows are {', '.join(names)}"
        )
    return tables
