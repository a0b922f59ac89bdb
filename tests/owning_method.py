"""A method used only by the tests: it owns modules and a second optimiser, so the trainer's support for
both can be checked without a real baseline. Registered with ``METHODS.temporarily`` where needed.

* ``mask``: a C×C layer on the fused logits, in the prediction path (as AMCo's), trained by ``main``;
* ``aux``: a probe on detached features with BatchNorm and dropout, trained by its own Adam (``aux``);
* state: a running accuracy of the fused prediction from all-reduced counts, and a step counter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch, EpochPlan
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params
from midasbench.methods.base import (
    Method,
    OptimizerSpec,
    ParamGroup,
    Requirements,
    StepOutput,
)

NAME = "owning-test"
INSTANCES: list[OwningMethod] = []  # every instance built, so a test can inspect the one a run used
REPEAT_TAG = 1


class OwningParams(Params):
    aux_lr: float = Field(default=0.01, gt=0)


class OwningMethod(Method):
    fidelity = "inferred"
    Params = OwningParams
    requires = Requirements(min_modalities=2, decomposable_fusion=True)

    def __init__(self, params: OwningParams, context: Any) -> None:
        super().__init__(params, context)
        self.running_acc = 0.0
        self.steps = 0
        self.train_modes: list[bool] = []
        self.eval_modes: list[bool] = []
        self.aux_grad_norms: list[float] = []
        self.tagged_rows: list[tuple[int, int]] = []
        INSTANCES.append(self)

    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        c = model.num_classes
        mask = nn.Linear(c, c)
        with torch.no_grad():
            mask.weight.copy_(torch.eye(c))
            mask.bias.zero_()
        width = sum(model.feature_dims.values())
        aux = nn.Sequential(
            nn.Linear(width, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, c)
        )
        return {"mask": mask, "aux": aux}

    def param_groups(self, model: MultimodalModel) -> list[ParamGroup]:
        main = [
            p
            for n, p in model.named_parameters()
            if not n.startswith(("method_modules.aux.", "unimodal_heads."))
        ]
        aux = list(model.method_modules["aux"].parameters())
        return [ParamGroup("model", main), ParamGroup("aux", aux, optimizer="aux")]

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {"aux": OptimizerSpec(name="adam", lr=self.params.aux_lr)}

    def epoch_plan(self, epoch: int, default: EpochPlan) -> EpochPlan:
        """Every second epoch, the first third of the rows once more, tagged: the step count changes."""
        if epoch % 2 == 0:
            return default
        extra = default.rows[: len(default.rows) // 3]
        rows = np.concatenate([default.rows, extra])
        tags = np.concatenate([np.zeros(len(default.rows), np.int64), np.full(len(extra), REPEAT_TAG)])
        return EpochPlan(rows, tags)

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        self.eval_modes.append(model.method_modules["mask"].training)
        return model.method_modules["mask"](model.fuse(features))

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        self.train_modes.append(model.method_modules["mask"].training)
        if batch.tags is not None:
            self.tagged_rows += list(zip(batch.index.tolist(), batch.tags.tolist(), strict=True))
        features = model.encode(batch.inputs)
        shares = model.modality_logits(features)  # needs the decomposable head it declares
        logits = model.method_modules["mask"](sum(shares.values()))
        loss = F.cross_entropy(logits, batch.labels)
        probe = torch.cat([features[m].detach() for m in model.modalities], dim=1)
        aux_loss = F.cross_entropy(model.method_modules["aux"](probe), batch.labels)
        counts = torch.tensor([float((logits.argmax(1) == batch.labels).sum()), float(len(batch))])
        correct, seen = self.runtime.all_reduce_sum(counts).tolist()  # rank-identical state (R1, R6)
        self.running_acc = 0.9 * self.running_acc + 0.1 * correct / seen
        self.steps += 1
        assert self.runtime.param_groups("aux")[0]["lr"] == self.params.aux_lr  # read access to groups
        logs = {"running_acc": self.running_acc}
        if self.runtime.rank == 0:  # a key one rank alone logs: the epoch reduction takes the union
            logs["rank0_only"] = 1.0
        return StepOutput(loss=loss, logs=logs, extra_losses={"aux": aux_loss})

    def after_optimizer_step(self, model: MultimodalModel, epoch: int) -> None:
        grads = [p.grad.norm() for p in model.method_modules["aux"].parameters() if p.grad is not None]
        self.aux_grad_norms.append(float(torch.stack(grads).norm()) if grads else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"running_acc": self.running_acc, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_acc, self.steps = float(state["running_acc"]), int(state["steps"])


OwningMethod.name = NAME
