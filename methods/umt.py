"""``umt``: uni-modal teacher, feature distillation from frozen unimodal encoders (Du, Teng, Li, Liu, Yuan,
Wang, Yuan, Zhao, "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023; arXiv
2305.01233, earlier arXiv 2106.11059 "Improving multi-modal learning with uni-modal teachers"; spec
``../shared/spec/methods-more.md`` §23, defaults §32).

A late-fusion model is trained with its fusion cross-entropy plus a term that pulls each encoder's
features towards those of a separately trained, frozen unimodal teacher of the same modality (§23.1):
``t^m = φ_m^teacher(x^m)`` under no-grad and

    L = CE(g_f([f^1; …; f^M]), y) + λ Σ_m MSE(f^m, t^m),     MSE = mean over batch and feature dims,

one backward (§23.2, BalanceBenchmark's form). The teacher of modality m is the encoder of a ``unimodal``
run of that modality (methods.md §4) at its best-validation epoch, on the same split. Evaluation: the
plain fused logits (the ``Method`` default); the teachers take no part in it.

Teachers are method modules (``model.method_modules["teachers"][m]``, a ``FrozenTeacher``): always in eval
mode (BatchNorm reads and never updates its running statistics, no dropout), ``requires_grad=False`` and
left out of every optimiser, forward under no-grad. Being modules, they are checkpointed with the student
(``last.pt``, ``best.pt``), so a resumed run needs no teacher source again: each teacher's ``loaded``
buffer says its weights are in place. Teachers are loaded at the start of the first epoch
(``on_epoch_start``), identically on every rank (spec §20.4 R8).

Where a teacher comes from (``teachers``: modality name or position → source; the sources and the fit
checks are the harness's, ``harness/training/unimodal_runs.py``, shared with ``model.init_encoders``):

* a checkpoint folder of a ``unimodal`` run, or its ``best.pt``;
* an MLflow run id (``runs:/<id>`` or the bare 32-hex ``<id>``) of such a run, looked up in the store of
  the student's ``tracking.uri``; its checkpoint folder is the run's ``train.checkpoint_dir`` param
  (else the trainer's default ``.midasbench/checkpoints/<config.fingerprint>``, relative to the cwd);
* none: ``missing_teacher=train`` (default) trains it first, in-process, with the harness's own
  ``train()`` on a clone of the student's config (method ``unimodal`` with that modality; the same data,
  split, seed, model, optimiser, schedule and epochs; ``teacher_epochs`` overrides the epochs), with its
  checkpoint under ``<student checkpoint_dir>/teachers/<modality>``. An interrupted teacher resumes from
  there; a finished one (``last.pt`` of the same teacher config marked completed) is reused, because the
  trainer's ``train()`` would otherwise start a completed run over. Under ``torch.distributed`` rank 0
  decides "reuse or train" and broadcasts it, and every rank calls ``train()`` alike (its collectives need
  all of them). With tracking on, the teacher is its own MLflow run, named ``<student run name>-teacher[m]``
  and tagged ``midasbench.teacher_of`` (the student's config fingerprint) and ``midasbench.teacher_modality``;
  a sweep trial's parent, sweep and trial tags are not copied (the sweep would count the teacher as a
  trial), the trial key goes to ``midasbench.teacher_of_trial``. The global RNG state is saved before and
  restored after the teacher's training, so a student run does not depend on whether its teacher was
  trained or reused; a teacher trained so equals, bitwise, the standalone ``unimodal`` run of that config
  (same fingerprint). ``missing_teacher=error`` refuses the config, naming the modality and how to give one.

Checking that a given teacher fits the student (its split must be the student's, or test samples of the
student's split leak into the teacher):

* the encoder's state must load into the student's encoder config for that modality: a ``ConfigError``
  names the file and the missing, unexpected and mis-shaped keys;
* with an MLflow run (given by id, or the run id ``last.pt`` records, found in the student's tracking
  store when tracking is on), its tags must say ``unimodal[<m>]`` and give the student's dataset content
  hash (``dataset.content_sha256``) and train/val/test ids hashes (``split.<s>.ids_sha256``), else a
  ``ConfigError``; a different init ``seed`` is only warned about;
* with a folder alone the check is weaker: the checkpoints hold the config **fingerprint**, not the
  config, the dataset hash or the split ids (``harness/training/checkpoint.py``, ``trainer.py``). A
  fingerprint equal to that of the teacher config this run would train proves the same config (dataset
  name/options, split protocol and seed, modality, init seed; a dataset rebuilt with other content under
  the same name would go unnoticed); any other fingerprint (e.g. a teacher trained for another number of
  epochs) proves nothing, and the run warns that the teacher's split and modality cannot be verified
  (``unverified_teacher=error`` refuses it instead).

Params: ``distill_weight`` (λ = 10, BB's ``scaling``, §23.5/§32), ``teachers`` ({}), ``missing_teacher``
(``train``), ``teacher_epochs`` (None: the student's epochs; the tests' two-rank case sets 1),
``unverified_teacher`` (``warn``). Logs: ``loss_fused``, ``loss_distill`` (λ Σ_m MSE) and ``mse_<m>``.

Departures from the official code (there is none; BB's ``UMT_trainer.py`` is the reference, §23.6):

* Teachers are in ``eval()`` mode: BB never calls ``.eval()``, so its teachers' BatchNorm uses batch
  statistics and keeps updating its running statistics during distillation; BB also wraps them in a
  hard-coded two-GPU DataParallel. Here they are frozen modules, not wrapped (R8).
* The teacher is the best-validation checkpoint of a unimodal run on the student's split (§23.4), trained
  in-process when not given; BB loads the newest ``unimodalTrainer_<modality>`` run, whatever its split.
* MSE on the encoders' pooled output features, no projection [UNVERIFIED whether the paper distils an
  intermediate layer or uses a projection, §23.6]; the student starts from scratch
  (``umt_init_from_teacher = false``, §23.5).
* Teachers run under the encoders' autocast dtype (bf16 on GPU) and their features are cast to float32
  like the student's (``model.encode``).
* Under data parallelism the MSE is each rank's batch mean and the gradients are averaged over ranks:
  the global mean at equal per-rank batches, as for the cross-entropy; the method keeps no state.
* ``teacher_epochs`` lets a teacher train for fewer epochs than the student (a departure from "same
  epochs", meant for tests and quick runs); it is part of the student's parameters and fingerprint.
* The teachers are loaded when the first epoch starts, after the student's MLflow run has started, so a
  bad teacher source ends that run as FAILED; the time spent training teachers in-process is inside it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.format import ArrowDataset, Manifest
from midasbench.datasets.loader import Batch
from midasbench.harness.config import RunConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params
from midasbench.harness.training import checkpoint as ckpt
from midasbench.harness.training.unimodal_runs import (
    UnimodalSource,
    check_fits,
    encoder_state,
    load_encoder,
    modality_of,
    resolve_source,
)

from .base import Method, MethodContext, Requirements, StepOutput, register_method

TEACHER_OF_TAG = "midasbench.teacher_of"  # the student's config fingerprint, on a teacher's MLflow run
TEACHER_MODALITY_TAG = "midasbench.teacher_modality"
TEACHER_OF_TRIAL_TAG = "midasbench.teacher_of_trial"  # the student's sweep trial key, if any
TeacherSource = UnimodalSource  # a teacher: a unimodal run's best checkpoint (training/unimodal_runs.py)

# --------------------------------------------------------------------------------------- functional core


def distillation_loss(
    features: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """§23.2: λ Σ_m MSE(f^m, t^m), each MSE the mean over batch and feature dimensions; also each
    modality's unweighted MSE (for the logs). The targets carry no gradient."""
    per_modality = {m: F.mse_loss(features[m], targets[m].detach()) for m in targets}
    return weight * sum(per_modality.values()), per_modality


