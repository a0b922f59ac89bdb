"""``midasbench report``: runs logged to a temporary MLflow store with values chosen here, read back into the
paper's tables (every cell checked against numbers worked out by hand), figures and the self-contained HTML.
No Ray, no training."""

from __future__ import annotations

import base64
import csv
import io
import math
from html.parser import HTMLParser

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from midasbench.analysis.figures import FIGURES, write_figures
from midasbench.analysis.paper import make_report
from midasbench.analysis.render import csv_text, latex, markdown, render
from midasbench.analysis.report import LAYOUTS, MixedRunsError, ReportError, Table, build_tables
from midasbench.analysis.runs import load_runs
from midasbench.harness.cli import EXIT_OK, EXIT_USAGE, REPORT_FORMATS, REPORT_TABLES, main
from midasbench.harness.tracking import ensure_experiment

PNG = b"\x89PNG\r\n\x1a\n"
EPOCHS = 5
FULL = (True, True, True)

# (dataset, label, name, fidelity, switches (W, WM, HS) or None, λ or None, {metric: one value per seed})
RUNS = [
    ("cremad", "joint", "joint", "baseline", None, None,
     {"test/acc": [0.60, 0.62, 0.64], "test/macro_f1": [0.58, 0.60, 0.62], "best/val_acc": [0.6, 0.6, 0.6],
      "test/zeroed_acc_audio": [0.58, 0.60, 0.62], "test/zeroed_acc_visual": [0.20, 0.22, 0.24],
      "test/zeroed_acc_none": [0.1, 0.1, 0.1], "test/shapley_audio": [0.40, 0.41, 0.42],
      "test/shapley_visual": [0.05, 0.06, 0.07], "test/mis_top2": [0.15, 0.16, 0.17]}),
    ("cremad", "midas", "midas", "paper", FULL, 1.0,
     {"test/acc": [0.74, 0.75, 0.76], "test/macro_f1": [0.73, 0.73, 0.73], "best/val_acc": [0.70, 0.71, 0.72],
      "test/zeroed_acc_audio": [0.55, 0.56, 0.57], "test/zeroed_acc_visual": [0.50, 0.52, 0.54],
      "test/zeroed_acc_none": [0.1, 0.1, 0.1], "test/shapley_audio": [0.30, 0.31, 0.32],
      "test/shapley_visual": [0.25, 0.26, 0.27], "test/mis_top2": [0.60, 0.62, 0.64]}),
    ("cremad", "midas", "midas", "paper", FULL, 0.5,
     {"test/acc": [0.72, 0.73, 0.74], "test/macro_f1": [0.70, 0.71, 0.72], "best/val_acc": [.68, .69, .70]}),
    ("cremad", "midas", "midas", "paper", FULL, 5.0,
     {"test/acc": [0.70, 0.71, 0.72], "test/macro_f1": [0.69, 0.70, 0.71], "best/val_acc": [.66, .67, .68]}),
    ("cremad", "midas", "midas", "paper", (False, False, False), 1.0,
     {"test/acc": [0.70, 0.71, 0.72], "test/macro_f1": [0.68, 0.69, 0.70], "best/val_acc": [0.6, 0.6, 0.6]}),
    ("cremad", "midas", "midas", "paper", (True, True, False), 1.0,
     {"test/acc": [0.72, 0.74], "test/macro_f1": [0.71, 0.71], "best/val_acc": [0.6, 0.6]}),
    ("cremad", "mixup", "mixup", "baseline", None, None,
     {"test/acc": [0.61, 0.65], "test/macro_f1": [0.59, 0.61], "best/val_acc": [0.6, 0.6]}),
    ("cremad", "unimodal[audio]", "unimodal", "baseline", None, None,
     {"test/acc": [0.55, 0.56, 0.57], "test/macro_f1": [0.50, 0.52, 0.54], "best/val_acc": [0.5, 0.5, 0.5]}),
    ("food101", "joint", "joint", "baseline", None, None,
     {"test/acc": [0.90, 0.91, 0.92], "test/macro_f1": [0.85, 0.85, 0.86], "best/val_acc": [0.9, 0.9, 0.9]}),
    ("food101", "midas", "midas", "paper", FULL, 1.0,
     {"test/acc": [0.93, 0.94, 0.92], "test/macro_f1": [0.88, 0.89, 0.90], "best/val_acc": [0.9, 0.9, 0.9]}),
]  # fmt: skip


