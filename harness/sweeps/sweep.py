"""Sweeps: a sweep file → a validated list of trials → Ray Tune (Ray Train per multi-worker trial) → one
MLflow child run per trial under one parent run.

A sweep file names a base config (a preset or a YAML path) with overrides, or a ``base`` grid axis of
several (methods × datasets in one sweep, each dataset with its own preset), and search axes over any
config key: ``grid`` (cartesian product; a value may be a whole section, e.g. ``method: [{name: joint},
{name: midas, params: {lam: 5}}]``) and ``random`` distributions drawn with the sweep's own ``seed``
(``num_samples`` draws per grid point). Trials are expanded and validated here, before Ray starts, so a
bad axis or value fails at once naming the trial and key, and ``--dry-run`` shows exactly what will run.

Execution paths (stack.md §0, §2): a single-worker trial trains inside its Tune trial process (Tune
function trainable; no Ray Train start-up of 10-20 s per trial, and fractional GPUs let several small
trials share one GPU); a trial with ``workers > 1`` starts a Ray Train ``TorchTrainer`` (DDP over gloo or
NCCL) from its Tune trial, whose driver holds only a custom ``trial_slot`` resource so that it never
starves its own workers of CPUs (the nested-trial deadlock measured on 2-CPU machines).

Fault tolerance: every trial checkpoints each epoch into the sweep's storage folder under a key derived
from its config; Tune retries a failed trial (``max_failures``) and the trainer resumes from that
checkpoint, in the same MLflow run. ``--resume`` after the driver died re-runs only the trials whose child
run is not FINISHED. Each trial logs to MLflow itself (rank 0), with explicit run ids, so concurrent trials
never share logging state; the store is created in the driver first (concurrent first-time sqlite schema
creation races, stack.md §3).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from midasbench.harness.config import RunConfig, load_config
from midasbench.harness.errors import ConfigError, RunStopped
from midasbench.harness.params import describe_validation_error
from midasbench.harness.tracking import IDENTITY_TAG

SWEEP_TAG = "midasbench.sweep"
BASE_AXIS = "base"  # a grid axis over base configs (presets): methods × datasets in one sweep
TRIAL_TAG = IDENTITY_TAG
STATE_FILE = "sweep_state.json"
CHAOS_FILE = "chaos.json"
EARLY_STOP_TAG = "midasbench.early_stopped"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Spec):
    """One random axis: exactly one of the keys."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(default=None, description="low inclusive, high exclusive")
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        set_keys = [k for k, v in self.model_dump().items() if v is not None]
        if len(set_keys) != 1:
            raise ValueError(
                f"give exactly one of uniform, loguniform, randint, choice (got {set_keys or 'none'})"
            )
        if self.loguniform is not None and min(self.loguniform) <= 0:
            raise ValueError("loguniform bounds must be > 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        for bounds in (self.uniform, self.loguniform, self.randint):
            if bounds is not None and bounds[0] >= bounds[1]:
                raise ValueError(f"low must be below high, got {list(bounds)}")
        return self

    def sample(self, rng: np.random.Generator) -> Any:
        if self.uniform is not None:
            return float(rng.uniform(*self.uniform))
        if self.loguniform is not None:
            low, high = np.log(self.loguniform)
            return float(np.exp(rng.uniform(low, high)))
        if self.randint is not None:
            return int(rng.integers(*self.randint))
        return self.choice[int(rng.integers(len(self.choice)))]  # type: ignore[index]


class Resources(_Spec):
    """Per-trial resources. ``workers > 1`` runs the trial through Ray Train (DDP)."""

    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0, description="fractions let small trials share a GPU")
    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)


class Scheduler(_Spec):
    name: Literal["fifo", "asha"] = "fifo"
    metric: str = "val/acc"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(default=5, ge=1)
    reduction_factor: float = Field(default=3.0, gt=1)


class SweepSpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = "synthetic"
    overrides: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: dict[str, Distribution] = Field(default_factory=dict)
    num_samples: int = Field(default=1, ge=1)
    seed: int = 0
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=2, ge=0, description="retries of a failed trial, from its checkpoint")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    storage: str | None = Field(
        default=None,
        description="folder for checkpoints and Tune state; on a cluster, mounted at one path on every node",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment; default: the sweep name")

    @model_validator(mode="after")
    def _axes(self) -> SweepSpec:
        if self.storage and "://" in self.storage:
            raise ValueError(
                f"storage {self.storage!r}: give a filesystem path (NFS/EFS mounted at the same place on "
                "every node); trials write their checkpoints with plain file operations, not to object stores"
            )
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid axis {key!r} is empty")
        if BASE_AXIS in self.random:
            raise ValueError(f"{BASE_AXIS!r} may be a grid axis only")
        if not all(isinstance(b, str) for b in self.grid.get(BASE_AXIS, [])):
            raise ValueError(f"grid axis {BASE_AXIS!r} lists presets or config paths (strings)")
        both = sorted(set(self.grid) & set(self.random))
        if both:
            raise ValueError(f"axes {both} are in both grid and random")
        return self


class Trial(BaseModel):
    index: int
    key: str
    assignment: dict[str, Any]
    config: dict[str, Any]


class SweepPlan(BaseModel):
    spec: SweepSpec
    source: str
    trials: list[Trial]

    def table(self) -> str:
        """The trial table that ``--dry-run`` prints."""
        axes = list(self.spec.grid) + list(self.spec.random)
        rows = [["trial", *axes]]
        for trial in self.trials:
            rows.append([trial.key, *[_short(trial.assignment.get(a)) for a in axes]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (name, base, grid, ...)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
    spec.base = _beside(path, spec.base)
    if BASE_AXIS in spec.grid:
        spec.grid[BASE_AXIS] = [_beside(path, b) for b in spec.grid[BASE_AXIS]]
    return spec


def _beside(sweep_file: Path, base: str) -> str:
    """A base config path relative to the sweep file when such a file exists there; else as given
    (a preset name or a path from the working directory)."""
    if not Path(base).is_absolute() and (sweep_file.parent / base).is_file():
        return str(sweep_file.parent / base)
    return base


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def expand(spec: SweepSpec, source: str = "sweep") -> SweepPlan:
    """Every trial of the sweep, each config fully validated; errors name the trial and the key."""
    rng = np.random.default_rng(spec.seed)
    grid_keys = list(spec.grid)
    points = list(itertools.product(*(spec.grid[k] for k in grid_keys))) or [()]
    trials: list[Trial] = []
    for point in points:
        for _ in range(spec.num_samples):
            assignment = dict(zip(grid_keys, point, strict=True))
            assignment.update({k: d.sample(rng) for k, d in spec.random.items()})
            base = assignment.get(BASE_AXIS, spec.base)
            overrides = [
                *spec.overrides,
                *(_override(k, v) for k, v in assignment.items() if k != BASE_AXIS),
            ]
            index = len(trials)
            try:
                cfg = load_config(base, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{source}: trial {index} ({_short(assignment)}): {exc}") from None
            key = f"t-{cfg.fingerprint()}"  # from the config alone: stable when the sweep file grows
            trials.append(Trial(index=index, key=key, assignment=assignment, config=cfg.to_dict()))
    keys = [t.key for t in trials]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{source}: two trials have the same config; remove the duplicate grid values")
    return SweepPlan(spec=spec, source=source, trials=trials)


# ------------------------------------------------------------------------------------------- execution


def storage_root(spec: SweepSpec) -> Path:
    return Path(spec.storage or Path(".midasbench") / "sweeps").expanduser().resolve() / spec.name


def trial_config(
    plan: SweepPlan, trial: Trial, root: Path, uri: str, experiment: str, parent: str
) -> RunConfig:
    """The trial's config as its process runs it: the sweep's checkpoints, tracking store and tags."""
    from midasbench.harness.training.trainer import clone_config

    return clone_config(
        RunConfig.model_validate(trial.config),
        {
            "train.checkpoint_dir": str(root / "checkpoints" / trial.key),
            "train.progress": False,
            "tracking.enabled": True,
            "tracking.uri": uri,
            "tracking.experiment": experiment,
            "tracking.tags": {
                **trial.config["tracking"]["tags"],
                "mlflow.parentRunId": parent,
                SWEEP_TAG: plan.spec.name,
                TRIAL_TAG: trial.key,
            },
        },
    )


def _trial_payload(cfg: RunConfig, spec: SweepSpec, key: str) -> dict:
    """What Tune hands the trial: the config already validated (a ``RunConfig``, pickled as it is, so no
    worker validates it again), the resources and the trial's key."""
    return {"config": cfg, "resources": spec.resources.model_dump(), "key": key}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


def _with_node_tag(config: RunConfig) -> RunConfig:
    """A copy of the trial's (validated) config, tagged with the Ray node that runs it."""
    import ray

    cfg = config.model_copy(deep=True)
    cfg.tracking.tags = {**cfg.tracking.tags, "ray.node_id": ray.get_runtime_context().get_node_id()}
    return cfg


def chaos_callback(checkpoint_dir: str, key: str) -> Any:
    """Fault injection for resilience checks: a file ``<sweep storage>/chaos.json`` holding
    ``{"trial": KEY, "epoch": E}`` kills the process of that trial once, right after epoch E was
    checkpointed (the file is consumed first), as a crashed worker would die."""
    path = Path(checkpoint_dir).parent.parent / CHAOS_FILE

    def callback(epoch: int, metrics: dict[str, float], directory: Path) -> None:
        if not path.is_file():
            return
        try:
            order = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if order.get("trial") == key and order.get("epoch") == epoch:
            try:
                path.unlink()  # claim it: the retried trial must not die again
            except FileNotFoundError:
                return
            os._exit(17)

    return callback


def _train_reporting(cfg: RunConfig, key: str, report: Any) -> None:
    """Train one trial, reporting each epoch's metrics to Ray (a scheduler reads them, and a report to a
    sweep whose driver died fails, so an orphaned trial stops at its next epoch instead of training on
    beside the one a ``--resume`` starts). The last epoch is reported only after the test evaluation and
    MLflow logging are done: a scheduler may stop a trial at any report, and stopping at the final one
    would otherwise cut off the run's test metrics."""
    from midasbench.harness.training.trainer import train

    last = cfg.train.epochs - 1
    final: dict[str, Any] = {}

    def per_epoch(epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        if epoch < last:
            try:
                report({"epoch": epoch, **_numeric(metrics)})
            except SystemExit:  # how Ray tells a trial it was stopped (its scheduler, the sweep's end)
                raise RunStopped from None
        else:
            final.update({"epoch": epoch, **_numeric(metrics)})

    try:
        result = train(cfg, callbacks=[per_epoch, chaos_callback(cfg.train.checkpoint_dir, key)])
    except RunStopped:
        sys.exit(0)  # the run ended KILLED (the sweep tags it if its scheduler stopped it); as Ray expects
    report({**(final or {"epoch": last}), **{f"test/{k}": v for k, v in _numeric(result.test).items()}})


def _train_in_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop (every rank): the unchanged trainer under torch.distributed."""
    import ray.train

    cfg = _with_node_tag(loop_config["config"])
    _train_reporting(cfg, cfg.tracking.tags[TRIAL_TAG], ray.train.report)  # every rank must report


def run_trial(tune_config: dict[str, Any]) -> None:
    """The Tune function trainable: one sweep trial."""
    from ray import tune

    payload = tune_config["trial"]
    resources = Resources.model_validate(payload["resources"])
    if resources.workers == 1:
        _train_reporting(_with_node_tag(payload["config"]), payload["key"], tune.report)
        return

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    root = Path(payload["config"].train.checkpoint_dir).parent.parent
    trainer = TorchTrainer(
        _train_in_worker,
        train_loop_config={"config": payload["config"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"train-{payload['key']}",
            storage_path=str(root / "ray_train"),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def _trial_resources(resources: Resources) -> dict[str, float]:
    if resources.workers == 1:
        out = {"cpu": resources.cpus_per_trial}
        if resources.gpus_per_trial:
            out["gpu"] = resources.gpus_per_trial
        return out
    return {"trial_slot": 1}  # the Train driver: no CPU, so it never starves its own workers


def check_fits(spec: SweepSpec, cluster: dict[str, float], strict: bool = True) -> int | None:
    """Refuse a sweep whose single trial cannot fit the cluster, and cap concurrency so that multi-worker
    trials never hold drivers without workers; returns the max_concurrent_trials to use.

    ``strict=False`` (an existing, possibly autoscaling cluster, whose GPU nodes may not be up yet) only
    warns and leaves concurrency to the sweep file: resources that are missing now may be added."""
    if not strict:
        try:
            return check_fits(spec, cluster, strict=True)
        except ConfigError as exc:
            print(f"warning: {exc}; waiting for the autoscaler to add nodes")
            return spec.max_concurrent_trials
    r = spec.resources
    if r.workers == 1:
        need = {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial}
    else:
        need = {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers * r.gpus_per_worker, "trial_slot": 1}
    for name, amount in need.items():
        if amount > cluster.get(name, 0.0) + 1e-9:
            raise ConfigError(
                f"resources: one trial needs {amount:g} {name} "
                f"but the Ray cluster has {cluster.get(name, 0):g}"
                + (" (start it with a trial_slot resource, see cluster.yaml)" if name == "trial_slot" else "")
            )
    if r.workers == 1:
        return spec.max_concurrent_trials
    fit = int(cluster.get("CPU", 0) // (r.workers * r.cpus_per_worker))
    if r.gpus_per_worker:
        fit = min(fit, int(cluster.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    fit = max(fit, 1)
    return min(fit, spec.max_concurrent_trials) if spec.max_concurrent_trials else fit


def init_ray(address: str | None) -> bool:
    """Connect to a cluster, or start a local instance whose CPUs double as trial slots; True when this
    call did it (the caller then shuts Ray down itself, instead of leaving ~2 s to Ray's exit handler)."""
    import ray

    # Ray Train drains each worker's one-slot report queue on this tick: a report made less than a tick
    # after the previous one waits for it (Ray's default is 2 s).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no boxed experiment banner (stack.md §8.6)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="error")
        return True
    cpus = os.cpu_count() or 1
    ray.init(
        address="local",
        num_cpus=cpus,
        resources={"trial_slot": cpus},
        include_dashboard=False,
        log_to_driver=False,
        logging_level="error",
    )
    return True


class SweepOutcome(BaseModel):
    name: str
    parent_run_id: str
    experiment: str
    tracking_uri: str
    trials: int
    ran: int
    skipped: int
    failed: list[str]
    seconds: float


def _finished_trials(client: Any, experiment_id: str, parent: str) -> dict[str, str]:
    """Trials that need no more work: FINISHED, or stopped early by the scheduler."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
    return {
        r.data.tags.get(TRIAL_TAG, ""): r.info.run_id
        for r in runs
        if r.info.status == "FINISHED" or r.data.tags.get(EARLY_STOP_TAG) == "true"
    }


def _latest_parent(client: Any, experiment_id: str, sweep: str) -> str | None:
    """The most recent parent run of the sweep named ``sweep`` in the experiment, if any (not deleted)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`midasbench.sweep_parent` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _close_early_stopped(
    client: Any, experiment_id: str, parent: str, ended_without_error: list[str]
) -> None:
    """Trials the scheduler stopped end without a Tune error but with an unfinished run (stopped
    mid-training): close those runs as KILLED and tag them, so reports can tell them apart and
    ``--resume`` does not restart them."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
    for run in runs:
        if run.info.status != "FINISHED" and run.data.tags.get(TRIAL_TAG) in ended_without_error:
            client.set_tag(run.info.run_id, EARLY_STOP_TAG, "true")
            client.set_terminated(run.info.run_id, status="KILLED")


def run_sweep(
    plan: SweepPlan,
    *,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    sweep_file_text: str | None = None,
    echo: bool = True,
) -> SweepOutcome:
    """Run (or, with ``resume``, finish) a sweep; returns what ran and what failed.

    Ray starts while the tracking store is opened (a fresh sqlite store's schema alone takes seconds);
    with ``resume``, where there may be nothing left to run, Ray starts only once trials are pending.
    """
    import ray
    from mlflow.tracking import MlflowClient

    from midasbench.harness.tracking import ensure_experiment, resolve_tracking_uri

    start = time.time()
    spec = plan.spec
    root = storage_root(spec)
    uri = resolve_tracking_uri(tracking_uri or plan.trials[0].config["tracking"]["uri"])
    experiment = spec.experiment or spec.name
    _refuse_state_without_resume(spec, resume)  # before Ray starts for nothing
    started_ray = False
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking-store") as pool:
            store = pool.submit(ensure_experiment, uri, experiment)  # once, here, before any trial
            if not resume:
                started_ray = init_ray(address)
            experiment_id = store.result()
        client = MlflowClient(tracking_uri=uri)
        parent = _open_parent(client, plan, experiment_id, experiment, uri, resume, sweep_file_text, echo)
        done = _finished_trials(client, experiment_id, parent)
        pending = [t for t in plan.trials if t.key not in done]
        if echo:
            print(
                f"sweep {spec.name}: {len(plan.trials)} trials, {len(done)} already finished, "
                f"{len(pending)} to run; MLflow parent run {parent} in {uri}"
            )
        failed: list[str] = []
        if pending:
            configs = [trial_config(plan, t, root, uri, experiment, parent) for t in pending]
            _check_trials(plan, pending, configs)
            started_ray = init_ray(address) or started_ray
            stopped = _run_trials(plan, pending, configs, root, address, failed)
            if spec.scheduler.name == "asha":
                _close_early_stopped(client, experiment_id, parent, stopped)
    finally:
        if started_ray:
            ray.shutdown()
    done = _finished_trials(client, experiment_id, parent)
    failed = sorted(
        set(failed) | {t.key for t in plan.trials if t.key not in done and spec.scheduler.name == "fifo"}
    )
    client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
    return SweepOutcome(
        name=spec.name,
        parent_run_id=parent,
        experiment=experiment,
        tracking_uri=uri,
        trials=len(plan.trials),
        ran=len(pending),
        skipped=len(plan.trials) - len(pending),
        failed=failed,
        seconds=time.time() - start,
    )


def _refuse_state_without_resume(spec: SweepSpec, resume: bool) -> None:
    root = storage_root(spec)
    if not resume and (root / STATE_FILE).is_file():
        raise ConfigError(
            f"sweep {spec.name!r} already has state in {root}; add --resume to finish it, "
            "or give the sweep another name"
        )


def _open_parent(
    client: Any,
    plan: SweepPlan,
    experiment_id: str,
    experiment: str,
    uri: str,
    resume: bool,
    sweep_file_text: str | None,
    echo: bool,
) -> str:
    """The sweep's MLflow parent run: the one in the storage folder's state, or with ``--resume`` and no
    state the latest of this sweep in the store, else a new one (the state file written atomically)."""
    spec = plan.spec
    root = storage_root(spec)
    state_path = root / STATE_FILE
    state = {"experiment": experiment, "uri": uri}
    if state_path.is_file():
        _refuse_state_without_resume(spec, resume)
        parent = json.loads(state_path.read_text())["parent_run_id"]
        client.update_run(parent, status="RUNNING")
        return parent
    adopted = _latest_parent(client, experiment_id, spec.name) if resume else None
    if adopted is not None:  # --resume from another folder: the tracking store knows the sweep
        client.update_run(adopted, status="RUNNING")
        root.mkdir(parents=True, exist_ok=True)
        _atomic_write(state_path, json.dumps({"parent_run_id": adopted, **state}))
        if echo:
            print(
                f"sweep {spec.name}: no state in {root}; resuming its latest parent run {adopted} from the "
                "tracking store (unfinished trials restart: their checkpoints are where the sweep first ran)"
            )
        return adopted
    if resume and echo:
        print(f"sweep {spec.name}: --resume found no earlier run of it in {uri}; starting it")
    parent = client.create_run(
        experiment_id, run_name=spec.name, tags={SWEEP_TAG: spec.name, "midasbench.sweep_parent": "true"}
    ).info.run_id
    client.log_text(parent, sweep_file_text or yaml.safe_dump(spec.model_dump(mode="json")), "sweep.yaml")
    client.log_text(parent, plan.table(), "trials.txt")
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(state_path, json.dumps({"parent_run_id": parent, **state}))
    return parent


def _check_trials(plan: SweepPlan, pending: list[Trial], configs: list[RunConfig]) -> None:
    """Build each dataset once, here, before any trial reads it, and refuse a method that cannot run on
    its dataset before any trial starts."""
    from midasbench.datasets import ArrowDataset
    from midasbench.harness.training.trainer import check_method_requirements, dataset_path

    modality_counts: dict[str, int] = {}
    for trial, cfg in zip(pending, configs, strict=True):
        data_key = json.dumps(trial.config["data"], sort_keys=True)
        if data_key not in modality_counts:
            modality_counts[data_key] = len(ArrowDataset(dataset_path(cfg)).manifest.modality_names)
        try:
            check_method_requirements(cfg, modality_counts[data_key])
        except ConfigError as exc:
            raise ConfigError(f"sweep {plan.spec.name}: trial {trial.assignment}: {exc}") from None


def _run_trials(
    plan: SweepPlan,
    pending: list[Trial],
    configs: list[RunConfig],
    root: Path,
    address: str | None,
    failed: list[str],
) -> list[str]:
    """The pending trials through Ray Tune (Ray already up); appends the failed trials' keys to
    ``failed`` and returns the keys of those that stopped (finished or stopped early)."""
    import ray
    from ray import tune

    spec = plan.spec
    max_concurrent = check_fits(spec, ray.cluster_resources(), strict=address is None)
    payloads = [_trial_payload(cfg, spec, t.key) for t, cfg in zip(pending, configs, strict=True)]
    scheduler = None
    if spec.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        epochs = max(cfg.train.epochs for cfg in configs)
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=spec.scheduler.metric,
            mode=spec.scheduler.mode,
            max_t=epochs,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    tuner = tune.Tuner(
        tune.with_resources(run_trial, _trial_resources(spec.resources)),
        param_space={"trial": tune.grid_search(payloads)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent,
            scheduler=scheduler,
            reuse_actors=spec.resources.workers == 1,
            trial_name_creator=lambda trial: trial.config["trial"]["key"],
            trial_dirname_creator=lambda trial: trial.config["trial"]["key"],
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(root),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    stopped = []
    for result in grid:
        key = str(result.config["trial"]["key"])
        (failed if result.error is not None else stopped).append(key)
    return stopped


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
