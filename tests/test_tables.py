"""Aggregation over seeds: mean ± sample std (ddof = 1), counted and formatted as the table shows."""

import math

import pandas as pd
import pytest

from midasbench.analysis.tables import format_cell, markdown_table, summarize


def runs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dataset": ["d", "d", "d", "d", "d"],
            "method": ["joint", "joint", "joint", "uni", "uni"],
            "metrics.test/acc": [0.80, 0.82, 0.84, 0.50, 0.60],
            "metrics.test/macro_f1": [0.70, 0.70, 0.70, 0.40, 0.50],
        }
    )


def test_mean_and_sample_std_by_hand():
    s = summarize(runs()).set_index("method")
    assert s.loc["joint", "n"] == 3
    assert s.loc["joint", "test/acc/mean"] == pytest.approx(0.82)
    # sample std of (0.80, 0.82, 0.84): sqrt(((-.02)² + 0 + .02²) / 2) = 0.02
    assert s.loc["joint", "test/acc/std"] == pytest.approx(0.02)
    assert s.loc["uni", "test/acc/std"] == pytest.approx(math.sqrt(0.005))
    assert s.loc["joint", "test/macro_f1/std"] == pytest.approx(0.0)


def test_markdown_cells_are_percent_mean_pm_std():
    table = markdown_table(summarize(runs()))
    assert "| joint | 82.00 ± 2.00 | 70.00 ± 0.00 | 3 |" in table
    assert "| uni | 55.00 ± 7.07 | 45.00 ± 7.07 | 2 |" in table
    assert "ddof=1" in table
    assert format_cell(0.5, float("nan")) == "50.00"


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match=r"metrics\.test/auc"):
        summarize(runs(), ["test/auc"])


def test_column_labels_read_the_metric_names():
    from midasbench.analysis.tables import metric_label

    assert metric_label("test/acc") == "Acc"
    assert metric_label("test/zeroed_acc_audio") == "acc, only audio kept"
    assert metric_label("test/acc_only_weak") == "acc on weak-only subset"
    assert metric_label("val/shapley_visual") == "Shapley visual"
    assert metric_label("test/loss") == "loss"