def _histories(name: str, switches, lam, seed: int) -> list[tuple[str, float, int]]:
    """Per-epoch values: α and confidences MIDAS logs; misaligned confidences every fused method logs."""
    out = []
    for epoch in range(EPOCHS):
        out.append(("val/acc", 0.5 + 0.02 * epoch, epoch))
        out.append(("train/loss", 1.0 / (1 + epoch), epoch))
        if name in ("joint", "midas"):
            out.append(("val/mis_conf_audio", 0.6 - (0.05 * epoch if name == "midas" else 0), epoch))
            out.append(("val/mis_conf_visual", 0.1 + (0.05 * epoch if name == "midas" else 0), epoch))
        if name == "midas":
            out.append(("method/alpha_audio", 1.0, epoch))
            out.append(("method/alpha_visual", 1.0 + 0.1 * epoch + 0.01 * seed, epoch))
            for m, base in (("audio", 0.6), ("visual", 0.4)):
                out.append((f"method/train_conf_uni_{m}", base, epoch))
                out.append(
                    (f"method/train_conf_multi_{m}", base + 0.02 * epoch * (1 if m == "audio" else -1), epoch)
                )
    return out


def _log_run(
    client, experiment_id, parent, dataset, label, name, fidelity, switches, lam, seed, metrics, **tags
):
    split = tags.pop("split", ("midas70", "2"))
    histories = tags.pop("histories", True)
    run_tags = {
        "dataset.name": dataset,
        "method.name": name,
        "method.label": label,
        "method.fidelity": fidelity,
        "split.protocol": split[0],
        "split.seed": split[1],
        "seed": str(seed),
        "midasbench.trial": f"{dataset}-{label}-{switches}-{lam}-{seed}",
        "mlflow.parentRunId": parent,
        **tags,
    }
    run = client.create_run(experiment_id, tags=run_tags)
    params = {"train.seed": str(seed), "method.name": name, "data.name": dataset}
    if label.startswith("unimodal"):
        params["method.params.modality"] = "audio"
    if switches is not None:
        for key, value in zip(
            ("use_warmup", "use_weak_modality_weight", "use_hard_sample_weight"), switches, strict=True
        ):
            params[f"method.params.{key}"] = str(value)
        params["method.params.lam"] = str(lam)
    items = [Metric(k, v, 0, s) for k, v, s in _histories(name, switches, lam, seed)] if histories else []
    best = EPOCHS - 1
    items += [Metric(k, v, 0, best) for k, v in metrics.items()]
    client.log_batch(
        run.info.run_id,
        metrics=items,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("mlflow.runName", f"{dataset}-{label}-seed{seed}")],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The store: experiment ``paper`` (RUNS under one parent run, plus an unfinished run that must not be
    read) and experiment ``mixed`` (cells whose runs differ in split protocol or fidelity)."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    paper = ensure_experiment(uri, "paper")
    parent = client.create_run(paper, tags={"mlflow.runName": "sweep"}).info.run_id
    for dataset, label, name, fidelity, switches, lam, metrics in RUNS:
        seeds = len(next(iter(metrics.values())))
        for seed in range(seeds):
            values = {k: v[seed] for k, v in metrics.items()}
            _log_run(client, paper, parent, dataset, label, name, fidelity, switches, lam, seed, values)
    crashed = client.create_run(
        paper, tags={"dataset.name": "cremad", "method.label": "joint", "mlflow.parentRunId": parent}
    )
    client.log_metric(crashed.info.run_id, "test/acc", 0.0)  # RUNNING: never aggregated
    client.set_terminated(parent, "FINISHED")

    mixed = ensure_experiment(uri, "mixed")
    one = {"test/acc": 0.5, "test/macro_f1": 0.5}
    for seed, split in enumerate([("midas70", "2"), ("midas70", "2"), ("official", "None")]):
        joint = ("cremad", "joint", "joint", "baseline", None, None)
        _log_run(client, mixed, "", *joint, seed, one, split=split, histories=False)
    for seed, fidelity in enumerate(["paper", "official-code"]):
        midas = ("ucf101", "midas", "midas", fidelity, FULL, 1.0)
        _log_run(client, mixed, "", *midas, seed, one, histories=False)
    return {"uri": uri, "parent": parent, "root": root}


