"""``joint``: plain joint training of all encoders and the fusion head with cross-entropy.

The baseline of MIDAS Table 1 ("Joint training"): ``L = CE(g_f([f^1; …; f^M]), y)``. With
``unimodal_weight > 0`` it adds the mean unimodal-head cross-entropy, the "joint + unimodal CE heads"
control of datasets.md §7.C (which separates the effect of the heads from MIDAS's misaligned samples).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, StepOutput, register_method


class JointParams(Params):
    unimodal_weight: float = Field(default=0.0, ge=0, description="weight of the mean unimodal-head CE")


@register_method("joint")
class Joint(Method):
    fidelity = "baseline"
    Params = JointParams

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        for name, param in model.named_parameters():
            if self.params.unimodal_weight > 0 or not name.startswith("unimodal_heads."):
                yield param

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        fused = F.cross_entropy(model.fuse(features), batch.labels)
        logs = {"loss_fused": fused.detach()}
        loss = fused
        if self.params.unimodal_weight > 0:
            unimodal = [F.cross_entropy(logits, batch.labels) for logits in model.unimodal(features).values()]
            uni = sum(unimodal) / len(unimodal)
            loss = loss + self.params.unimodal_weight * uni
            logs["loss_unimodal"] = uni.detach()
        return StepOutput(loss=loss, logs=logs)
