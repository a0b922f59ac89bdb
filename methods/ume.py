"""``ume``: uni-modal ensemble, the M unimodal models combined at test time (Du, Teng, Li, Liu, Yuan, Wang,
Yuan, Zhao, "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023; arXiv
2305.01233; spec ``../shared/spec/methods-more.md`` §23, defaults §32).

No joint training (§23.1): each modality's branch, its encoder ``φ_m`` and its unimodal head ``g_m``,
is a unimodal model (methods.md §4), and the prediction combines their outputs ``u^m = g_m(φ_m(x^m))``
(§23.2):

    logit_mean (default):  z_UME = (1/M) Σ_m u^m
    prob_mean:             p_UME = (1/M) Σ_m softmax(u^m), returned as the logits
                           log p_UME = logsumexp_m log_softmax(u^m) − log M

(``softmax(log p_UME) = p_UME``, so accuracy, the evaluation loss and the diagnostics read the averaged
probabilities). The M branches are trained side by side in one run with ``L = Σ_m CE(u^m, y)``: their
parameters are disjoint, so each branch's gradient is exactly that of its own unimodal run, and with the
same seed each branch starts from the weights the ``unimodal`` run of that modality would (same model
build) and sees the same batches. The fusion head is not trained and not used. With some modalities left
out (the zeroed-feature diagnostics, ``coalition_logits``) the mean runs over the kept branches only; with
none kept the prediction is uniform (zero logits). Logs: ``loss_<m>`` per branch.

Params: ``ume_combine`` (``logit_mean``, §23.2 [inferred]: logits vs probabilities was not read).

Fidelity ``reconstructed``: no official code; BB ships UMT only (§23). Departures from the paper's
"independently trained unimodal models" (§23.1):

* One run, not M: the branches share the batch order (the independent runs of the harness would too, with
  the same seed) and the global random stream (dropout and augmentation draws interleave across branches,
  so with stochastic encoders they are not those of the separate runs).
* The epoch is selected on the **ensemble's** validation accuracy, one epoch for all branches; separate
  unimodal runs each select their own best epoch. Test runs once on that epoch.
* ``train.grad_clip`` clips the norm over all branches together (separate runs clip each alone).
* Under data parallelism nothing changes: the loss is a per-rank mean and the gradients are averaged, as
  in each unimodal run; the method keeps no state.
* Compute is that of the M unimodal runs (§23.7), in one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, Requirements, StepOutput, register_method

Combine = Literal["logit_mean", "prob_mean"]

# --------------------------------------------------------------------------------------- functional core


def combine_unimodal(logits: Mapping[str, torch.Tensor], mode: Combine) -> torch.Tensor:
    """§23.2: the mean of the unimodal logits, or the log of the mean of their probabilities (computed as
    ``logsumexp_m log_softmax(u^m) − log M``, finite where a probability underflows)."""
    stacked = torch.stack([u.float() for u in logits.values()])  # (M, B, C)
    if mode == "logit_mean":
        return stacked.mean(0)
    return torch.logsumexp(F.log_softmax(stacked, dim=-1), dim=0) - math.log(stacked.shape[0])


# --------------------------------------------------------------------------------------------- method


class UMEParams(Params):
    ume_combine: Combine = Field(
        default="logit_mean",
        description="§23.2: combine the unimodal outputs by their mean logits, or their mean probabilities",
    )


@register_method("ume")
class UME(Method):
    fidelity = "reconstructed"
    Params = UMEParams
    requires = Requirements(min_modalities=2)
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # §32: the same rule on every dataset

    @property
    def label(self) -> str:
        return self.name if self.params.ume_combine == "logit_mean" else f"{self.name}[prob_mean]"

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Every encoder and its unimodal head; the fusion head takes no part."""
        yield from model.encoders.parameters()
        yield from model.unimodal_heads.parameters()

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        losses = {m: F.cross_entropy(u, batch.labels) for m, u in model.unimodal(features).items()}
        loss = torch.stack(
            list(losses.values())
        ).sum()  # Σ_m CE(u^m): each branch gets its own run's gradient
        return StepOutput(loss=loss, logs={f"loss_{m}": v.detach() for m, v in losses.items()})

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return combine_unimodal(model.unimodal(features), self.params.ume_combine)

    def coalition_logits(
        self, model: MultimodalModel, features: dict[str, torch.Tensor], kept: frozenset[str]
    ) -> torch.Tensor:
        """The ensemble of the kept branches only (a zeroed feature would still vote through its head's
        bias); uniform (zero logits) when none is kept."""
        if not kept:
            first = next(iter(features.values()))
            return torch.zeros(first.shape[0], model.num_classes, device=first.device)
        return self.logits_from_features(model, {m: f for m, f in features.items() if m in kept})