@pytest.fixture(scope="module")
def runs(store):
    return load_runs("paper", store["uri"])


def one(tables: list[Table]) -> Table:
    assert len(tables) == 1
    return tables[0]


def check(table: Table, row: str, column: str, mean: float, std: float | None, n: int, rank=None, flag=False):
    cell = table.cell(row, column)
    assert cell is not None, (row, column)
    assert cell.n == n, (row, column)
    assert cell.mean == pytest.approx(mean, abs=1e-12), (row, column)
    if std is None:
        assert math.isnan(cell.std)
    else:
        assert cell.std == pytest.approx(std, abs=1e-12), (row, column)
    assert cell.rank == rank, (row, column, cell.rank)
    assert cell.flagged == flag, (row, column)


def test_load_runs_reads_the_given_store_and_finished_runs_only(runs):
    assert (
        len(runs) == 29 and runs["dataset"].isna().sum() == 1
    )  # the sweep's parent run, not the RUNNING one
    # 3+3+3+3+3+2+2+3 runs on cremad, 3+3 on food101
    assert sorted(runs["dataset"].dropna().unique()) == ["cremad", "food101"]
    assert "params.method.params.lam" in runs and "metrics.test/acc" in runs


def test_main_table_every_cell(runs):
    t = one(build_tables(runs, "main"))
    assert [r.name for r in t.rows] == ["unimodal[audio]", "joint", "mixup", "midas"]
    assert [c.title for c in t.columns] == ["CREMA-D Acc", "CREMA-D F1", "Food-101 Acc", "Food-101 F1"]
    assert t.modal_n == 3
    s2 = math.sqrt(0.0008)  # sample std of (0.61, 0.65): sqrt((0.02² + 0.02²) / 1)
    # CREMA-D Acc: 75 (midas) > 63 (mixup) > 62 (joint) > 56: bold midas, underline mixup
    check(t, "unimodal[audio]", "CREMA-D Acc", 0.56, 0.01, 3)
    check(t, "joint", "CREMA-D Acc", 0.62, 0.02, 3)
    check(t, "mixup", "CREMA-D Acc", 0.63, s2, 2, rank=2, flag=True)
    # MIDAS: full configuration, λ = 1 (best mean val acc 0.71 against 0.69 for 0.5 and 0.67 for 5)
    check(t, "midas", "CREMA-D Acc", 0.75, 0.01, 3, rank=1)
    # CREMA-D F1: 73 > 60 = 60 > 52: the tie at 60.00 is underlined twice
    check(t, "unimodal[audio]", "CREMA-D F1", 0.52, 0.02, 3)
    check(t, "joint", "CREMA-D F1", 0.60, 0.02, 3, rank=2)
    check(t, "mixup", "CREMA-D F1", 0.60, math.sqrt(0.0002), 2, rank=2, flag=True)
    check(t, "midas", "CREMA-D F1", 0.73, 0.0, 3, rank=1)
    # Food-101: two values per column, so best only (second best would also be the worst)
    check(t, "joint", "Food-101 Acc", 0.91, 0.01, 3)
    check(t, "midas", "Food-101 Acc", 0.93, 0.01, 3, rank=1)
    check(t, "joint", "Food-101 F1", (0.85 + 0.85 + 0.86) / 3, math.sqrt(1e-4 / 3), 3)
    check(t, "midas", "Food-101 F1", 0.89, 0.01, 3, rank=1)
    assert t.cell("mixup", "Food-101 Acc") is None and t.cell("unimodal[audio]", "Food-101 F1") is None

    md = markdown(t)
    assert "| Method | CREMA-D Acc | CREMA-D F1 | Food-101 Acc | Food-101 F1 |" in md
    assert "| unimodal[audio] | 56.00 ± 1.00 | 52.00 ± 2.00 | – | – |" in md
    assert "| joint | 62.00 ± 2.00 | <u>60.00</u> ± 2.00 | 91.00 ± 1.00 | 85.33 ± 0.58 |" in md
    assert "| mixup | <u>63.00</u> ± 2.83† | <u>60.00</u> ± 1.41† | – | – |" in md
    assert "| midas | **75.00** ± 1.00 | **73.00** ± 0.00 | **93.00** ± 1.00 | **89.00** ± 1.00 |" in md
    assert "ddof=1" in md and "n = 3 per cell" in md
    assert "† fewer runs than the most common n = 3: mixup on CREMA-D (n = 2)" in md
    assert "λ = 1 (of 0.5, 1, 5)" in md and "5 ablation run(s) left out" in md


