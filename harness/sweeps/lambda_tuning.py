"""``midasbench tune lambda``: choose MIDAS's λ per dataset on validation accuracy, never on test.

A sweep over λ × seeds (paper Table 6 uses λ ∈ {0.5, 1, 2, 5, 10, 20}) runs like any other sweep; the
choice is the λ with the highest mean best-validation accuracy over seeds (ties: the smaller λ). The
sensitivity table reports validation and test accuracy per λ (mean ± sample std, n), and the choice is
logged on the sweep's parent MLflow run (tag ``lambda.chosen`` and ``lambda_sensitivity.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from midasbench.harness.sweeps.sweep import SweepSpec, expand, run_sweep

PAPER_LAMBDAS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


@dataclass
class LambdaChoice:
    chosen: float
    table: pd.DataFrame
    markdown: str
    parent_run_id: str


def lambda_sweep_spec(
    dataset: str,
    lambdas: tuple[float, ...] = PAPER_LAMBDAS,
    seeds: int = 3,
    method: str = "midas",
    overrides: list[str] | None = None,
    name: str | None = None,
    storage: str | None = None,
    asha: bool = False,
) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": name or f"lambda-{dataset}-{method}",
            "base": dataset,
            "overrides": [f"method.name={method}", *(overrides or [])],
            "grid": {"method.params.lam": list(lambdas), "train.seed": list(range(seeds))},
            "storage": storage,
            "scheduler": {"name": "asha" if asha else "fifo", "metric": "val/acc", "mode": "max"},
        }
    )


def choose_lambda(runs: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    """Pick λ by mean best-validation accuracy over seeds; the per-λ table carries val and test stats."""
    lam = runs["params.method.params.lam"].astype(float)
    frame = pd.DataFrame({"lam": lam, "val": runs["metrics.best/val_acc"], "test": runs["metrics.test/acc"]})
    table = frame.groupby("lam").agg(
        val_mean=("val", "mean"),
        val_std=("val", "std"),
        test_mean=("test", "mean"),
        test_std=("test", "std"),
        n=("val", "size"),
    )
    best = table["val_mean"].max()
    chosen = float(table.index[table["val_mean"] == best].min())  # ties: the smaller λ
    return chosen, table.reset_index()


def sensitivity_markdown(table: pd.DataFrame, chosen: float, dataset: str) -> str:
    lines = [
        f"λ sensitivity on {dataset} (chosen on validation accuracy: λ = {chosen:g})",
        "",
        "| λ | val Acc | test Acc | n |",
        "|---:|---:|---:|---:|",
    ]
    for row in table.itertuples():
        mark = " ←" if row.lam == chosen else ""
        lines.append(
            f"| {row.lam:g}{mark} | {100 * row.val_mean:.2f} ± {100 * row.val_std:.2f} "
            f"| {100 * row.test_mean:.2f} ± {100 * row.test_std:.2f} | {row.n} |"
        )
    lines += ["", "mean ± sample std (ddof=1) over seeds, × 100; the test column is reported, never used."]
    return "\n".join(lines)


def tune_lambda(
    spec: SweepSpec, dataset: str, *, resume: bool = False, address: str | None = None
) -> LambdaChoice:
    from mlflow.tracking import MlflowClient

    from midasbench.analysis import load_runs

    outcome = run_sweep(expand(spec, f"tune lambda {dataset}"), resume=resume, address=address)
    runs = load_runs(
        outcome.experiment, outcome.tracking_uri, f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    if runs.empty:
        raise RuntimeError(f"no finished runs in sweep {spec.name!r}; nothing to choose from")
    chosen, table = choose_lambda(runs)
    markdown = sensitivity_markdown(table, chosen, dataset)
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    client.set_tag(outcome.parent_run_id, "lambda.chosen", f"{chosen:g}")
    client.log_text(outcome.parent_run_id, markdown, "lambda_sensitivity.md")
    return LambdaChoice(chosen=chosen, table=table, markdown=markdown, parent_run_id=outcome.parent_run_id)
