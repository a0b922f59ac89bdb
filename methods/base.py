"""The method interface: a training method owns its loss, its state, its modules and its hooks into the loop.

Modelled on LibMTL's weighting plug-ins: the trainer knows only this narrow interface, so every method is
one file and no file of the trainer names a method. What a method may declare or override:

* ``requires`` — what it needs of the run (modality count, a decomposable fusion head); a config that
  breaks it is refused before anything runs.
* ``build_modules`` — modules it owns (an augmenter, a mask layer); attached to the model under
  ``model.method_modules`` before the model moves to the device, so they are placed, switched between
  train and eval, all-reduced, clipped and checkpointed (``last.pt`` and ``best.pt``) with it.
* ``param_groups`` / ``optimizers`` — named parameter groups (own lr / weight decay), optionally for a
  second optimiser over its own modules; ``StepOutput.extra_losses`` gives each extra optimiser its loss.
* ``training_step`` — the loss; ``training_steps`` — several optimiser steps per batch (MLA);
  ``after_backward`` — gradients are all-reduced, edit them here; ``after_optimizer_step`` — state updates.
* ``epoch_plan`` — the epoch's rows and per-row tags, global and identical on every rank.
* ``on_epoch_start`` / ``on_epoch_end`` — e.g. a pass over the training set (``runtime.encode_rows``),
  the method's own trainings (``runtime.train_batches``, ``runtime.new_optimizer``), or a phase
  boundary (``runtime.reset_optimizer_state``).
* ``logits_from_features`` / ``eval_modalities`` — the evaluated prediction (the one evaluation path);
  ``coalition_logits`` — the prediction with some modalities left out (zeroed-feature diagnostics).
* ``requires.model_kind`` — a registered model architecture the method needs (Greedy's MMTM).
* ``state_dict`` / ``load_state_dict`` — everything kept across steps, so checkpoints resume it exactly.

Correct under DDP by construction: the trainer all-reduces every gradient before ``after_backward`` and
synchronises BatchNorm statistics; anything else a method derives from its local batch that changes
parameters, gradients or state must go through ``self.runtime``'s collectives (sum numerators and
denominators, or broadcast rank 0's decision). The two-rank test checks replicas stay bitwise equal for
every registered method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.config import RunConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params
from midasbench.harness.registry import Registry
from midasbench.harness.training.runtime import Runtime

Fidelity = Literal["paper", "official-code", "inferred", "reconstructed", "baseline"]
MAIN_OPTIMIZER = "main"


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run when it is built, and the runtime it runs in."""

    modalities: tuple[str, ...]
    num_classes: int
    epochs: int
    steps_per_epoch: int
    seed: int = 0  # the run's init seed, for a method's own random draws
    runtime: Runtime = field(default_factory=Runtime)
    config: RunConfig | None = None  # the validated run config (e.g. to derive a teacher run's config)


@dataclass(frozen=True)
class Requirements:
    """What a method needs of the run; checked against the config and the dataset before training."""

    min_modalities: int = 1
    max_modalities: int | None = None
    decomposable_fusion: bool = False
    model_kind: str | None = None  # a registered model architecture (``model.kind``) the method needs

    def resolve_model_kind(self, method: str, configured: str | None) -> str:
        """The model kind to build: the configured one, else the method's, else late fusion; a
        configured kind the method cannot use is a ``ConfigError`` naming both."""
        from midasbench.harness.models.model import DEFAULT_MODEL_KIND, MODEL_KINDS

        if configured is not None and self.model_kind is not None and configured != self.model_kind:
            raise ConfigError(
                f"model.kind: method {method!r} needs model kind {self.model_kind!r}, but the config "
                f"sets {configured!r}; set model.kind={self.model_kind} or leave it null"
            )
        kind = configured or self.model_kind or DEFAULT_MODEL_KIND
        if kind not in MODEL_KINDS.names():
            raise ConfigError(
                f"model.kind: unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS.names())}"
            )
        return kind

    def check(self, method: str, fusion: str, fusion_decomposable: bool, num_modalities: int | None) -> None:
        """Raise a ``ConfigError`` naming the method, the requirement and the config key it breaks."""
        if self.decomposable_fusion and not fusion_decomposable:
            from midasbench.harness.models.fusion import FUSIONS, fusion_is_decomposable

            allowed = [n for n in FUSIONS.names() if fusion_is_decomposable(n)]
            raise ConfigError(
                f"model.fusion.name: method {method!r} needs a decomposable fusion head (per-modality shares "
                f"of the fused logits), but {fusion!r} is not; use one of: {', '.join(allowed)}"
            )
        if num_modalities is None:
            return
        low, high = self.min_modalities, self.max_modalities
        if num_modalities < low or (high is not None and num_modalities > high):
            wanted = (
                f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low}-{high}"
            )
            raise ConfigError(
                f"data.name: method {method!r} needs {wanted} modalities, "
                f"but the dataset has {num_modalities}"
            )


@dataclass
class ParamGroup:
    """Parameters of one optimiser group; ``lr`` / ``weight_decay`` of None take the optimiser's own."""

    name: str
    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str = MAIN_OPTIMIZER