def test_augment_table_keeps_the_augmentation_rows(runs):
    t = one(build_tables(runs, "augment"))
    assert [r.name for r in t.rows] == ["joint", "mixup", "midas"]  # powmix and lemda did not run
    check(t, "joint", "CREMA-D Acc", 0.62, 0.02, 3)
    check(t, "mixup", "CREMA-D Acc", 0.63, math.sqrt(0.0008), 2, rank=2, flag=True)
    check(t, "midas", "CREMA-D Acc", 0.75, 0.01, 3, rank=1)
    # F1: only 73 and 60 are distinct values here, so nothing is underlined
    check(t, "joint", "CREMA-D F1", 0.60, 0.02, 3)
    check(t, "mixup", "CREMA-D F1", 0.60, math.sqrt(0.0002), 2, flag=True)
    check(t, "midas", "CREMA-D F1", 0.73, 0.0, 3, rank=1)
    check(t, "midas", "Food-101 Acc", 0.93, 0.01, 3, rank=1)


def test_ablation_table_rows_are_the_switches(runs):
    t = one(build_tables(runs, "ablation"))
    assert t.row_header == ("W", "WM", "HS")
    assert [r.header for r in t.rows] == [("✗", "✗", "✗"), ("✓", "✓", "✗"), ("✓", "✓", "✓")]
    assert [r.name for r in t.rows] == ["none", "W+WM", "W+WM+HS"]
    check(t, "none", "CREMA-D Acc", 0.71, 0.01, 3)
    check(t, "W+WM", "CREMA-D Acc", 0.73, math.sqrt(0.0002), 2, rank=2, flag=True)
    check(t, "W+WM+HS", "CREMA-D Acc", 0.75, 0.01, 3, rank=1)  # λ = 1 only: the λ chosen on validation
    check(t, "none", "CREMA-D F1", 0.69, 0.01, 3)
    check(t, "W+WM", "CREMA-D F1", 0.71, 0.0, 2, rank=2, flag=True)
    check(t, "W+WM+HS", "CREMA-D F1", 0.73, 0.0, 3, rank=1)
    check(t, "W+WM+HS", "Food-101 Acc", 0.93, 0.01, 3)  # alone in its column: no mark
    assert t.cell("none", "Food-101 Acc") is None
    assert "| ✓ | ✓ | ✗ | <u>73.00</u> ± 1.41† | <u>71.00</u> ± 0.00† | – | – |" in markdown(t)


def test_lambda_table_rows_are_lambda(runs):
    t = one(build_tables(runs, "lambda"))
    assert t.row_header == ("λ",)
    assert [r.name for r in t.rows] == ["0.5", "1", "5"]
    assert [c.title for c in t.columns][:3] == ["CREMA-D val Acc", "CREMA-D Acc", "CREMA-D F1"]
    check(t, "0.5", "CREMA-D val Acc", 0.69, 0.01, 3, rank=2)
    check(t, "1", "CREMA-D val Acc", 0.71, 0.01, 3, rank=1)
    check(t, "5", "CREMA-D val Acc", 0.67, 0.01, 3)
    check(t, "0.5", "CREMA-D Acc", 0.73, 0.01, 3, rank=2)
    check(t, "1", "CREMA-D Acc", 0.75, 0.01, 3, rank=1)
    check(t, "5", "CREMA-D Acc", 0.71, 0.01, 3)
    check(t, "0.5", "CREMA-D F1", 0.71, 0.01, 3, rank=2)
    check(t, "1", "CREMA-D F1", 0.73, 0.0, 3, rank=1)
    check(t, "5", "CREMA-D F1", 0.70, 0.01, 3)
    check(t, "1", "Food-101 Acc", 0.93, 0.01, 3)
    assert t.cell("5", "Food-101 Acc") is None
    assert "5 ablation run(s) left out" in " ".join(t.notes)


