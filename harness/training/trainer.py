"""The training loop: one plain PyTorch loop for every method, on CPU or GPU, alone or in Ray Train.

What it guarantees:
* model selection on **validation** accuracy only; the test split is evaluated once, on the best epoch's
  model *and* method state (``best.pt`` holds both, and the method's own modules);
* accuracy and macro-F1 over whole splits;
* the same seed gives the same metrics on CPU (seeded init, an epoch plan that is a function of
  (seed, epoch) and the method's checkpointed state);
* an epoch checkpoint (model with the method's modules, optimisers, scheduler, method state, every rank's
  RNG state, history, MLflow run id) written atomically after every epoch; rerunning the same config
  resumes it and ends with the metrics an uninterrupted run would have;
* under ``torch.distributed`` (e.g. inside a Ray Train worker) each rank trains on its share of the
  epoch plan, and ``distributed.py`` keeps the replicas bitwise identical for every method; only rank 0
  writes checkpoints and MLflow records.
Methods plug in only through the ``Method`` hooks (``midasbench.methods.base``); no line here names one.

A run reads as its steps: ``build`` → ``resume`` → for each epoch ``train_epoch`` → ``validate`` →
``checkpoint`` → ``finish`` (test on the best checkpoint).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midasbench.datasets.builders import resolve_dataset
from midasbench.datasets.device_feed import DeviceFeed
from midasbench.datasets.format import FROZEN_FEATURES_KEY, ArrowDataset, Manifest
from midasbench.datasets.loader import BatchLoader
from midasbench.datasets.transforms import ModalityPipelines
from midasbench.harness.config import RunConfig
from midasbench.harness.errors import RunStopped
from midasbench.harness.models.fusion import fusion_is_decomposable
from midasbench.harness.models.model import MultimodalModel, build_model
from midasbench.harness.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    flatten,
    git_commit,
    package_versions,
    resolve_tracking_uri,
)
from midasbench.harness.training import checkpoint as ckpt
from midasbench.harness.training.distributed import (
    all_reduce_gradients,
    reduce_epoch_logs,
    sync_normalization_stats,
)
from midasbench.harness.training.evaluation import encode_rows, evaluate
from midasbench.harness.training.optim import Optimizers, build_optimizers, build_scheduler, make_optimizer
from midasbench.harness.training.pretrained import check_normalization, check_tokenizers, pretrained_tags
from midasbench.harness.training.runtime import Runtime, distributed_rank_and_size
from midasbench.harness.training.unimodal_runs import init_encoder_sources, load_init_encoders
from midasbench.methods import METHODS, Method, MethodContext, StepOutput, build_method

EpochCallback = Callable[[int, dict[str, float], Path], None]


LogValue = float | torch.Tensor  # a step's logged scalar: a number, or a 0-d tensor still on the device


class EpochLogs:
    """Row-weighted sums of the steps' logged scalars over an epoch. Tensors are summed where they are
    (on the device), so no step waits for the device to hand a number back; ``totals`` reads them all
    with one copy at the end of the epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, LogValue] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, LogValue], rows: int) -> None:
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
            self.sums[key] = self.sums.get(key, 0.0) + value * rows
            self.counts[key] = self.counts.get(key, 0) + rows

    def totals(self) -> tuple[dict[str, float], dict[str, int]]:
        keys = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        values = torch.stack([self.sums[k].reshape(()) for k in keys]).tolist() if keys else []  # type: ignore[union-attr]
        sums = {k: float(v) for k, v in self.sums.items() if not isinstance(v, torch.Tensor)}
        sums.update(zip(keys, values, strict=True))
        return sums, dict(self.counts)


@dataclass
class RunResult:
    method: str
    run_id: str | None
    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None


def _device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dataset_path(cfg: RunConfig) -> Path:
    """The run's dataset directory, built first if it is a registered offline dataset not built yet."""
    d = cfg.data
    return resolve_dataset(
        d.name, path=d.path, root=d.root, split=d.split, split_seed=d.split_seed, options=d.options
    )


def check_method_requirements(cfg: RunConfig, num_modalities: int | None) -> None:
    """Refuse a config whose method needs what the fusion head or the dataset does not give."""
    METHODS.get(cfg.method.name).requires.check(
        cfg.method.name, cfg.model.fusion.name, fusion_is_decomposable(cfg.model.fusion.name), num_modalities
    )