class FrozenTeacher(nn.Module):
    """A frozen unimodal encoder: eval mode whatever ``train()`` asks (BatchNorm reads, never updates, its
    running statistics; dropout off), no parameter requires a gradient, forward under no-grad.
    ``loaded`` (a buffer, so the student's checkpoints carry it) says the teacher's weights are in place."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.register_buffer("loaded", torch.tensor(False))
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # the student's model.train() must not switch the teacher

    def forward(self, x: torch.Tensor, *lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(x, *lengths)

    @property
    def takes_lengths(self) -> bool:
        return bool(getattr(self.encoder, "takes_lengths", False))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def teacher_features(
    teachers: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor], autocast_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """§23.2: t^m = φ_m^teacher(x^m), no-grad, in the encoders' autocast dtype, handed back as float32."""
    lengths = getattr(inputs, "lengths", {})
    out = {}
    for m, teacher in teachers.items():
        with _autocast(inputs[m].device, autocast_dtype):
            out[m] = teacher(inputs[m], *([lengths[m]] if m in lengths else [])).float()
    return out


def load_teacher(
    teacher: FrozenTeacher, state: Mapping[str, torch.Tensor], modality: str, source: Path
) -> None:
    """Load a teacher encoder's weights, refusing a state that does not fit the student's encoder config
    for that modality (a ``ConfigError`` naming the file and the mismatched keys)."""
    load_encoder(teacher.encoder, state, modality, source, target="the student")
    teacher.loaded.fill_(True)


