"""Analysis: MLflow runs → aggregated mean ± std tables, the paper's tables and figures, reports."""

from .paper import make_report
from .report import build_tables
from .runs import load_runs
from .tables import markdown_table, summarize

__all__ = ["build_tables", "load_runs", "make_report", "markdown_table", "summarize"]