@dataclass(frozen=True)
class OptimizerSpec:
    """A method's extra optimiser (the ``main`` one is ``optimizer:`` of the config)."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class StepOutput:
    """The loss to back-propagate (main optimiser), one loss per extra optimiser, and scalars to log
    (averaged over the epoch's rows by the trainer): numbers, or detached 0-d tensors left on the device
    (``loss.detach()``, never ``.item()``), which the trainer sums there and reads once per epoch, so a
    step never waits for the device."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(ABC):
    """Base class of every training method. Subclasses set ``name``, ``fidelity``, ``Params``."""

    name: ClassVar[str]
    fidelity: ClassVar[Fidelity]
    Params: ClassVar[type[Params]] = Params
    requires: ClassVar[Requirements] = Requirements()
    # Per-dataset parameter defaults (keyed by ``data.name``), applied under ``method.params`` for this
    # method's runs alone: they live with the method, so adding them changes no other method's trial keys.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, params: Params, context: MethodContext) -> None:
        self.params = params
        self.context = context

    @property
    def runtime(self) -> Runtime:
        return self.context.runtime

    @property
    def label(self) -> str:
        """Name shown in tables; methods with a distinguishing parameter extend it."""
        return self.name

    # ---- what the method owns and what is trained
    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        """Modules the method owns, by name (reach them as ``model.method_modules[name]``)."""
        return {}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Parameters of the main optimiser's single group (all of the model's by default)."""
        return iter(model.parameters())

    def param_groups(self, model: MultimodalModel) -> list[ParamGroup]:
        """Named parameter groups; a group whose ``optimizer`` is not ``main`` needs an entry in
        ``optimizers()``. A parameter may sit in one group only."""
        return [ParamGroup("model", list(self.trainable_parameters(model)))]

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """Extra optimisers by name (stepped, checkpointed and clipped by the trainer)."""
        return {}

    # ---- the evaluated prediction
    def eval_modalities(self, model: MultimodalModel) -> list[str]:
        """Modalities the evaluated prediction reads (all, unless the method uses fewer)."""
        return list(model.modalities)

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The evaluated prediction from encoder features: the fusion head by default. Validation, test
        and the modality diagnostics (zeroed and misaligned features) all go through it."""
        return model.fuse(features)

    def coalition_logits(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], kept: frozenset[str]
    ) -> torch.Tensor:
        """The prediction when only the modalities in ``kept`` take part, for the zeroed-feature
        diagnostics and Shapley values: the others' features are zeroed after the encoder (App. A.4;
        the head's bias remains). A method whose prediction is a gated sum of per-modality logits
        (MLA) drops the modality from the sum instead, where a zero feature would mean nothing."""
        return self.logits_from_features(
            model, {m: (f if m in kept else torch.zeros_like(f)) for m, f in features.items()}
        )

    # ---- the step
    @abstractmethod
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        """Forward pass and loss for one mini-batch (everything before ``loss.backward()``)."""

    def training_steps(self, model: MultimodalModel, batch: Batch, epoch: int) -> Iterable[StepOutput]:
        """The batch's optimiser sub-steps, in order: one ``training_step`` by default. A method that
        takes several steps per batch (MLA's one per modality) yields one ``StepOutput`` per step; the
        trainer runs backward, all-reduce, ``after_backward``, clip and the optimiser step for each
        before asking for the next, so a generator's next forward sees the updated parameters. The
        batch's logged ``loss`` is the sum over sub-steps; other log keys should be distinct per step."""
        yield self.training_step(model, batch, epoch)

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """Gradients are populated and all-reduced across ranks; e.g. gradient modulation goes here
        (coefficients from the runtime's collectives, so every rank edits alike)."""

    def after_optimizer_step(self, model: MultimodalModel, epoch: int) -> None:
        """After the optimisers step; e.g. state updates that must use the pre-step loss."""

    # ---- the epoch
    def epoch_plan(self, epoch: int, default: EpochPlan) -> EpochPlan:
        """The epoch's global rows (and tags), before sharding; re-sampling methods return their own.
        It must be identical on every rank: build it from seeds and rank-identical state only."""
        return default

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        """Called before the first step of every epoch (after ``epoch_plan``)."""

    def on_epoch_end(self, model: MultimodalModel, epoch: int) -> dict[str, float]:
        """Called after the last step of every epoch; returns extra metrics to log."""
        return {}

    def scheduler_should_step(self, epoch: int) -> bool:
        """Whether the lr scheduler steps at the end of ``epoch`` (MIDAS skips warm-up epochs)."""
        return True

    # ---- state that must survive a checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state but the checkpoint has {sorted(state)}")


# ---- small pieces several methods share


def in_window(epoch: int, starts: int, ends: int | None) -> bool:
    """``starts ≤ epoch ≤ ends`` (the official codes' inclusive test); ``ends=None`` runs to the end."""
    return epoch >= starts and (ends is None or epoch <= ends)


def check_window(starts: int, ends: int | None) -> None:
    """A ``modulation_starts`` / ``modulation_ends`` pair's validity (for a Params validator)."""
    if ends is not None and ends < starts:
        raise ValueError("modulation_ends must be ≥ modulation_starts (or null)")


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator seeded identically on every rank from the run seed (spec methods-more §20.4)."""
    return torch.Generator().manual_seed(1_000_003 * seed + salt)


def without_unimodal_heads(model: MultimodalModel) -> Iterator[nn.Parameter]:
    """Every parameter but the model's separate unimodal heads: for methods whose model has none."""
    return (p for name, p in model.named_parameters() if not name.startswith("unimodal_heads."))


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """``@register_method("joint")``; also sets the class's ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def build_method(name: str, params: dict[str, Any] | Params, context: MethodContext) -> Method:
    from midasbench.harness.params import parse_params

    cls = METHODS.get(name)
    return cls(parse_params(cls.Params, params, "method.params"), context)