def test_modality_table_per_dataset(runs):
    t = one(build_tables(runs, "modality"))  # Food-101 has no diagnostics: no table
    assert t.title.startswith("Modality use on CREMA-D")
    assert [r.name for r in t.rows] == ["joint", "midas"]  # the unimodal and mixup runs have none
    assert [c.title for c in t.columns] == [
        "acc, only audio kept",
        "acc, only visual kept",
        "Shapley audio",
        "Shapley visual",
        "misaligned top-2",
    ]
    check(t, "joint", "acc, only audio kept", 0.60, 0.02, 3, rank=1)
    check(t, "midas", "acc, only audio kept", 0.56, 0.01, 3)
    check(t, "joint", "acc, only visual kept", 0.22, 0.02, 3)
    check(t, "midas", "acc, only visual kept", 0.52, 0.02, 3, rank=1)
    check(t, "joint", "Shapley audio", 0.41, 0.01, 3, rank=1)
    check(t, "midas", "Shapley audio", 0.31, 0.01, 3)
    check(t, "joint", "Shapley visual", 0.06, 0.01, 3)
    check(t, "midas", "Shapley visual", 0.26, 0.01, 3, rank=1)
    check(t, "joint", "misaligned top-2", 0.16, 0.01, 3)
    check(t, "midas", "misaligned top-2", 0.62, 0.02, 3, rank=1)


def test_mixed_split_protocols_and_fidelities_are_refused_then_allowed(store):
    mixed = load_runs("mixed", store["uri"])
    with pytest.raises(MixedRunsError) as info:
        build_tables(mixed, "main")
    message = str(info.value)
    joint = "dataset 'cremad', method 'joint': split protocols midas70/seed 2 (2 runs), official/seed None"
    assert joint in message
    assert "dataset 'ucf101', method 'midas': fidelities official-code (1 runs), paper (1 runs)" in message
    assert "--allow-mixed" in message
    t = one(build_tables(mixed, "main", allow_mixed=True))
    check(t, "joint", "CREMA-D Acc", 0.5, 0.0, 3)
    assert any(note.startswith("Mixed runs aggregated (--allow-mixed)") for note in t.notes)


def _welch_p(a: list[float], b: list[float]) -> float:
    """Welch's t-test worked out from its formula (Welch-Satterthwaite degrees of freedom)."""
    from scipy import stats

    def mean_var(x):
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)

    (ma, va), (mb, vb) = mean_var(a), mean_var(b)
    se2 = va / len(a) + vb / len(b)
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_welch_marker_against_the_reference(runs):
    t = one(build_tables(runs, "main", reference="joint"))
    midas = t.cell("midas", "CREMA-D Acc")  # 0.75 ± 0.01 against 0.62 ± 0.02: t ≈ 10
    assert midas.p_value == pytest.approx(_welch_p([0.74, 0.75, 0.76], [0.60, 0.62, 0.64]))
    assert midas.p_value < 0.01 and midas.significant
    mixup = t.cell("mixup", "CREMA-D Acc")  # 0.63 ± 0.028 against 0.62 ± 0.02: noise
    assert mixup.p_value == pytest.approx(_welch_p([0.61, 0.65], [0.60, 0.62, 0.64]))
    assert mixup.p_value > 0.5 and not mixup.significant
    food = t.cell("midas", "Food-101 Acc")  # t = 2.45 with 4 degrees of freedom: p ≈ 0.07, no marker
    assert 0.05 < food.p_value < 0.1 and not food.significant
    joint = t.cell("joint", "CREMA-D Acc")
    assert joint.p_value is None and not joint.significant  # the reference itself
    md = markdown(t)
    assert "| midas | **75.00** ± 1.00* |" in md and "| mixup | <u>63.00</u> ± 2.83† |" in md
    assert "Welch" in md and "ttest_ind(equal_var=False)" in md and "little power" in md
    with pytest.raises(ReportError, match="reference 'nope' is not a row"):
        build_tables(runs, "main", reference="nope")


