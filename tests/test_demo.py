"""`midasbench demo` end to end on local Ray: trials in parallel, one MLflow run each, a table."""

import json

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.ray
def test_demo_runs_on_ray_and_prints_the_mean_std_table(
    ray_session, tmp_path, monkeypatch, data_root, tiny_options
):
    from midasbench.harness.demo import run_demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_demo(
        seeds=2,
        experiment="demo-test",
        overrides=[
            f"data.root={data_root}",
            f"data.options={json.dumps(tiny_options)}",
            "train.epochs=2",
            "model.default_encoder.params={hidden: [8], out_dim: 8}",
        ],
        ddp_check=False,  # the session Ray instance has no trial_slot resource; test_sweep covers workers>1
        echo=False,
    )
    assert result.runs == 8  # joint, midas, unimodal[strong], unimodal[weak]; 2 seeds each
    client = MlflowClient(tracking_uri=result.tracking_uri)
    experiment = client.get_experiment_by_name("demo-test")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert result.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    main_table = result.table.split("Modality use")[0]
    assert "Comparison with baselines (Table 1)" in main_table
    rows = {line.split("|")[1].strip(): line for line in main_table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"Method", "joint", "midas", "unimodal[strong]", "unimodal[weak]"}
    assert all(" ± " in row for name, row in rows.items() if name != "Method")
    assert "**" in main_table  # the best value per column in bold
    assert result.report is not None and result.report.is_file() and result.figures >= 3
    assert "data:image/png;base64," in result.report.read_text()
    evidence = result.table.split("Modality use")[1]
    assert "misaligned top-2" in evidence and "acc, only weak kept" in evidence
    assert (
        "| joint |" in evidence and "| midas |" in evidence and "unimodal" not in evidence.split("\n", 3)[-1]
    )
