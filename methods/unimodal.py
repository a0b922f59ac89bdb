"""``unimodal``: one modality's encoder and a linear head, trained and evaluated alone.

The unimodal baselines of MIDAS Table 1 (e.g. "Audio only", "Visual only"): ``L = CE(g_m(φ_m(x^m)), y)``
for the modality given by ``modality``; the other encoders are neither run nor trained. ``modality`` is a
name (``audio``) or a position in the dataset's modality order (``0``), so that one sweep over datasets
with different modality names can hold "the first modality alone" for each; the label always shows the
name (``unimodal[audio]``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method


class UnimodalParams(Params):
    modality: str | int | None = Field(
        default=None, description="the modality trained: a name, or a position in the dataset's order"
    )


def resolve_modality(given: str | int | None, modalities: tuple[str, ...]) -> str:
    """The modality's name from a name or a 0-based position; a clear error names what is allowed."""
    if isinstance(given, int) and not isinstance(given, bool):
        if 0 <= given < len(modalities):
            return modalities[given]
        raise ConfigError(
            f"method.params.modality: position {given} is out of range; the dataset has "
            f"{len(modalities)} modalities ({', '.join(modalities)}), positions 0-{len(modalities) - 1}"
        )
    if given not in modalities:
        raise ConfigError(
            f"method.params.modality: {given!r} is not a modality of this dataset; "
            f"allowed: {', '.join(modalities)} (or their positions 0-{len(modalities) - 1})"
        )
    return given


@register_method("unimodal")
class Unimodal(Method):
    fidelity = "baseline"
    Params = UnimodalParams

    def __init__(self, params: UnimodalParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.modality: str = resolve_modality(params.modality, context.modalities)

    @property
    def label(self) -> str:
        return f"unimodal[{self.modality}]"

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        yield from model.encoders[self.modality].parameters()
        yield from model.unimodal_heads[self.modality].parameters()

    def eval_modalities(self, model: MultimodalModel) -> list[str]:
        return [self.modality]

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.unimodal_heads[self.modality](features[self.modality])

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs, [self.modality])
        loss = F.cross_entropy(self.logits_from_features(model, features), batch.labels)
        return StepOutput(loss=loss, logs={"loss_unimodal": loss.detach()})