def test_latex_csv_and_markdown_mark_the_same_cells(runs):
    t = one(build_tables(runs, "main", reference="joint"))
    tex = latex(t)
    assert r"\textbf{75.00} $\pm$ 1.00$^{*}$" in tex
    assert r"\underline{63.00} $\pm$ 2.83$^{\dagger}$" in tex
    assert r"\multicolumn{2}{c}{CREMA-D}" in tex and r"\toprule" in tex and "ddof=1" in tex
    rows = {r["Method"]: r for r in csv.DictReader(io.StringIO(csv_text([t])))}
    assert list(rows) == ["unimodal[audio]", "joint", "mixup", "midas"]
    assert rows["midas"]["CREMA-D Acc_rank"] == "1" and rows["mixup"]["CREMA-D Acc_rank"] == "2"
    assert rows["joint"]["CREMA-D Acc_rank"] == "" and rows["joint"]["CREMA-D F1_rank"] == "2"
    assert float(rows["mixup"]["CREMA-D Acc_mean"]) == pytest.approx(0.63)
    assert float(rows["mixup"]["CREMA-D Acc_std"]) == pytest.approx(math.sqrt(0.0008))
    assert rows["mixup"]["CREMA-D Acc_n"] == "2" and rows["mixup"]["CREMA-D Acc_flag"] == "†"
    assert rows["midas"]["CREMA-D Acc_sig"] == "*" and rows["mixup"]["CREMA-D Acc_sig"] == ""
    assert rows["mixup"]["Food-101 Acc_mean"] == ""
    assert render([t], "md") == markdown(t) + "\n"