def input_pipelines(cfg: RunConfig, manifest: Manifest) -> ModalityPipelines:
    """The modalities' train and eval transforms (``data.transforms``), checked against the dataset."""
    config = {m: t.model_dump(mode="json") for m, t in cfg.data.transforms.items()}
    return ModalityPipelines(config, manifest.modalities)


def run_feed(cfg: RunConfig, manifest: Manifest, device: torch.device) -> DeviceFeed:
    """How the run's batches reach ``device``: prefetched, copied, transformed."""
    return DeviceFeed(
        device, input_pipelines(cfg, manifest), seed=cfg.train.seed, prefetch=cfg.train.prefetch_batches
    )


def build_run_model(
    cfg: RunConfig, manifest: Manifest, init_sources: dict[str, str] | None = None
) -> tuple[MultimodalModel, dict[str, str]]:
    """The run's model as training starts it: seeded, of the model kind the config or the method asks
    for, sized for what the transforms deliver, with ``model.init_encoders`` loaded (before the method,
    the device and the optimisers see it; a resumed run then overwrites them from last.pt; every rank
    reads the same files, so replicas start equal without a collective). Also the provenance tags of
    the loaded encoders."""
    if init_sources is None:
        init_sources = init_encoder_sources(cfg.model.init_encoders, tuple(manifest.modality_names))
    ckpt.seed_everything(cfg.train.seed)
    kind = METHODS.get(cfg.method.name).requires.resolve_model_kind(cfg.method.name, cfg.model.kind)
    pipelines = input_pipelines(cfg, manifest)
    check_tokenizers(cfg, manifest)
    model = build_model(cfg.model, manifest.model_copy(update={"modalities": pipelines.specs}), kind)
    check_normalization(pipelines, model)
    tags = pretrained_tags(model)  # before init_encoders may replace the weights
    return model, {**tags, **load_init_encoders(model, cfg, manifest, init_sources)}


def _progress(setting: bool | str, rank: int, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    enabled = setting is True or (setting == "auto" and sys.stderr.isatty())
    return tqdm(total=total, initial=initial, desc="epochs", disable=not enabled or rank != 0, leave=False)


def default_checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(".midasbench") / "checkpoints" / cfg.fingerprint()


def make_tracker(
    cfg: RunConfig, rank: int, journal_dir: Path | None = None, fingerprint: str = ""
) -> Tracker:
    """Rank 0's MLflow tracker, journaling into the run's checkpoint folder (``journal_dir``); a resuming
    run adopts the journal an earlier attempt left there."""
    if not cfg.tracking.enabled or rank != 0:
        return NullTracker()
    return MlflowTracker(
        resolve_tracking_uri(cfg.tracking.uri),
        cfg.tracking.experiment,
        journal_dir,
        fingerprint,
        adopt=cfg.train.resume,
        flush_timeout_s=cfg.tracking.flush_timeout_s,
    )


def split_manifest(dataset: ArrowDataset) -> dict[str, Any]:
    """Which samples are in which split (ids and their hashes): logged with every run."""
    m = dataset.manifest
    return {
        "dataset": m.name,
        "dataset_version": m.version,
        "content_sha256": m.content_sha256,
        "split_protocol": m.split_protocol,
        "split_seed": m.split_seed,
        "splits": {
            name: {"rows": info.rows, "ids_sha256": info.ids_sha256, "ids": dataset.split(name).ids.tolist()}
            for name, info in m.splits.items()
        },
    }


@dataclass
class Progress:
    """Where the run is: what ``last.pt`` records besides the modules' states."""

    start_epoch: int = 0
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=lambda: {"acc": -math.inf})
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None


