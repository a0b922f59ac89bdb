"""The method interface: a training method owns its loss, its state, and its hooks into the loop.

Modelled on LibMTL's weighting plug-ins: the trainer knows only this narrow interface, so MIDAS,
gradient modulation (``after_backward``), re-sampling (``epoch_order``), warm-up coupling of the scheduler
(``scheduler_should_step``) or a second optimiser (kept in the method's own state) need no special case
in the trainer. Anything a method keeps across steps goes through ``state_dict`` so that checkpoints
resume it exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.model import MultimodalModel
from midasbench.harness.params import Params
from midasbench.harness.registry import Registry

Fidelity = Literal["paper", "official-code", "inferred", "baseline"]


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run when it is built."""

    modalities: tuple[str, ...]
    num_classes: int
    epochs: int
    steps_per_epoch: int
    seed: int = 0  # the run's init seed, for a method's own random draws


@dataclass
class StepOutput:
    """The loss to back-propagate and detached scalars to log (averaged over the epoch by the trainer)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """Base class of every training method. Subclasses set ``name``, ``fidelity``, ``Params``."""

    name: ClassVar[str]
    fidelity: ClassVar[Fidelity]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params, context: MethodContext) -> None:
        self.params = params
        self.context = context

    # ---- what is trained and how it is evaluated
    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Parameters handed to the optimiser (and expected to receive gradients)."""
        return iter(model.parameters())

    def eval_modalities(self, model: MultimodalModel) -> list[str]:
        """Modalities the evaluated prediction reads (all, unless the method uses fewer)."""
        return list(model.modalities)

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The evaluated prediction from encoder features: the fusion head by default. The modality
        diagnostics re-run it on zeroed and misaligned features, so it must depend on features only."""
        return model.fuse(features)

    def eval_logits(self, model: MultimodalModel, batch: Batch) -> torch.Tensor:
        """Logits used for validation and test."""
        return self.logits_from_features(model, model.encode(batch.inputs, self.eval_modalities(model)))

    @property
    def label(self) -> str:
        """Name shown in tables; methods with a distinguishing parameter extend it."""
        return self.name

    # ---- the step
    @abstractmethod
    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        """Forward pass and loss for one mini-batch (everything before ``loss.backward()``)."""

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """Gradients are populated (and all-reduced across ranks); e.g. gradient modulation goes here."""

    def after_optimizer_step(self, model: MultimodalModel, epoch: int) -> None:
        """After ``optimizer.step()``; e.g. state updates that must use the pre-step loss."""

    # ---- the epoch
    def epoch_order(self, epoch: int, default_order: np.ndarray) -> np.ndarray:
        """Row order of the training split for this epoch; re-sampling methods override it."""
        return default_order

    def on_epoch_start(self, model: MultimodalModel, epoch: int) -> None:
        """Called before the first step of every epoch."""

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
