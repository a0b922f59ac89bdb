"""Sweeps on local Ray: trial expansion, validation, parent/child MLflow runs, retries, resume, λ tuning."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from midasbench.harness.cli import EXIT_OK, EXIT_USAGE, main
from midasbench.harness.errors import ConfigError
from midasbench.harness.sweeps.lambda_tuning import choose_lambda
from midasbench.harness.sweeps.sweep import CHAOS_FILE, TRIAL_TAG, expand, load_sweep, run_sweep


def tiny_overrides(data_root, options) -> list[str]:
    return [
        f"data.root={data_root}",
        f"data.options={json.dumps(options)}",
        "model.default_encoder.params={hidden: [16], out_dim: 8}",
        "train.epochs=3",
        "train.batch_size=32",
    ]


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def children(uri: str, experiment: str, parent: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_expansion_grid_random_and_dry_run(tmp_path, capsys):
    path = write_sweep(
        tmp_path / "s.yaml",
        name="exp",
        base="synthetic",
        grid={
            "method": [{"name": "joint"}, {"name": "midas", "params": {"lam": 2.0}}],
            "train.seed": [0, 1, 2],
        },
        random={"optimizer.lr": {"loguniform": [0.001, 0.1]}},
        num_samples=2,
        seed=7,
    )
    plan = expand(load_sweep(path))
    assert len(plan.trials) == 12
    lrs = [t.config["optimizer"]["lr"] for t in plan.trials]
    assert all(0.001 <= lr <= 0.1 for lr in lrs) and len(set(lrs)) == 12
    assert [t.config["optimizer"]["lr"] for t in expand(load_sweep(path)).trials] == lrs  # seeded
    assert plan.trials[6].config["method"]["params"]["lam"] == 2.0  # method is the outer grid axis
    assert main(["sweep", str(path), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.strip().endswith("12 trials") and out.count("\nt-") == 12


def test_a_base_axis_sweeps_datasets_each_with_its_own_preset(tmp_path):
    preset = yaml.safe_load((Path(__file__).parents[1] / "harness/presets/synthetic.yaml").read_text())
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**preset, "train": {"epochs": 7}}))
    path = write_sweep(
        tmp_path / "s.yaml",
        name="exp",
        grid={"base": ["synthetic", "avdigits", "mine.yaml"], "train.seed": [0, 1]},
        overrides=["train.batch_size=16"],
    )
    plan = expand(load_sweep(path))
    assert len(plan.trials) == 6
    datasets = [t.config["data"]["name"] for t in plan.trials]
    assert datasets == ["synthetic", "synthetic", "avdigits", "avdigits", "synthetic", "synthetic"]
    # each trial has its preset's own settings (avdigits: 30 epochs, midas70 split), then the overrides
    assert [t.config["train"]["epochs"] for t in plan.trials] == [40, 40, 30, 30, 7, 7]
    assert plan.trials[2].config["data"]["split"] == "midas70"
    assert {t.config["train"]["batch_size"] for t in plan.trials} == {16}
    assert plan.trials[4].assignment["base"].endswith("mine.yaml")  # resolved beside the sweep file


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grid": {"train.epoch": [1, 2]}}, r"trial 0 .*train\.epoch: unknown key"),
        ({"grid": {"train.seed": []}}, "grid axis 'train.seed' is empty"),
        ({"grid": {"method.name": ["joint", "nope"]}}, r"trial 1 .*unknown method 'nope'"),
        ({"grid": {"method.name": ["joint"]}, "gird": {}}, "gird: unknown key"),
        ({"random": {"optimizer.lr": {"uniform": [1, 0.5]}}}, "low must be below high"),
        ({"random": {"optimizer.lr": {"normal": [0, 1]}}}, "normal: unknown key"),
        ({"random": {"base": {"choice": ["synthetic"]}}}, "'base' may be a grid axis only"),
        ({"grid": {"base": ["synthetic", "no-such-preset"]}}, r"trial 1 .*no-such-preset"),
    ],
)
def test_bad_sweep_files_fail_before_any_trial(tmp_path, capsys, fields, message):
    path = write_sweep(tmp_path / "bad.yaml", name="bad", base="synthetic", **fields)
    with pytest.raises(ConfigError, match=message):
        expand(load_sweep(path), str(path))
    assert main(["sweep", str(path), "--dry-run"]) == EXIT_USAGE
    assert "bad.yaml" in capsys.readouterr().err
    assert not (tmp_path / ".midasbench").exists()


def test_lambda_is_chosen_on_validation_not_test():
    runs = pd.DataFrame(
        {
            "params.method.params.lam": ["1.0", "1.0", "5.0", "5.0", "2.0", "2.0"],
            "metrics.best/val_acc": [0.70, 0.72, 0.71, 0.71, 0.70, 0.72],
            "metrics.test/acc": [0.60, 0.60, 0.90, 0.90, 0.50, 0.50],
        }
    )
    chosen, table = choose_lambda(runs)
    assert chosen == 1.0  # val means tie at 0.71 for λ = 1, 2 and 5: the smaller λ; test (λ=5 best) ignored
    assert table["n"].tolist() == [2, 2, 2]
    assert table.set_index("lam").loc[5.0, "test_mean"] == pytest.approx(0.9)


@pytest.mark.ray
def test_two_methods_two_seeds_give_four_child_runs_under_one_parent(
    ray_session, tmp_path, data_root, tiny_options, mlflow_uri
):
    path = write_sweep(
        tmp_path / "s.yaml",
        name="grid4",
        base="synthetic",
        overrides=tiny_overrides(data_root, tiny_options),
        grid={
            "method": [{"name": "joint"}, {"name": "midas", "params": {"warmup_epochs": 1}}],
            "train.seed": [0, 1],
        },
        storage=str(tmp_path / "store"),
    )
    outcome = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, echo=False)
    assert (outcome.trials, outcome.ran, outcome.failed) == (4, 4, [])
    runs = children(mlflow_uri, "grid4", outcome.parent_run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags[TRIAL_TAG] for r in runs}) == 4
    assert all("test/acc" in r.data.metrics and r.data.tags.get("ray.node_id") for r in runs)
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert "sweep.yaml" in {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    # a finished sweep is not silently re-run
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, echo=False)
    again = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, resume=True, echo=False)
    assert (again.ran, again.skipped) == (0, 4)
    # a sweep file that grows (one more seed) resumes into the same parent and runs only the new trials
    grown = yaml.safe_load(path.read_text())
    grown["grid"]["train.seed"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(grown))
    more = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, resume=True, echo=False)
    assert (more.ran, more.skipped, more.parent_run_id) == (2, 4, outcome.parent_run_id)
    assert len(children(mlflow_uri, "grid4", outcome.parent_run_id)) == 6
    # --resume from another folder (the sweep's local state gone): the tracking store knows its parent
    shutil.rmtree(tmp_path / "store")
    elsewhere = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, resume=True, echo=False)
    assert (elsewhere.ran, elsewhere.skipped, elsewhere.parent_run_id) == (0, 6, outcome.parent_run_id)


@pytest.mark.ray
def test_a_killed_trial_is_retried_from_its_checkpoint_with_the_same_metrics(
    ray_session, tmp_path, data_root, tiny_options, mlflow_uri
):
    common = {
        "base": "synthetic",
        "overrides": [
            *tiny_overrides(data_root, tiny_options),
            "train.epochs=4",
            "model.default_encoder.params.dropout=0.2",
        ],
        "grid": {"train.seed": [3]},
    }
    calm = run_sweep(
        expand(
            load_sweep(
                write_sweep(tmp_path / "calm.yaml", name="calm", storage=str(tmp_path / "calm"), **common)
            )
        ),
        tracking_uri=mlflow_uri,
        echo=False,
    )
    chaos_spec = load_sweep(
        write_sweep(
            tmp_path / "chaos.yaml", name="chaos", storage=str(tmp_path / "chaos"), max_failures=1, **common
        )
    )
    plan = expand(chaos_spec)
    store = tmp_path / "chaos" / "chaos"
    store.mkdir(parents=True)
    (store / CHAOS_FILE).write_text(json.dumps({"trial": plan.trials[0].key, "epoch": 1}))
    outcome = run_sweep(plan, tracking_uri=mlflow_uri, echo=False)
    assert outcome.failed == [] and not (store / CHAOS_FILE).exists()  # the worker did die once
    (calm_run,) = children(mlflow_uri, "calm", calm.parent_run_id)
    (chaos_run,) = children(mlflow_uri, "chaos", outcome.parent_run_id)  # still exactly one run
    assert chaos_run.info.status == "FINISHED" and chaos_run.data.tags.get("midasbench.resumed") == "true"
    for key in ("test/acc", "test/macro_f1", "test/loss", "best_epoch"):
        assert chaos_run.data.metrics[key] == calm_run.data.metrics[key], key


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_resumes_with_no_duplicate_or_missing_runs(tmp_path, data_root, tiny_options):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_sweep(
        tmp_path / "s.yaml",
        name="resumable",
        base="synthetic",
        overrides=[*tiny_overrides(data_root, tiny_options), "train.epochs=25"],
        grid={"train.seed": [0, 1, 2, 3]},
        storage=str(tmp_path / "store"),
        resources={"cpus_per_trial": 2},  # one trial at a time: the kill lands between trials
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "midasbench.harness.cli", "sweep", str(path), "--tracking-uri", uri]
    driver = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    parent = None
    while time.time() < deadline:
        time.sleep(0.25)  # trials take seconds: kill soon after the first finishes
        state = tmp_path / "store" / "resumable" / "sweep_state.json"
        if parent is None and state.is_file():
            parent = json.loads(state.read_text())["parent_run_id"]
        if parent and sum(r.info.status == "FINISHED" for r in children(uri, "resumable", parent)) >= 1:
            break
    assert parent is not None, "the sweep never started"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
    driver.wait()
    finished_before = sum(r.info.status == "FINISHED" for r in children(uri, "resumable", parent))
    assert 1 <= finished_before < 4
    done = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{finished_before} already done" in done.stdout
    runs = children(uri, "resumable", parent)
    keys = [r.data.tags[TRIAL_TAG] for r in runs]
    assert len(runs) == 4 and len(set(keys)) == 4  # one run per trial: none missing, none duplicated
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.ray
def test_tune_lambda_end_to_end(ray_session, tmp_path, data_root, tiny_options, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "tune",
            "lambda",
            "--dataset",
            "synthetic",
            "--lambdas",
            "0.5,4",
            "--seeds",
            "1",
            "--storage",
            str(tmp_path / "store"),
            *tiny_overrides(data_root, tiny_options),
            "method.params.warmup_epochs=1",
        ]
    )
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "chosen on validation accuracy: λ =" in out and "| 0.5" in out and "| 4" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("lambda-synthetic-midas").experiment_id],
        "tags.`midasbench.sweep_parent` = 'true'",
    )
    assert parent.data.tags["lambda.chosen"] in {"0.5", "4"}


@pytest.mark.ray
def test_a_multi_worker_trial_runs_ddp_through_ray_train(
    ray_session, tmp_path, data_root, tiny_options, mlflow_uri
):
    path = write_sweep(
        tmp_path / "ddp.yaml",
        name="ddp",
        base="synthetic",
        overrides=tiny_overrides(data_root, tiny_options),
        grid={"train.seed": [0]},
        resources={"workers": 2, "cpus_per_worker": 1},
        storage=str(tmp_path / "store"),
        max_failures=0,
    )
    outcome = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, echo=False)
    assert outcome.failed == []
    (run,) = children(mlflow_uri, "ddp", outcome.parent_run_id)  # rank 0 alone logs: one run
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1, 2]
    assert (tmp_path / "store" / "ddp" / "ray_train").is_dir()  # it went through Ray Train


def test_resources_that_cannot_fit_are_refused():
    from midasbench.harness.sweeps.sweep import SweepSpec, check_fits

    spec = SweepSpec(name="x", resources={"workers": 3, "cpus_per_worker": 1})
    with pytest.raises(ConfigError, match="one trial needs 3 CPU but the Ray cluster has 2"):
        check_fits(spec, {"CPU": 2, "trial_slot": 2})
    with pytest.raises(ConfigError, match="trial_slot"):
        check_fits(SweepSpec(name="x", resources={"workers": 2}), {"CPU": 4})
    # multi-worker trials are capped so that drivers never wait on workers that cannot start
    assert check_fits(SweepSpec(name="x", resources={"workers": 2}), {"CPU": 5, "trial_slot": 5}) == 2
    assert check_fits(SweepSpec(name="x", resources={"gpus_per_trial": 0.25}), {"CPU": 2, "GPU": 1}) is None


@pytest.mark.ray
def test_asha_stops_weak_trials_and_closes_their_runs(
    ray_session, tmp_path, data_root, tiny_options, mlflow_uri
):
    path = write_sweep(
        tmp_path / "asha.yaml",
        name="asha",
        base="synthetic",
        overrides=[*tiny_overrides(data_root, tiny_options), "train.epochs=6"],
        grid={"optimizer.lr": [0.3, 0.1, 0.01, 1.0e-5]},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        storage=str(tmp_path / "store"),
    )
    outcome = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, echo=False)
    runs = children(mlflow_uri, "asha", outcome.parent_run_id)
    assert len(runs) == 4 and outcome.failed == []
    assert all(r.info.status in {"FINISHED", "KILLED"} for r in runs)  # nothing left RUNNING
    stopped = [r for r in runs if r.info.status == "KILLED"]
    assert all(r.data.tags.get("midasbench.early_stopped") == "true" for r in stopped)
    assert any(r.info.status == "FINISHED" for r in runs)
    again = run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, resume=True, echo=False)
    assert again.ran == 0  # early-stopped trials count as done


def test_object_store_storage_is_refused_with_a_clear_message(tmp_path):
    path = write_sweep(tmp_path / "s3.yaml", name="s3", base="synthetic", storage="s3://bucket/prefix")
    with pytest.raises(ConfigError, match="give a filesystem path"):
        load_sweep(path)


def test_an_autoscaling_cluster_only_warns_about_missing_resources(capsys):
    from midasbench.harness.sweeps.sweep import SweepSpec, check_fits

    spec = SweepSpec(name="x", resources={"gpus_per_trial": 1}, max_concurrent_trials=3)
    assert check_fits(spec, {"CPU": 8, "trial_slot": 8}, strict=False) == 3
    assert "needs 1 GPU" in capsys.readouterr().out


def test_trials_report_every_epoch_and_workers_get_the_validated_config(tiny_config):
    # issue 13: the worker gets the config as validated in the driver (a RunConfig, not a dict to validate
    # again); every epoch is reported (a scheduler reads them; an orphaned trial's report fails), the last
    # one after the test evaluation
    import pickle

    from midasbench.harness.config import RunConfig
    from midasbench.harness.sweeps.sweep import SweepSpec, _train_reporting, _trial_payload

    cfg = tiny_config()  # 3 epochs
    payload = _trial_payload(cfg, SweepSpec(name="x"), "t-key")
    shipped = pickle.loads(pickle.dumps(payload))["config"]  # what Ray hands the worker
    assert isinstance(shipped, RunConfig) and shipped == cfg
    calls: list[dict] = []
    _train_reporting(shipped, "t-key", calls.append)
    assert [c["epoch"] for c in calls] == [0, 1, 2]
    assert "test/acc" in calls[-1] and not any("test/acc" in c for c in calls[:-1])


def test_a_trial_stopped_at_a_report_ends_its_run_killed_not_failed(tiny_config, mlflow_uri):
    # Ray stops a trial by raising SystemExit in its report; a run that ended FAILED then overruled the
    # sweep's KILLED + early-stopped mark when its last write came after it (the flaky ASHA test)
    from mlflow.tracking import MlflowClient

    from midasbench.harness.sweeps.sweep import _train_reporting

    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={mlflow_uri}", "tracking.experiment=stopped")

    def report(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            raise SystemExit(0)  # as ray.train's session does once the trial's stop event is set

    with pytest.raises(SystemExit) as stopped:
        _train_reporting(cfg, "t-key", report)
    assert stopped.value.code == 0
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]