class TrainingRun:
    """One run's objects, built once; each public method is one step of the loop."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.fingerprint = cfg.fingerprint()
        t = cfg.train
        self.checkpoints = ckpt.CheckpointDir(
            Path(t.checkpoint_dir) if t.checkpoint_dir else default_checkpoint_dir(cfg), self.fingerprint
        )
        self.progress = Progress()
        self._build()

    # ------------------------------------------------------------------------------------------ build
    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        rank, world_size = distributed_rank_and_size()
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
        device = _device(t.device)
        amp_dtype = torch.bfloat16 if t.amp and device.type == "cuda" else None

        self.dataset = ArrowDataset(dataset_path(cfg))
        manifest = self.dataset.manifest
        check_method_requirements(cfg, len(manifest.modality_names))
        init_sources = init_encoder_sources(cfg.model.init_encoders, tuple(manifest.modality_names))  # early
        self.train_split, self.val_split, self.test_split = (
            self.dataset.split(s) for s in ("train", "val", "test")
        )
        self.feed = run_feed(cfg, manifest, device)
        self.runtime = Runtime(
            device=device,
            amp_dtype=amp_dtype,
            rank=rank,
            world_size=world_size,
            train_split=self.train_split,
            val_split=self.val_split,
            batch_size=t.batch_size,
            eval_batch_size=t.eval_batch_size,
            encode_fn=lambda model, split, rows, names: encode_rows(
                model, split, rows, names, t.eval_batch_size, self.feed
            ),
            optimizer_factory=lambda groups: make_optimizer(cfg.optimizer, groups),
            checkpoint_dir=self.checkpoints.directory,
            feed=self.feed,
        )

        model, self.init_encoder_tags = build_run_model(cfg, manifest, init_sources)
        self.loader = BatchLoader(
            self.train_split, t.batch_size, shuffle=True, seed=t.seed, rank=rank, world_size=world_size
        )
        context = MethodContext(
            modalities=tuple(manifest.modality_names),
            num_classes=manifest.num_classes,
            epochs=t.epochs,
            steps_per_epoch=len(self.loader),
            seed=t.seed,
            runtime=self.runtime,
            config=cfg,
        )
        self.method: Method = build_method(cfg.method.name, cfg.method.params, context)
        model.attach_method_modules(self.method.build_modules(model))  # before .to() and the optimisers
        model.set_autocast(amp_dtype)
        model.set_statistics_reducer(self.runtime.all_reduce_sum)  # a model kind's running statistics
        self.model: MultimodalModel = model.to(device)
        self.optimizers: Optimizers = build_optimizers(cfg, self.method, self.model)
        self.runtime.optimizers = dict(self.optimizers.by_name)
        self.scheduler = build_scheduler(cfg, self.optimizers.main)
        self.params = self.optimizers.all_params()

    # ----------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue from ``last.pt`` if it belongs to this config and did not finish."""
        if not self.cfg.train.resume:
            return
        state = self.checkpoints.load_last(reconcile=self.runtime.rank == 0)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizers.load_state_dict(state["optimizers"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        ckpt.set_rng_state(ckpt.rank_rng_state(state["rng"], self.runtime.rank))
        self.progress = Progress(
            start_epoch=state["epoch"] + 1,
            best_epoch=state["best_epoch"],
            best_val=state["best_val"],
            history=state["history"],
            run_id=state.get("run_id"),
        )

    # ------------------------------------------------------------------------------------------ epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch over the method's plan; returns the epoch's ``train/*`` and ``lr`` metrics."""
        self.model.train()
        self.loader.set_epoch(epoch)
        plan = self.method.epoch_plan(epoch, self.loader.default_plan())
        self.method.on_epoch_start(self.model, epoch)
        logs = EpochLogs()
        for batch in self.feed.batches(self.loader.plan_batches(plan), epoch=epoch):
            logs.add(self._step(batch, epoch), len(batch))
        sums, counts = reduce_epoch_logs(*logs.totals(), self.runtime)
        metrics = {f"train/{k}": v / max(counts[k], 1) for k, v in sums.items()}
        metrics["lr"] = self.optimizers.main.param_groups[0]["lr"]
        if self.method.scheduler_should_step(epoch):
            self.scheduler.step()
        sync_normalization_stats(self.model, self.runtime)
        metrics.update({f"method/{k}": v for k, v in self.method.on_epoch_end(self.model, epoch).items()})
        return metrics

    def _step(self, batch: Any, epoch: int) -> dict[str, LogValue]:
        """One batch: each of the method's sub-steps (one, unless it alternates) is an optimiser step."""
        logs: dict[str, LogValue] = {}
        loss: LogValue = 0.0
        for out in self.method.training_steps(self.model, batch, epoch):
            sub = self._optimizer_step(out, epoch)
            loss += sub.pop("loss")
            logs.update(sub)
        return {"loss": loss, **logs}

    def _optimizer_step(self, out: StepOutput, epoch: int) -> dict[str, LogValue]:
        self.optimizers.zero_grad()
        extra = list(out.extra_losses.items())
        main_params = self.optimizers.params["main"]
        out.loss.backward(inputs=main_params or None, retain_graph=bool(extra))
        for i, (name, loss) in enumerate(extra):  # each extra optimiser's loss reaches its own parameters
            loss.backward(inputs=self.optimizers.params[name], retain_graph=i < len(extra) - 1)
        all_reduce_gradients(self.params, self.runtime)
        self.method.after_backward(self.model, epoch)
        if self.cfg.train.grad_clip is not None:
            for params in self.optimizers.params.values():
                torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        self.optimizers.step()
        self.method.after_optimizer_step(self.model, epoch)
        logs: dict[str, LogValue] = {"loss": out.loss.detach(), **out.logs}  # stays on the device
        logs.update({f"loss_{name}": loss.detach() for name, loss in extra})
        return logs

    # --------------------------------------------------------------------------------------- evaluate
    def _evaluate(self, split: Any) -> dict[str, float]:
        t = self.cfg.train
        seed = t.diagnostics_seed if t.diagnostics else None
        return evaluate(self.model, self.method, split, t.eval_batch_size, self.feed, seed)

    def validate(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Validation metrics into ``metrics``; True when this epoch is the best so far."""
        val = self._evaluate(self.val_split)
        metrics.update({f"val/{k}": v for k, v in val.items()})
        if not math.isfinite(metrics.get("train/loss", 0.0)):
            raise FloatingPointError(f"training loss is {metrics['train/loss']} at epoch {epoch}")
        improved = val["acc"] > self.progress.best_val["acc"]
        if improved:
            self.progress.best_epoch, self.progress.best_val = epoch, val
        metrics["best/val_acc"] = self.progress.best_val["acc"]
        return improved

    # ------------------------------------------------------------------------------------- checkpoint
    def checkpoint(self, epoch: int, improved: bool, run_id: str | None) -> None:
        """``best.pt`` (when improved) and ``last.pt``, crash-consistent with each other."""
        rng = ckpt.gathered_rng_state(self.runtime)
        if self.runtime.rank == 0:
            self._write_checkpoints(epoch, improved, run_id, rng)
        self.checkpoints.barrier(self.runtime)  # no rank reads (or resumes from) a half-written epoch

    def _write_checkpoints(self, epoch: int, improved: bool, run_id: str | None, rng: list) -> None:
        if improved:
            self.checkpoints.stage_best(
                {"epoch": epoch, "model": self.model.state_dict(), "method": self.method.state_dict()}
            )
        p = self.progress
        self.checkpoints.save_last(
            {
                "epoch": epoch,
                "completed": False,
                "model": self.model.state_dict(),
                "optimizers": self.optimizers.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "method": self.method.state_dict(),
                "rng": rng,
                "best_epoch": p.best_epoch,
                "best_val": p.best_val,
                "history": p.history,
                "run_id": run_id,
            }
        )

    # ----------------------------------------------------------------------------------------- finish
    def test_on_best(self) -> dict[str, float]:
        """Load the best epoch's model and method state, then evaluate the test split once."""
        self.checkpoints.barrier(self.runtime)
        if self.progress.best_epoch >= 0:
            best = self.checkpoints.load_best(self.progress.best_epoch)
            self.model.load_state_dict(best["model"])
            self.method.load_state_dict(best["method"])
        return self._evaluate(self.test_split)

    def run_tags(self) -> dict[str, str]:
        m, t = self.dataset.manifest, self.cfg.train
        return {
            "midasbench.git_commit": git_commit(),
            "dataset.name": m.name,
            "dataset.version": m.version,
            "dataset.content_sha256": m.content_sha256,
            # frozen features (``midasbench data extract``) or inputs trained end to end
            "dataset.track": "frozen-features" if FROZEN_FEATURES_KEY in m.build_options else "end-to-end",
            "split.protocol": m.split_protocol,
            "split.seed": str(m.split_seed),
            **{f"split.{s}.ids_sha256": info.ids_sha256 for s, info in m.splits.items()},
            **{f"split.{s}.rows": str(info.rows) for s, info in m.splits.items()},
            "method.name": self.method.name,
            "method.label": self.method.label,
            "method.fidelity": self.method.fidelity,
            "seed": str(t.seed),
            # ranks and the per-rank batch: a DDP trial's statistics (BatchNorm, per-rank losses) differ
            "train.world_size": str(self.runtime.world_size),
            "train.batch_size_per_rank": str(t.batch_size),
            "config.fingerprint": self.fingerprint,
            # pretrained.<m>.source / .sha256; init_encoders.<m>.source / .checkpoint / .fingerprint / .sha256
            **self.init_encoder_tags,
            **{f"version.{k}": v for k, v in package_versions().items()},
            **self.cfg.tracking.tags,
        }


def _start_tracking(run: TrainingRun, tracker: Tracker) -> None:
    if isinstance(tracker, NullTracker):  # nothing is recorded: skip building the params and tags
        return
    cfg = run.cfg
    run_name = cfg.tracking.run_name or f"{run.dataset.manifest.name}-{run.method.label}-seed{cfg.train.seed}"
    tracker.start(run_name, flatten(cfg.to_dict()), run.run_tags(), run.progress.run_id)
    if run.progress.run_id is None:
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.log_text(json.dumps(split_manifest(run.dataset)), "split_manifest.json")
        tracker.log_text(run.dataset.manifest.model_dump_json(indent=2), "dataset_manifest.json")


def train(
    cfg: RunConfig,
    *,
    callbacks: Sequence[EpochCallback] = (),
    tracker: Tracker | None = None,
) -> RunResult:
    """Train one run as ``cfg`` describes; resume from its epoch checkpoint if one is there."""
    run = TrainingRun(cfg)
    run.resume()
    tracker = tracker or make_tracker(cfg, run.runtime.rank, run.checkpoints.directory, run.fingerprint)
    status = "FAILED"
    bar = _progress(cfg.train.progress, run.runtime.rank, cfg.train.epochs, run.progress.start_epoch)
    try:
        _start_tracking(run, tracker)
        for epoch in range(run.progress.start_epoch, cfg.train.epochs):
            metrics = run.train_epoch(epoch)
            improved = run.validate(epoch, metrics)
            run.progress.history.append({"epoch": epoch, **metrics})
            tracker.log_metrics(metrics, step=epoch)
            run.checkpoint(epoch, improved, tracker.run_id)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics.get('train/loss', float('nan')):.3f}", val_acc=f"{metrics['val/acc']:.3f}"
            )
            for callback in callbacks:
                callback(epoch, metrics, run.checkpoints.directory)

        test = run.test_on_best()
        p = run.progress
        final = {f"test/{k}": v for k, v in test.items()}
        final.update({f"best/val_{k}": v for k, v in p.best_val.items()})
        final["best_epoch"] = p.best_epoch
        tracker.log_metrics(final, step=max(p.best_epoch, 0))
        if run.runtime.rank == 0:
            run.checkpoints.mark_completed()
        status = "FINISHED"
        result = RunResult(
            method=run.method.label,
            run_id=None,  # set below, once the records are stored (the run is created in the background)
            best_epoch=p.best_epoch,
            best_val=p.best_val,
            test=test,
            history=p.history,
            checkpoint_dir=run.checkpoints.directory,
        )
    except (KeyboardInterrupt, RunStopped):
        status = "KILLED"
        raise
    finally:
        bar.close()
        _end_tracking(tracker, status, another_error=status != "FINISHED")
    result.run_id = tracker.run_id
    return result


def _end_tracking(tracker: Tracker, status: str, another_error: bool) -> None:
    """End the run's tracking (a ``TrackingError`` when the store did not take the run's records). While
    ``another_error`` is on its way up, a tracking failure is reported beside it instead of replacing it:
    the first error is the one to fix."""
    try:
        tracker.end(status)
    except Exception as exc:
        if not another_error:
            raise
        print(f"warning: tracking could not end the run after the error below: {exc}", file=sys.stderr)


def clone_config(cfg: RunConfig, updates: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with ``{"dotted.key": value}`` updates, re-validated (demo, sweeps, tests)."""
    from midasbench.harness.config import apply_overrides, build_config

    data = apply_overrides(cfg.to_dict(), [f"{k}={json.dumps(v)}" for k, v in updates.items()])
    return build_config(copy.deepcopy(data))
