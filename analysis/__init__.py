"""Analysis: MLflow runs → aggregated mean ± std tables (and, later, figures and reports)."""

from .runs import load_runs
from .tables import markdown_table, summarize

__all__ = ["load_runs", "markdown_table", "summarize"]