def _png(path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1024, path
    return data


def test_figures_are_written_or_skipped(store, runs, tmp_path):
    client = MlflowClient(tracking_uri=store["uri"])
    outcome = write_figures(runs, client, tmp_path / "figs")
    assert sorted(f.path.name for f in outcome.written) == sorted(FIGURES)
    assert outcome.skipped == []
    for figure in outcome.written:
        _png(figure.path)
    bare = write_figures(load_runs("mixed", store["uri"]), client, tmp_path / "none")
    assert bare.written == [] and len(bare.skipped) == len(FIGURES)
    assert "fig4_alpha.png (no method/alpha_<m> histories)" in bare.skipped
    assert not (tmp_path / "none").exists()


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag in ("link", "script") or (tag != "img" and "src" in attrs):
            self.links.append(tag)
        if tag == "table":
            self.tables += 1


def test_html_report_is_self_contained(store, tmp_path):
    out = tmp_path / "report" / "main.html"
    report = make_report("paper", tracking_uri=store["uri"], table="main", out=out)
    parser = _Images()
    parser.feed(out.read_text(encoding="utf-8"))
    parser.close()
    assert parser.tables == 1 and parser.links == []
    assert len(parser.sources) == len(FIGURES)
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data[:8] == PNG and len(data) > 1024
    assert {f.path.parent for f in report.figures} == {out.parent}  # also written beside the report
    assert "<b>75.00</b> ± 1.00" in report.text and "<u>63.00</u> ± 2.83<sup>†</sup>" in report.text


def test_cli_report_writes_the_file_and_logs_on_the_parent(store, tmp_path, capsys):
    out = tmp_path / "t1.md"
    code = main(
        [
            *("report", "--experiment", "paper", "--tracking-uri", store["uri"], "--parent", store["parent"]),
            *("--table", "lambda", "--out", str(out)),
        ]
    )
    assert code == EXIT_OK
    assert "| 1 | **71.00** ± 1.00 |" in out.read_text()
    _png(tmp_path / "lambda_sensitivity.png")
    assert f"wrote {out}" in capsys.readouterr().err
    logged = {
        a.path for a in MlflowClient(tracking_uri=store["uri"]).list_artifacts(store["parent"], "report")
    }
    assert {"report/t1.md", "report/fig4_alpha.png", "report/lambda_sensitivity.png"} <= logged

    assert main(["report", "--experiment", "paper", "--tracking-uri", store["uri"], "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("Method,CREMA-D Acc_mean,")


def test_cli_report_usage_errors_exit_2(store, capsys):
    uri = store["uri"]
    assert main(["report", "--experiment", "no-such", "--tracking-uri", uri]) == EXIT_USAGE
    assert "no MLflow experiment named 'no-such'" in capsys.readouterr().err
    assert main(["report", "--experiment", "mixed", "--tracking-uri", uri, "--no-figures"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "refusing to aggregate" in err and "dataset 'cremad', method 'joint'" in err
    assert (
        main(["report", "--experiment", "mixed", "--tracking-uri", uri, "--allow-mixed", "--no-figures"]) == 0
    )
    capsys.readouterr()
    assert (
        main(["report", "--experiment", "paper", "--tracking-uri", uri, "--parent", "0" * 32]) == EXIT_USAGE
    )
    assert "no finished runs" in capsys.readouterr().err
    assert main(["report", "--experiment", "mixed", "--tracking-uri", uri, "--table", "lambda"]) == EXIT_USAGE


def test_cli_choices_match_the_library():
    from midasbench.analysis.render import FORMATS

    assert REPORT_TABLES == LAYOUTS and REPORT_FORMATS == FORMATS


def test_cli_dataset_filter_gives_a_table_of_some_datasets_only(store, capsys):
    uri = store["uri"]
    args = ["report", "--experiment", "paper", "--tracking-uri", uri, "--no-figures", "--format", "csv"]
    assert main([*args, "--datasets", "cremad"]) == EXIT_OK
    header = capsys.readouterr().out.splitlines()[0]
    assert "CREMA-D Acc_mean" in header and header.count("Acc_mean") == 1
    assert main([*args, "--datasets", "ucf101"]) == EXIT_USAGE
    assert "--datasets: no runs on ['ucf101']" in capsys.readouterr().err


def test_reconstructed_and_inferred_fidelities_get_footnotes():
    import pandas as pd

    def run(method: str, fidelity: str, seed: int, acc: float) -> dict:
        return {
            "dataset": "cremad", "method": method, "fidelity": fidelity, "split_protocol": "midas70",
            "split_seed": 0, "seed": seed, "metrics.test/acc": acc, "metrics.test/macro_f1": acc,
        }  # fmt: skip

    frame = pd.DataFrame(
        [run("joint", "baseline", s, 0.6) for s in (0, 1)]
        + [run("amco", "reconstructed", s, 0.62) for s in (0, 1)]
        + [run("powmix", "reconstructed", s, 0.61) for s in (0, 1)]
        + [run("mixup", "inferred", s, 0.59) for s in (0, 1)]
    )
    notes = one(build_tables(frame, "main")).notes
    reconstructed = [n for n in notes if n.startswith("Fidelity 'reconstructed'")]
    inferred = [n for n in notes if n.startswith("Fidelity 'inferred'")]
    assert len(reconstructed) == 1 and reconstructed[0].endswith(": amco, powmix.")
    assert len(inferred) == 1 and inferred[0].endswith(": mixup.")
    assert not any("joint" in n for n in notes if n.startswith("Fidelity"))


def test_figure_styles_stay_distinct_for_every_baseline():
    from midasbench.analysis.figures import method_styles

    names = [f"m{k}" for k in range(25)]
    styles = method_styles(names)
    first20 = {(tuple(styles[n]["color"]), styles[n]["linestyle"]) for n in names[:20]}
    assert len(first20) == 20  # 20 distinct colours (tab20) before any repeats
    assert len({(tuple(s["color"]), s["linestyle"]) for s in styles.values()}) == 25  # then a new line style
    assert len({tuple(s["color"]) for s in method_styles(names[:7]).values()}) == 7
