"""``midasbench report``: an experiment's runs → the paper's tables (and figures) in one file."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .render import SUFFIXES, FigureFile, render
from .report import ReportError, Table, build_tables
from .runs import load_runs

ARTIFACT_DIR = "report"


@dataclass
class Report:
    tables: list[Table]
    text: str
    out: Path | None = None
    figures: list[FigureFile] = field(default_factory=list)
    skipped_figures: list[str] = field(default_factory=list)
    logged_to: str | None = None  # the parent run the figures (and the report) were logged on


def infer_format(out: str | Path | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    return SUFFIXES.get(Path(out).suffix.lower(), "md") if out else "md"


def make_report(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    parent: str | None = None,
    table: str = "main",
    fmt: str | None = None,
    out: str | Path | None = None,
    figures_dir: str | Path | None = None,
    figures: bool = True,
    reference: str | None = None,
    allow_mixed: bool = False,
    datasets: list[str] | None = None,
) -> Report:
    """Load the finished runs of ``experiment`` (only ``parent``'s children if given), build ``table`` and
    render it as ``fmt`` (default: from ``out``'s suffix, else md); write it to ``out`` when given. Figures
    go to ``figures_dir``, else beside ``out``; an HTML report embeds them. With ``parent`` the figures and
    the report are also logged as artifacts of that run under ``report/``."""
    import mlflow

    from midasbench.harness.tracking import resolve_tracking_uri

    fmt = infer_format(out, fmt)
    uri = resolve_tracking_uri(tracking_uri)
    where = f"tags.mlflow.parentRunId = '{parent}'" if parent else ""
    runs = load_runs(experiment, uri, where)
    if runs.empty or "dataset" not in runs:
        scope = f" under parent run {parent}" if parent else ""
        raise ReportError(f"no finished runs with a dataset in experiment {experiment!r}{scope} ({uri})")
    if datasets:  # e.g. the paper's Table 7: the main layout on the extra datasets only
        present = sorted(str(d) for d in runs["dataset"].dropna().unique())
        unknown = sorted(set(datasets) - set(present))
        if unknown:
            raise ReportError(f"--datasets: no runs on {unknown}; runs exist on {present}")
        runs = runs[runs["dataset"].isin(datasets)]
    tables = build_tables(runs, table, reference=reference, allow_mixed=allow_mixed)
    client = mlflow.MlflowClient(tracking_uri=uri)
    out = Path(out) if out else None
    directory = Path(figures_dir) if figures_dir else out.parent if out else None
    heading = f"midasbench report: {experiment}" + (f" (sweep {parent})" if parent else "")

    with tempfile.TemporaryDirectory(prefix="midasbench-figures-") as scratch:
        written, skipped = [], []
        if figures and (directory is not None or fmt == "html" or parent):
            from .figures import write_figures

            outcome = write_figures(runs, client, directory or Path(scratch))
            written, skipped = outcome.written, outcome.skipped
        text = render(tables, fmt, written, heading)
        report = Report(tables, text, out, written if directory else [], skipped)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        if parent:
            for figure in written:
                client.log_artifact(parent, str(figure.path), ARTIFACT_DIR)
            if out is not None:
                client.log_artifact(parent, str(out), ARTIFACT_DIR)
            else:
                suffix = {"latex": "tex"}.get(fmt, fmt)
                client.log_text(parent, text, f"{ARTIFACT_DIR}/{table}.{suffix}")
            report.logged_to = parent
    return report
