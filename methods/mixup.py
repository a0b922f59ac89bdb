"""``mixup``: multimodal Mixup at the embedding level, the baseline of MIDAS §4.4 / Table 3 (spec
``../shared/spec/methods.md`` §11, defaults §18).

Mixup (Zhang, Cisse, Dauphin, Lopez-Paz, ICLR 2018) extended to several modalities as MIDAS §4.4 describes
it: "interpolating each modality's embedding independently and computing the label as a weighted average
of the original labels". Per step one ``λ ~ Beta(α, α)`` and one permutation π of the batch are drawn;
every modality's encoder feature is mixed within its own feature space with the **same λ and the same
π for all modalities**, ``f̄_i^m = λ f_i^m + (1 − λ) f_{π(i)}^m``; the fusion head sees ``[f̄^1; …; f̄^M]``
and the target is the soft label ``λ onehot(y_i) + (1 − λ) onehot(y_{π(i)})``, so the loss is
``λ CE(z̄, y_i) + (1 − λ) CE(z̄, y_{π(i)})``. ``mixup_mode``: ``replace`` (standard Mixup, mixed samples
only, the default) or ``add`` (clean CE plus mixed CE, as MIDAS itself trains on clean and augmented
data). ``per_sample_lambda`` draws one λ per row instead of one per batch. Evaluation: no mixing, the
plain fused logits (the ``Method`` default).

Fidelity ``inferred``: MIDAS released no code for its baselines and §11 names no official code to follow;
the spec's reading is consistent with the MIDAS text and with the original Mixup formulation.

Departures from the official code (there is none; from the paper's text and spec §11):

* Mixing is at the feature (embedding) level only, as MIDAS §4.4 states; there is no input-level option,
  because some datasets' inputs are token ids that cannot be interpolated.
* α = 1.0 (spec §18 [inferred]): MIDAS gives no value.
* "Independently" is read as "each modality within its own feature space, with one shared λ and π"
  (spec §11); with a linear concatenation head this equals mixing the concatenated embedding.
* Random draws come from a method-owned CPU ``torch.Generator`` seeded from ``context.seed`` and kept in
  ``state_dict`` (not the global RNG), so a resumed run draws exactly what an uninterrupted one does.
  Under data parallelism every rank holds the **same** generator (same seed, and every rank draws the
  same number of values per step because the sharded batches have equal sizes), so the method state is
  identical on every rank (spec methods-more.md §20.4 R6); each rank then mixes its own local batch with
  the shared λ and π (R7: the draws only shape the local loss before the gradient all-reduce).
* λ is drawn as a normalised pair of Gamma(α) variates (what Beta(α, α) is), because
  ``torch.distributions`` samplers take no generator.
* The model's unimodal heads are not trained (left out of the optimiser, as in ``joint``): the loss reads
  only the fused logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, StepOutput, register_method, seeded_generator, without_unimodal_heads

# --------------------------------------------------------------------------------------- functional core


def sample_dirichlet(
    concentration: float, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Symmetric Dirichlet(α, …, α) over the last dimension of ``shape`` (float64, CPU), as normalised
    Gamma(α, 1) variates; a row whose Gammas all underflow to 0 becomes uniform."""
    gammas = torch._standard_gamma(torch.full(shape, float(concentration), dtype=torch.float64), generator)
    total = gammas.sum(-1, keepdim=True)
    uniform = torch.full_like(gammas, 1.0 / shape[-1])
    return torch.where(total > 0, gammas / total.clamp_min(torch.finfo(torch.float64).tiny), uniform)


def sample_beta(alpha: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """§11: λ ~ Beta(α, α), the first coordinate of a Dirichlet(α, α) pair (float64, CPU)."""
    return sample_dirichlet(alpha, (*shape, 2), generator)[..., 0]


def draw_mixing(
    batch_size: int, alpha: float, per_sample: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """§11: one permutation π of the batch and λ (a scalar, or one per row with ``per_sample``)."""
    perm = torch.randperm(batch_size, generator=generator)
    lam = sample_beta(alpha, (batch_size,) if per_sample else (), generator)
    return perm, lam.float()


def mix_features(
    features: dict[str, torch.Tensor], perm: torch.Tensor, lam: torch.Tensor
) -> dict[str, torch.Tensor]:
    """§11: f̄_i^m = λ f_i^m + (1 − λ) f_{π(i)}^m, the same λ and π for every modality."""
    out = {}
    for m, f in features.items():
        weight = lam.to(f).reshape(-1, *([1] * (f.dim() - 1))) if lam.dim() else lam.to(f)
        out[m] = weight * f + (1.0 - weight) * f[perm.to(f.device)]
    return out


def mixed_targets(
    labels: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """§11: soft labels λ onehot(y_i) + (1 − λ) onehot(y_{π(i)}), rows summing to one (float32)."""
    onehot = F.one_hot(labels, num_classes).float()
    weight = lam.to(onehot)
    weight = weight[:, None] if weight.dim() else weight
    return weight * onehot + (1.0 - weight) * onehot[perm.to(labels.device)]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CEsoft of spec §0.2, −Σ_c q_c log softmax(z)_c, averaged over rows (fp32)."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


# --------------------------------------------------------------------------------------------- method


class MixupParams(Params):
    alpha: float = Field(default=1.0, gt=0, description="§11/§18: λ ~ Beta(α, α); 1.0 [inferred]")
    mixup_mode: Literal["replace", "add"] = Field(
        default="replace", description="§11: mixed samples only (standard), or clean CE + mixed CE"
    )
    per_sample_lambda: bool = Field(default=False, description="§11: one λ per row instead of per batch")


@register_method("mixup")
class Mixup(Method):
    fidelity = "inferred"
    Params = MixupParams
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # §18: the same α and mode on every dataset

    def __init__(self, params: MixupParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.generator = seeded_generator(context.seed, salt=11)

    def trainable_parameters(self, model: MultimodalModel) -> Iterator[nn.Parameter]:
        """Encoders and fusion head; the unimodal heads take no part in the loss."""
        return without_unimodal_heads(model)

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        p = self.params
        labels = batch.labels
        features = model.encode(batch.inputs)
        perm, lam = draw_mixing(labels.numel(), p.alpha, p.per_sample_lambda, self.generator)
        perm, lam = perm.to(labels.device), lam.to(labels.device)
        mixed_logits = model.fuse(mix_features(features, perm, lam))
        targets = mixed_targets(labels, perm, lam, self.context.num_classes)
        loss_mixed = soft_cross_entropy(mixed_logits, targets)
        logs = {"loss_mixed": loss_mixed.detach(), "lambda": lam.float().mean()}
        loss = loss_mixed
        if p.mixup_mode == "add":
            loss_clean = F.cross_entropy(model.fuse(features).float(), labels)
            loss = loss_clean + loss_mixed
            logs["loss_fused"] = loss_clean.detach()
        return StepOutput(loss=loss, logs=logs)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
