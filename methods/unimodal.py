"""``unimodal``: one modality's encoder and a linear head, trained and evaluated alone.

The unimodal baselines of MIDAS Table 1 (e.g. "Audio only", "Visual only"): ``L = CE(g_m(φ_m(x^m)), y)``
for the modality given by ``modality``; the other encoders are neither run nor trained.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method


class UnimodalParams(Params):
    modality: str | None = None


@register_method("unimodal")
class Unimodal(Method):
    fidelity = "baseline"
    Params = UnimodalParams

    def __init__(self, params: UnimodalParams, context: MethodContext) -> None:
        super().__init__(params, context)
        if params.modality not in context.modalities:
            raise ConfigError(
                f"method.params.modality: {params.modality!r} is not a modality of this dataset; "
                f"allowed: {', '.join(context.modalities)}"
            )
        self.modality: str = params.modality

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
        return StepOutput(loss=loss, logs={"loss_unimodal": loss.item()})
