"""The training loop: one plain PyTorch loop for every method, on CPU or GPU, alone or in Ray Train.

What it guarantees:
* model selection on **validation** accuracy only; the test split is evaluated once, on the best epoch;
* accuracy and macro-F1 over whole splits;
* the same seed gives the same metrics on CPU (seeded init, batch order a function of (seed, epoch));
* an epoch checkpoint (model, optimiser, scheduler, method state, RNG states, history, MLflow run id)
  written atomically after every epoch; rerunning the same config resumes it and ends with the metrics an
  uninterrupted run would have;
* under ``torch.distributed`` (e.g. inside a Ray Train worker) each rank trains on its share of the
  batches, gradients are averaged across ranks, and only rank 0 writes checkpoints and MLflow records.
Methods plug in only through the ``Method`` hooks (``midasbench.methods.base``).
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
import torch.distributed as dist
import torch.nn.functional as F

from midasbench.datasets.builders import resolve_dataset
from midasbench.datasets.format import ArrowDataset, SplitData
from midasbench.datasets.loader import BatchLoader
from midasbench.methods import Method, MethodContext, build_method

from . import checkpoint as ckpt
from .config import RunConfig
from .diagnostics import modality_diagnostics
from .metrics import split_metrics
from .model import MultimodalModel, build_model
from .tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    flatten,
    git_commit,
    package_versions,
    resolve_tracking_uri,
)

EpochCallback = Callable[[int, dict[str, float], Path], None]
LAST = "last.pt"
BEST = "best.pt"


@dataclass
class RunResult:
    method: str
    run_id: str | None
    best_epoch: int
    best_val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.scheduler
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def encode_split(
    model: MultimodalModel,
    split: SplitData,
    modalities: list[str],
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Encoder features of a whole split (float32, on ``device``) and its labels: encoded once, then reused
    by the prediction and by every modality diagnostic (which re-run only the head)."""
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    labels = []
    for batch in BatchLoader(split, batch_size, shuffle=False):
        batch = batch.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            features = model.encode(batch.inputs, modalities)
        for m in modalities:
            chunks[m].append(features[m].float())
        labels.append(batch.labels)
    return {m: torch.cat(c) for m, c in chunks.items()}, torch.cat(labels)


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    method: Method,
    split: SplitData,
    batch_size: int,
    device: torch.device,
    amp: bool,
    diagnostics_seed: int | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1, loss and subset accuracies over the whole split; with ``diagnostics_seed``, also
    the modality diagnostics (``harness/diagnostics.py``) on the same features, for every method."""
    was_training = model.training
    model.eval()
    try:
        modalities = method.eval_modalities(model)
        features, labels = encode_split(model, split, modalities, batch_size, device, amp)

        def head(f: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                return method.logits_from_features(model, f).float()

        logits = (
            torch.cat(
                [
                    head({m: v[s : s + batch_size] for m, v in features.items()})
                    for s in range(0, len(labels), batch_size)
                ]
            )
            if len(labels)
            else torch.zeros(0, 1)
        )
        loss = F.cross_entropy(logits, labels, reduction="mean").item() if len(labels) else float("nan")
        out = split_metrics(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), split.subsets)
        out["loss"] = loss
        if diagnostics_seed is not None and len(modalities) == len(model.modalities) > 1:
            out.update(
                modality_diagnostics(head, features, labels, model.num_classes, diagnostics_seed, batch_size)
            )
        return out
    finally:
        model.train(was_training)


def _all_reduce_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients across ranks in one flat buffer.

    Only parameters that have a gradient take part: every rank runs the same method code on the same
    epoch, so the set is the same on all ranks, and a parameter a step leaves out (e.g. the fusion head
    during MIDAS warm-up) keeps ``grad = None`` and is not touched by the optimiser (no weight decay)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in with_grad:
        n = p.grad.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _all_reduce_sums(seen: int, sums: dict[str, float], device: torch.device) -> tuple[int, dict[str, float]]:
    keys = sorted(sums)  # on the training device: NCCL reduces GPU tensors only
    buffer = torch.tensor([float(seen)] + [sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    return int(buffer[0].item()), {k: float(v) for k, v in zip(keys, buffer[1:].tolist(), strict=True)}


def _progress(setting: bool | str, rank: int, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    enabled = setting is True or (setting == "auto" and sys.stderr.isatty())
    return tqdm(total=total, initial=initial, desc="epochs", disable=not enabled or rank != 0, leave=False)


def default_checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(".midasbench") / "checkpoints" / cfg.fingerprint()


def make_tracker(cfg: RunConfig, rank: int) -> Tracker:
    if not cfg.tracking.enabled or rank != 0:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)


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


def train(
    cfg: RunConfig,
    *,
    callbacks: Sequence[EpochCallback] = (),
    tracker: Tracker | None = None,
) -> RunResult:
    """Train one run as ``cfg`` describes; resume from its epoch checkpoint if one is there."""
    rank, world_size = _dist()
    t = cfg.train
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
    device = _device(t.device)
    amp = t.amp and device.type == "cuda"

    dataset = ArrowDataset(dataset_path(cfg))
    manifest = dataset.manifest
    train_split, val_split, test_split = (dataset.split(s) for s in ("train", "val", "test"))

    ckpt.seed_everything(t.seed)
    model = build_model(cfg.model, manifest).to(device)
    loader = BatchLoader(
        train_split, t.batch_size, shuffle=True, seed=t.seed, rank=rank, world_size=world_size
    )
    context = MethodContext(
        modalities=tuple(manifest.modality_names),
        num_classes=manifest.num_classes,
        epochs=t.epochs,
        steps_per_epoch=len(loader),
        seed=t.seed,
    )
    method = build_method(cfg.method.name, cfg.method.params, context)
    params = [p for p in method.trainable_parameters(model) if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)

    checkpoint_dir = Path(t.checkpoint_dir) if t.checkpoint_dir else default_checkpoint_dir(cfg)
    fingerprint = cfg.fingerprint()
    start_epoch, best_epoch, best_val, history, resume_run_id = 0, -1, {"acc": -math.inf}, [], None
    last_path = checkpoint_dir / LAST
    if t.resume and last_path.is_file():
        state = ckpt.load(last_path)
        if state.get("fingerprint") == fingerprint and not state.get("completed"):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            method.load_state_dict(state["method"])
            ckpt.set_rng_state(state["rng"])
            start_epoch = state["epoch"] + 1
            best_epoch, best_val, history = state["best_epoch"], state["best_val"], state["history"]
            resume_run_id = state.get("run_id")

    tracker = tracker or make_tracker(cfg, rank)
    tags = {
        "midasbench.git_commit": git_commit(),
        "dataset.name": manifest.name,
        "dataset.version": manifest.version,
        "dataset.content_sha256": manifest.content_sha256,
        "split.protocol": manifest.split_protocol,
        "split.seed": str(manifest.split_seed),
        **{f"split.{s}.ids_sha256": info.ids_sha256 for s, info in manifest.splits.items()},
        "method.name": method.name,
        "method.label": method.label,
        "method.fidelity": method.fidelity,
        "seed": str(t.seed),
        "config.fingerprint": fingerprint,
        **{f"version.{k}": v for k, v in package_versions().items()},
        **cfg.tracking.tags,
    }
    run_name = cfg.tracking.run_name or f"{manifest.name}-{method.label}-seed{t.seed}"
    tracker.start(run_name, flatten(cfg.to_dict()), tags, resume_run_id)
    if resume_run_id is None:
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.log_text(json.dumps(split_manifest(dataset)), "split_manifest.json")
        tracker.log_text(manifest.model_dump_json(indent=2), "dataset_manifest.json")

    diagnostics_seed = t.diagnostics_seed if t.diagnostics else None
    status = "FAILED"
    progress = _progress(t.progress, rank, t.epochs, start_epoch)
    try:
        model.train()
        for epoch in range(start_epoch, t.epochs):
            loader.set_epoch(epoch)
            method.on_epoch_start(model, epoch)
            sums: dict[str, float] = {}
            seen = 0
            for batch in loader.batches(method.epoch_order(epoch, loader.order())):
                batch = batch.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    out = method.training_step(model, batch, epoch)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if world_size > 1:
                    _all_reduce_gradients(params, world_size)
                method.after_backward(model, epoch)
                if t.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                optimizer.step()
                method.after_optimizer_step(model, epoch)
                n = len(batch)
                seen += n
                for key, value in {"loss": out.loss.item(), **out.logs}.items():
                    sums[key] = sums.get(key, 0.0) + value * n
            if world_size > 1:  # report the epoch's loss over all ranks' batches
                seen, sums = _all_reduce_sums(seen, sums, device)
            metrics = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            if method.scheduler_should_step(epoch):
                scheduler.step()
            metrics.update({f"method/{k}": v for k, v in method.on_epoch_end(model, epoch).items()})
            val = evaluate(model, method, val_split, t.eval_batch_size, device, amp, diagnostics_seed)
            metrics.update({f"val/{k}": v for k, v in val.items()})
            if not math.isfinite(metrics.get("train/loss", 0.0)):
                raise FloatingPointError(f"training loss is {metrics['train/loss']} at epoch {epoch}")
            if val["acc"] > best_val["acc"]:
                best_epoch, best_val = epoch, val
                if rank == 0:
                    ckpt.atomic_save({"epoch": epoch, "model": model.state_dict()}, checkpoint_dir / BEST)
            metrics["best/val_acc"] = best_val["acc"]
            history.append({"epoch": epoch, **metrics})
            tracker.log_metrics(metrics, step=epoch)
            if rank == 0:
                ckpt.atomic_save(
                    {
                        "fingerprint": fingerprint,
                        "epoch": epoch,
                        "completed": False,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "method": method.state_dict(),
                        "rng": ckpt.rng_state(),
                        "best_epoch": best_epoch,
                        "best_val": best_val,
                        "history": history,
                        "run_id": tracker.run_id,
                    },
                    last_path,
                )
            progress.update(1)
            progress.set_postfix(
                loss=f"{metrics.get('train/loss', float('nan')):.3f}", val_acc=f"{val['acc']:.3f}"
            )
            for callback in callbacks:
                callback(epoch, metrics, checkpoint_dir)

        if world_size > 1:
            dist.barrier()
        best_state = ckpt.load(checkpoint_dir / BEST)["model"] if best_epoch >= 0 else model.state_dict()
        model.load_state_dict(best_state)
        test = evaluate(model, method, test_split, t.eval_batch_size, device, amp, diagnostics_seed)
        final = {f"test/{k}": v for k, v in test.items()}
        final.update({f"best/val_{k}": v for k, v in best_val.items()})
        final["best_epoch"] = best_epoch
        tracker.log_metrics(final, step=max(best_epoch, 0))
        if rank == 0:
            state = ckpt.load(last_path)
            state["completed"] = True
            ckpt.atomic_save(state, last_path)
        status = "FINISHED"
        return RunResult(
            method=method.label,
            run_id=tracker.run_id,
            best_epoch=best_epoch,
            best_val=best_val,
            test=test,
            history=history,
            checkpoint_dir=checkpoint_dir,
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        progress.close()
        tracker.end(status)


def clone_config(cfg: RunConfig, updates: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with ``{"dotted.key": value}`` updates, re-validated (demo, sweeps, tests)."""
    from .config import apply_overrides, build_config

    data = apply_overrides(cfg.to_dict(), [f"{k}={json.dumps(v)}" for k, v in updates.items()])
    return build_config(copy.deepcopy(data))
