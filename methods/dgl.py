"""``dgl``: disentangled gradient learning (Wei, Luo, Luo, "Boosting Multimodal Learning via Disentangled
Gradient Learning", ICCV 2025; spec ``../shared/spec/methods-more.md`` §33 item 1, official code [DGL]
``shicaiwei123/ICCV2025-GDL``).

The encoders are trained **only** by unimodal losses and the fusion head **only** by the multimodal loss
(§33.1). The fused logits read *detached* features, so the multimodal gradient never reaches an encoder;
each modality's unimodal logits reuse the fusion head on the zero-padded concatenation ``g_f([f^m; 0])``
[DGL ``models/fusion_modules.py:45–59``], and the head's share of that gradient is discarded
[DGL ``main_dgl.py:108–122``]. The official two backward passes collapse to the single backward the spec
gives for DDP (§33.1, §20.4 R3)::

    L = CE(g_f(sg(f)), y) + α Σ_m CE(g_f([f^m; 0]; sg(θ_f)), y)

``g_f(·; sg(θ_f))`` is the fusion head run with detached parameters (``torch.func.functional_call``), so
it works for every head: for the concat head it is ``linear([f^m; 0]; sg(W), sg(c)) = sg(W_m) f^m + sg(c)``
(the full bias, as the official zero padding gives). Hence ``∂L/∂θ_f = ∂CE_fused/∂θ_f`` and
``∂L/∂θ_m = α ∂CE(u^m)/∂θ_m`` exactly. After the all-reduce the gradient norm of all trained parameters
(encoders + fusion head) is clipped to 40 [DGL ``main_dgl.py:129``]; the clip sees all-reduced gradients,
so every rank clips alike. Evaluation: the fusion head on all features (the base class rule). Stateless.
The model's separate unimodal heads are not used and not trained.

Parameters (defaults):

* ``alpha`` = 4.0: weight of the unimodal losses, the CREMA-D value [DGL ``cramed_dgl.sh``,
  ``main_dgl.py:41–50``; the script also lists 5]; Kinetics-Sounds has no official value, the same 4.0
  is used [inferred].
* ``grad_clip`` = 40.0: ``clip_grad_norm_`` of every trained parameter [DGL ``main_dgl.py:129``]; null: off.
* ``clip_scope`` = ``all``: ``all`` clips encoders and fusion head together (official: all parameters of
  its model, which are exactly these); ``encoders`` / ``fusion`` clip one part alone (a variant).

Departures from the official code:

* One backward of the combined loss instead of backward(α Σ CE(u^m)) → zero the head's gradient →
  backward(CE_fused): the resulting gradients are identical (the unit test checks them by hand), and
  one backward per forward is what the loop (and DDP, §20.4 R3) expects.
* The harness protocol (§1: SGD lr 1e-3, 70 epochs, StepLR(50, 0.1)) replaces the official lr 2e-3,
  100 epochs, decay at 70; the README warns that the best α depends on the software stack.
* M > 2 modalities (the official code has two): the same rule, one zero-padded unimodal CE per modality.
* Any fusion head is accepted (the zero padding needs no decomposition); the official uses concat.
* The clip runs in ``after_backward`` on all-reduced gradients; ``train.grad_clip`` (harness-wide) still
  applies after it if set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, Requirements, StepOutput, register_method

# --------------------------------------------------------------------------------------- functional core


def padded_logits(fusion: nn.Module, features: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
    """u^m = g_f([f^m; 0]; sg(θ_f)) (§33.1): the fusion head on the features with every other modality
    zeroed, run with detached parameters, so the features keep their gradient and the head gets none."""
    padded = {m: f if m == modality else torch.zeros_like(f) for m, f in features.items()}
    detached = {name: p.detach() for name, p in fusion.named_parameters()}
    return torch.func.functional_call(fusion, detached, (padded,))


def dgl_losses(
    model: MultimodalModel, features: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fused CE on detached features (trains the head only) and each modality's zero-padded CE
    (trains its encoder only), §33.1."""
    fused = F.cross_entropy(model.fuse({m: f.detach() for m, f in features.items()}), labels)
    unimodal = {m: F.cross_entropy(padded_logits(model.fusion, features, m), labels) for m in features}
    return fused, unimodal


# --------------------------------------------------------------------------------------------- method


class DGLParams(Params):
    alpha: float = Field(default=4.0, ge=0, description="weight α of the unimodal CEs (DGL cramed_dgl.sh)")
    grad_clip: float | None = Field(
        default=40.0, gt=0, description="clip_grad_norm_ max norm (DGL main_dgl.py:129); null: no clip"
    )
    clip_scope: Literal["all", "encoders", "fusion"] = Field(
        default="all", description="all: encoders + fusion head together (official); or one part alone"
    )


@register_method("dgl")
class DGL(Method):
    fidelity = "official-code"
    Params = DGLParams
    requires = Requirements(min_modalities=2)

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders + fusion head; the model's separate unimodal heads are not part of DGL."""
        return (p for n, p in model.named_parameters() if n.startswith(("encoders.", "fusion.")))

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        features = model.encode(batch.inputs)
        fused, unimodal = dgl_losses(model, features, batch.labels)
        loss = fused + self.params.alpha * sum(unimodal.values())  # §33.1: the single DDP backward
        logs = {"loss_fused": fused.detach(), **{f"loss_uni_{m}": v.detach() for m, v in unimodal.items()}}
        return StepOutput(loss=loss, logs=logs)

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """The official grad-norm clip at 40 (§33.1), on all-reduced gradients: identical on every rank."""
        p = self.params
        if p.grad_clip is None:
            return
        prefixes = {"all": ("encoders.", "fusion."), "encoders": ("encoders.",), "fusion": ("fusion.",)}
        params = [
            q
            for n, q in model.named_parameters()
            if n.startswith(prefixes[p.clip_scope]) and q.grad is not None
        ]
        if params:
            torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
