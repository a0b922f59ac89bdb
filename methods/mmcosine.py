"""``mmcosine``: multimodal cosine loss (Xu, Feng, Zhang, Hu, "MMCosine: multi-modal cosine loss towards
balanced audio-visual fine-grained learning", ICASSP 2023; spec ``../shared/spec/methods-more.md`` §22,
defaults §32; official code [MMC] ``GeWu-Lab/MMCosine_ICASSP23`` ``main_CD.py``).

The logits become a scaled sum of per-modality cosines between each L2-normalised feature and the
L2-normalised class rows of that modality's column block ``W_m`` of the concat head ``W = [W_1 … W_M]``
(§22.1, §22.2, [MMC] ``main_CD.py:113–118``)::

    z_c = s · Σ_m cos(f^m, W_{m,c}),   cos(u, w) = uᵀw / (‖u‖ ‖w‖),   L = mean_i CE(z_i, y_i)

There is no bias: the head's bias ``c`` is ignored in the cosine logits and left out of the optimiser
(frozen at its initial value, as in the official code, where it never receives a gradient; §22.2 "remove
it or freeze it"). The harness' fusion head is not changed. The per-modality logits ``s · cos(f^m, W_m)``
are logged as batch accuracies (``acc_<m>``), not trained separately. Evaluation (§22.6): the cosine
logits (harness default, as BB); ``mmcos_eval = raw_linear`` is the code-faithful switch that evaluates
with the ordinary head output ``W [f^1; …; f^M] + c`` (a rule the training never optimised). A zero
feature gives cosine 0 (normalisation with an epsilon, §22.7), the "ablated" value the modality
diagnostics need. Stateless (§22.9: plain DDP).

Needs the ``concat`` fusion head (LIN, §22.4): its weight is split by columns per modality in the
model's modality order; any other head is refused with a ``ConfigError`` before training.

Parameters (defaults):

* ``scale`` = 10.0: the scaling s, CREMA-D value of the official README (``--scaling 10``); BB uses 15
  [BB ``trainer_config.yaml``]; Kinetics-Sounds has no official value, the same 10 [inferred] (§22.5).
* ``mmcos_eval`` = ``cosine``: the evaluated prediction; ``raw_linear`` is the official code's (§22.6).
* ``eps`` = 1e-12: the norm floor of the L2 normalisation (§22.7).

Departures from the official code:

* Evaluation uses the cosine logits by default (the official validation uses the raw linear head, a
  head it did not train; §22.6); the official behaviour is ``mmcos_eval = raw_linear``.
* The concat head (§32) instead of the README's gated fusion; with gated or FiLM fusion the official
  code feeds the gated features into the cosine (§22.6), which the harness does not offer.
* The optional label-aware cross-modal contrastive term (``λ · NCE``, §22.2) is not implemented; its
  official default is λ = 0 and the harness keeps it off.
* The harness protocol (§1: batch 64, 70 epochs, StepLR(50, 0.1)) replaces the official batch 32,
  200 epochs, StepLR(100, 0.1); model selection is on validation, not test (§22.7).
* Any number of modalities (the official code has two; BB has a 3-block variant, §22.4).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, Requirements, StepOutput, register_method

# --------------------------------------------------------------------------------------- functional core


def cosine_shares(
    fusion: ConcatFusion, features: dict[str, torch.Tensor], scale: float, eps: float = 1e-12
) -> dict[str, torch.Tensor]:
    """s · cos(f^m, W_{m,c}) per modality (§22.2): the column block W_m of the concat head, rows and
    features L2-normalised (norm floor ``eps``: a zero feature gives 0); the bias is not used."""
    weight, shares, start = fusion.linear.weight, {}, 0
    for m in fusion.modalities:
        stop = start + fusion.feature_dims[m]
        block = F.normalize(weight[:, start:stop], dim=1, eps=eps)  # (C, d_m), unit class rows
        shares[m] = scale * F.normalize(features[m], dim=1, eps=eps) @ block.T
        start = stop
    return shares


def cosine_logits(
    fusion: ConcatFusion, features: dict[str, torch.Tensor], scale: float, eps: float = 1e-12
) -> torch.Tensor:
    """z = s · Σ_m cos(f^m, W_m) (§22.2), shape (b, C)."""
    return torch.stack(list(cosine_shares(fusion, features, scale, eps).values())).sum(dim=0)


# --------------------------------------------------------------------------------------------- method


class MMCosineParams(Params):
    scale: float = Field(default=10.0, gt=0, description="scaling s (MMC README --scaling 10; BB: 15)")
    mmcos_eval: Literal["cosine", "raw_linear"] = Field(
        default="cosine", description="evaluated prediction: cosine logits, or the official raw W f + c"
    )
    eps: float = Field(default=1e-12, gt=0, description="norm floor of the L2 normalisation (§22.7)")


def _concat_head(model: MultimodalModel) -> ConcatFusion:
    if not isinstance(model.fusion, ConcatFusion):
        raise ConfigError(
            f"model.fusion.name: method 'mmcosine' needs the concat fusion head (cosines with the column "
            f"blocks of one linear layer, spec §22.4), but the model has {type(model.fusion).__name__}; "
            f"set model.fusion.name=concat"
        )
    return model.fusion


@register_method("mmcosine")
class MMCosine(Method):
    fidelity = "official-code"
    Params = MMCosineParams
    requires = Requirements(decomposable_fusion=True)

    @property
    def label(self) -> str:
        return self.name if self.params.mmcos_eval == "cosine" else f"{self.name}[raw_linear]"

    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        """No modules of its own; refuses a head other than concat before training."""
        _concat_head(model)
        return {}

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders + the concat head's weight; its bias is frozen (no bias, §22.2), unimodal heads unused."""
        bias = _concat_head(model).linear.bias
        for name, p in model.named_parameters():
            if name.startswith(("encoders.", "fusion.")) and p is not bias:
                yield p

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        p = self.params
        features = model.encode(batch.inputs)
        shares = cosine_shares(_concat_head(model), features, p.scale, p.eps)
        logits = torch.stack(list(shares.values())).sum(dim=0)  # §22.2: z = s Σ_m cos
        loss = F.cross_entropy(logits, batch.labels)
        logs = {
            f"acc_{m}": float((s.argmax(dim=1) == batch.labels).float().mean()) for m, s in shares.items()
        }
        return StepOutput(loss=loss, logs={"loss_fused": loss.detach(), **logs})

    def logits_from_features(self, model: MultimodalModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """§22.6: cosine logits (default), or the official code's raw linear head ``W [f] + c``."""
        if self.params.mmcos_eval == "raw_linear":
            return model.fuse(features)
        return cosine_logits(_concat_head(model), features, self.params.scale, self.params.eps)