# ---------------------------------------------------------------------------------------- teacher sources


def check_source_fits(
    source: TeacherSource,
    modality: str,
    manifest: Manifest | None,
    expected_fingerprint: str | None,
    seed: int | None,
    policy: Literal["warn", "error"],
) -> None:
    """§23.4: the teacher must come from a unimodal run of ``modality`` on the student's split
    (``unimodal_runs.check_fits``: MLflow tags, else the fingerprint of the teacher config this run would
    train; otherwise a warning, or an error by ``unverified_teacher``)."""
    check_fits(
        source,
        modality,
        manifest,
        expected_fingerprint,
        seed,
        policy,
        role="teacher",
        policy_key="method.params.unverified_teacher",
    )


def finished(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` holds a completed run of the config with ``fingerprint`` (reusable as is)."""
    last = folder / ckpt.CheckpointDir.LAST
    if not last.is_file() or not (folder / ckpt.CheckpointDir.BEST).is_file():
        return False
    state = ckpt.load(last)
    return bool(state.get("completed")) and state.get("fingerprint") == fingerprint


def train_in_process(cfg: RunConfig) -> None:
    """The harness's ``train()`` on ``cfg`` in this process (every rank, under torch.distributed), with
    the global RNG state saved before and restored after, so the caller's random stream is unchanged."""
    from midasbench.harness.training.trainer import train

    saved = ckpt.rng_state()
    try:
        train(cfg)
    finally:
        ckpt.set_rng_state(saved)


def teacher_tags(cfg: RunConfig, modality: str) -> dict[str, str]:
    """The student's tags, without a sweep's parent/sweep/trial tags, plus whose teacher this is."""
    from midasbench.harness.sweeps.sweep import SWEEP_TAG
    from midasbench.harness.tracking import IDENTITY_TAG

    student = cfg.tracking.tags
    tags = {k: v for k, v in student.items() if k not in {"mlflow.parentRunId", SWEEP_TAG, IDENTITY_TAG}}
    tags.update({TEACHER_OF_TAG: cfg.fingerprint(), TEACHER_MODALITY_TAG: modality})
    if IDENTITY_TAG in student:
        tags[TEACHER_OF_TRIAL_TAG] = student[IDENTITY_TAG]
    return tags


# --------------------------------------------------------------------------------------------- method


class UMTParams(Params):
    distill_weight: float = Field(
        default=10.0, ge=0, description="§23.2/§32: λ of λ Σ_m MSE(f^m, t^m) (BB's `scaling`)"
    )
    teachers: dict[str | int, str] = Field(
        default={},
        description="§23.4: modality (name or position) -> checkpoint folder or best.pt of a unimodal run, "
        "or an MLflow run id (runs:/<id> or <id>)",
    )
    missing_teacher: Literal["train", "error"] = Field(
        default="train",
        description="a modality without a teacher: train one first, in-process (unimodal on a clone of this "
        "config), or refuse the config",
    )
    teacher_epochs: int | None = Field(
        default=None, ge=1, description="epochs of teachers trained in-process (null: the student's)"
    )
    unverified_teacher: Literal["warn", "error"] = Field(
        default="warn",
        description="a given teacher whose split cannot be verified (a folder of another config, no MLflow "
        "run): warn, or refuse it",
    )


@register_method("umt")
class UMT(Method):
    fidelity = "reconstructed"
    Params = UMTParams
    requires = Requirements(min_modalities=2)
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # §32: λ = 10 on CREMA-D and KS alike

    def __init__(self, params: UMTParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.sources: dict[str, str] = {}
        for key, spec in params.teachers.items():
            m = modality_of(key, context.modalities, "method.params.teachers")
            if m in self.sources:
                raise ConfigError(f"method.params.teachers: two entries for modality {m!r}")
            self.sources[m] = spec
        missing = [m for m in context.modalities if m not in self.sources]
        if missing and params.missing_teacher == "error":
            m = missing[0]
            raise ConfigError(
                f"method.params.teachers: no teacher for modality {m!r} (missing_teacher=error); give one as "
                f"method.params.teachers.{m}=<checkpoint folder or best.pt of a unimodal run, or its MLflow "
                f"run id>, e.g. from `midasbench train <config> method.name=unimodal "
                f"method.params.modality={m}` with this run's data and seed, or set "
                "method.params.missing_teacher=train to train it first"
            )
        self._manifest: Manifest | None = None

    # ---- modules and parameters
    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        """One frozen teacher per modality, shaped like the student's encoder (weights loaded later)."""
        teachers = {m: FrozenTeacher(copy.deepcopy(model.encoders[m])) for m in model.modalities}
        return {"teachers": nn.ModuleDict(teachers)}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders and fusion head; not the teachers (frozen) nor the unimodal heads (unused)."""
        for name, param in model.named_parameters():
            if not name.startswith(("unimodal_heads.", "method_modules.")):
                yield param

    # ---- teachers
    @property
    def manifest(self) -> Manifest | None:
        """The student's dataset manifest (content hash, split ids hashes), None without a run config."""
        if self._manifest is None and self.context.config is not None:
            from midasbench.harness.training.trainer import dataset_path

            self._manifest = ArrowDataset(dataset_path(self.context.config)).manifest
        return self._manifest

    def teacher_config(self, modality: str, folder: Path | None = None) -> RunConfig:
        """The student's config as a ``unimodal`` run of ``modality`` (§23.4: same data, split, seed,
        model, optimiser, epochs), checkpointed in ``folder``, tracked as the student's teacher."""
        from midasbench.harness.training.trainer import clone_config

        cfg = self.context.config
        if cfg is None:
            raise ConfigError(
                f"method.params.missing_teacher=train: training the {modality!r} teacher needs a run (its "
                f"config and checkpoint folder); give method.params.teachers.{modality} instead"
            )
        name = cfg.tracking.run_name or f"{cfg.data.name or 'data'}-{self.label}-seed{cfg.train.seed}"
        updates: dict[str, Any] = {
            "method.name": "unimodal",
            "method.params": {"modality": modality},
            "train.checkpoint_dir": None if folder is None else str(folder),
            "tracking.run_name": f"{name}-teacher[{modality}]",
            "tracking.tags": teacher_tags(cfg, modality),
        }
        if self.params.teacher_epochs is not None:
            updates["train.epochs"] = self.params.teacher_epochs
        return clone_config(cfg, updates)

    def trained_teacher(self, modality: str) -> Path:
        """Train the teacher (or resume it) under ``<checkpoint_dir>/teachers/<modality>``, unless a
        finished one of the same config is there; rank 0 decides, so every rank calls ``train()`` alike."""
        if self.runtime.checkpoint_dir is None:
            raise ConfigError(
                f"method.params.missing_teacher=train: training the {modality!r} teacher needs the run's "
                f"checkpoint folder; give method.params.teachers.{modality} instead"
            )
        folder = Path(self.runtime.checkpoint_dir) / "teachers" / modality
        cfg = self.teacher_config(modality, folder)
        reuse = cfg.train.resume and finished(folder, cfg.fingerprint())
        if not self.runtime.broadcast_object(reuse):
            train_in_process(cfg)
        return folder / ckpt.CheckpointDir.BEST

    def given_teacher(self, modality: str) -> TeacherSource:
        """The ``teachers`` entry's checkpoint, checked against this run (§23.4)."""
        cfg = self.context.config
        where = f"method.params.teachers.{modality}"
        source = resolve_source(self.sources[modality], where, cfg)
        expected = self.teacher_config(modality).fingerprint() if cfg is not None else None
        seed = cfg.train.seed if cfg is not None else None
        check_source_fits(source, modality, self.manifest, expected, seed, self.params.unverified_teacher)
        return source

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        """Load every teacher not loaded yet (a fresh run; a resumed one has them from its checkpoint)."""
        teachers = model.method_modules["teachers"]
        for m in model.modalities:
            if bool(teachers[m].loaded):
                continue
            if m in self.sources:
                source = self.given_teacher(m)
                best, state = source.best, source.state
            else:
                best = self.trained_teacher(m)
                state = ckpt.load(best)
            load_teacher(teachers[m], encoder_state(state["model"], m, best), m, best)

    # ---- the step
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        fused = F.cross_entropy(model.fuse(features), batch.labels)
        targets = teacher_features(model.method_modules["teachers"], batch.inputs, model.autocast_dtype)
        distill, per_modality = distillation_loss(features, targets, self.params.distill_weight)  # §23.2
        logs = {"loss_fused": fused.detach(), "loss_distill": distill.detach()}
        logs.update({f"mse_{m}": v.detach() for m, v in per_modality.items()})
        return StepOutput(loss=fused + distill, logs=logs)
