"""``lemda``: learning multimodal data augmentation in feature space (Liu, Tang, Shi, Zhang, Li, Shrivastava,
Wilson, ICLR 2023; spec ``../shared/spec/methods.md`` §13, defaults §18).

An augmentation network G, an MLP-VAE owned by the method (``build_modules``) and stepped by its own Adam
(``optimizers``), learns to perturb the concatenated encoder features ``h = [f^1; …; f^M]`` (§13.1):
``G(h) = h + Dec(z)``, ``z = μ(h) + σ(h)·ε``. The encoder goes from ``D = Σ d_m`` to ``z_dim`` in
``n_layer`` equal linear steps, each unit LayerNorm → Linear → ReLU → Dropout(0.5); the decoder mirrors
it; its last linear layer is zero-initialised, so G is the identity at initialisation. Per step (§13.2):

1. ``h_d = sg(h)``; ``ĥ, μ, log σ² = G(h_d)`` (the encoders are trained through ``h`` only);
2. ``L_reg = MSE(ĥ, h_d)``; ``L_KL = −½ Σ (1 + log σ² − μ² − σ²) / (b · z_dim)``;
   ``L_cons = mean_i 1[max_c p_c(h_d,i) > τ_c] · KL(p(ĥ_i) ‖ p(h_d,i))``, ``p = softmax(g_f(·))``, the
   original side under ``no_grad`` (its gradient reaches G and, through ĥ, the fusion head g_f);
3. ``L_task = CE(g_f([h; ĥ']), [y; y])`` where ``ĥ'`` is ĥ behind a gradient-reversal layer scaling its
   gradient by ``−adv_weight``: g_f learns from both halves, G is pushed (weakly) to *raise* the task loss;
4. ``L = L_task + 0.1 L_reg + 0.1 L_KL + 0.01 L_cons``. The main optimiser (encoders + fusion head) steps
   on ``∂L/∂θ_main`` and the augmenter's on ``∂L/∂θ_G`` (``StepOutput.extra_losses["augmenter"] = L``:
   the trainer back-propagates each loss into its own optimiser's parameters).

ĥ is split back into per-modality slices by ``model.feature_dims`` and goes through ``model.fuse``, so any
fusion head that takes per-modality features works. Evaluation: G off, ``g_f(h)`` (the ``Method``
default). Logs: ``loss_task``, ``loss_reg``, ``loss_kl``, ``loss_cons`` (unweighted).

Params (defaults from the official YAML ``fusion_mlp_image_text_tabular.yaml`` / ``adamw.yaml``, §18):
``z_dim`` 8, ``n_layer`` 4, ``dropout`` 0.5, ``regularizer_weight`` 0.1, ``kl_weight`` 0.1,
``adv_weight`` 1e-4, ``consistency`` true, ``consistency_weight`` 0.01, ``consistency_threshold`` 0.5,
``aug_lr`` 1e-4, ``aug_weight_decay`` 1e-5 (augmenter Adam), ``grad_clip`` 1.0 with ``clip_scope``
``augmenter`` (see below), ``output_relu`` false (see below).

Departures from the official code (``lzcemma/LeMDA`` @ 133b9f5, spec §0.1):

* **No ReLU after the zero-initialised last decoder layer** (``output_relu=false``). In the official
  ``VAE`` every decoder unit, the last included, ends in ReLU + Dropout; with the last linear layer's
  weight and bias at zero its pre-activation is exactly 0, and PyTorch's ReLU has zero gradient at 0, so
  no gradient ever reaches the decoder and the official mlp_vae augmenter stays the identity for the whole
  run (``ĥ = h``; only μ / log σ² move, under L_KL). Dropping that one ReLU (LayerNorm → Linear → Dropout)
  keeps ``G = identity`` at init and lets G learn, which is the mechanism the paper describes.
  ``output_relu=true`` restores the official unit (and its frozen augmenter).
* **Gradient clipping**: the official code clips the global norm of *all* parameters (task network and
  augmenter together) to 1.0 before both optimisers step. Here ``clip_scope=augmenter`` (default) clips
  G's gradients alone to ``grad_clip``, so the task network follows the harness protocol (§1: no clip,
  like every other method; ``train.grad_clip`` remains the harness-wide, per-optimiser knob and is applied
  after this one); ``clip_scope=all`` reproduces the official joint clip. ``grad_clip=null`` disables it.
  The clip runs in ``after_backward``, on all-reduced gradients, so every rank clips alike.
* The task network is the harness model on the §1 protocol: raw concatenated encoder features (AutoMM
  first projects every modality to a common width with ``adapt_in_features``), the harness fusion head
  (not AutoMM's fusion MLP), and no per-modality auxiliary losses (AutoMM's ``fusion_mlp.weight 0.1``,
  spec §13 pitfall).
* Hidden widths: ``step = int((D − z_dim) / (n_layer + 1))`` and widths ``D − k·step`` for
  ``k = 1..n_layer``, as the official code, but always ``n_layer`` of them (the official ``range`` drops
  the last one when ``(D − z_dim)`` is a multiple of ``n_layer + 1``, and fails for ``step = 0``; here a
  zero step gives constant widths, and widths are at least 1).
* Only the ``mlp_vae`` architecture (the official YAML default); ``trans_vae`` is not implemented.
* ε of the reparameterisation and G's dropout use the global RNG (per rank, restored on resume with the
  trainer's RNG state): they only shape the local loss before the gradient all-reduce (spec §20.4 R7).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, OptimizerSpec, ParamGroup, StepOutput, register_method

AUGMENTER = "augmenter"  # the method module's name and its optimiser's name

# --------------------------------------------------------------------------------------- functional core


def vae_hidden_dims(input_dim: int, z_dim: int, n_layer: int) -> list[int]:
    """§13.1: ``n_layer`` equal linear steps from ``D`` towards ``z_dim`` (official step rule, always
    ``n_layer`` widths, each ≥ 1)."""
    step = int((input_dim - z_dim) / (n_layer + 1))  # int() truncates toward zero, as the official code
    return [max(input_dim - k * step, 1) for k in range(1, n_layer + 1)]


class Unit(nn.Module):
    """One MLP layer of the official VAE: LayerNorm → Linear → ReLU (optional) → Dropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, relu: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, out_dim)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.fc(self.norm(x))))


class FeatureVAE(nn.Module):
    """G of §13.1: ``G(h) = h + Dec(z)``, ``z = μ + σ·ε``; returns ``(ĥ, μ, log σ²)``.

    The last decoder layer is zero-initialised, so ``G(h) = h`` exactly at initialisation."""

    def __init__(
        self, input_dim: int, z_dim: int, n_layer: int, dropout: float, output_relu: bool = False
    ) -> None:
        super().__init__()
        hidden = vae_hidden_dims(input_dim, z_dim, n_layer)
        widths = [input_dim, *hidden]
        self.encoder = nn.Sequential(*(Unit(i, o, dropout) for i, o in pairwise(widths)))
        self.fc_mu = nn.Linear(widths[-1], z_dim)
        self.fc_logvar = nn.Linear(widths[-1], z_dim)
        back = [*widths, z_dim][::-1]  # z_dim → hidden[-1] → … → D, the mirror of the encoder
        units = [Unit(i, o, dropout) for i, o in pairwise(back[:-1])]
        units.append(Unit(back[-2], back[-1], dropout, relu=output_relu))  # departure: no ReLU by default
        self.decoder = nn.Sequential(*units)
        last = self.decoder[-1].fc
        with torch.no_grad():  # §13.1: zero-initialised last layer → G starts as the identity
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.encoder(h)
        mu, logvar = self.fc_mu(hidden), self.fc_logvar(hidden)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        return h + self.decoder(z), mu, logvar


def kl_term(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """§13.2 step 3: ``KL(q(z|h) ‖ N(0, I)) / (b · z_dim)``, i.e.
    ``−½ Σ (1 + log σ² − μ² − σ²) / (b · z_dim)`` (sum over the batch and the latent dimensions)."""
    b, z_dim = mu.shape
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / (b * z_dim)


def consistency_loss(aug_logits: torch.Tensor, orig_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """§13.2 step 3: ``mean_i 1[max_c q_{i,c} > τ_c] · KL(p_i ‖ q_i)``, ``p = softmax(aug)``,
    ``q = softmax(orig)`` (treated as a constant); masked rows count as 0 in the mean."""
    orig = orig_logits.detach()
    log_p = F.log_softmax(aug_logits, dim=1)
    kl = (log_p.exp() * (log_p - F.log_softmax(orig, dim=1))).sum(dim=1)
    mask = (F.softmax(orig, dim=1).max(dim=1).values > threshold).to(kl.dtype)
    return (kl * mask).mean()


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """§13.2 step 4: ĥ' = ĥ in the forward pass; its gradient is scaled by ``−weight`` on the way back."""
    return _ScaleGradient.apply(x, -weight)


def split_features(h: torch.Tensor, feature_dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """The concatenation ``[f^1; …; f^M]`` back into per-modality slices (modality order of the model)."""
    names = list(feature_dims)
    return dict(zip(names, torch.split(h, [feature_dims[m] for m in names], dim=1), strict=True))


# --------------------------------------------------------------------------------------------- method


class LemdaParams(Params):
    z_dim: int = Field(default=8, ge=1, description="§13.1: latent width of G (official YAML)")
    n_layer: int = Field(default=4, ge=1, description="§13.1: linear steps D → z_dim in G's encoder")
    dropout: float = Field(default=0.5, ge=0, lt=1, description="§13.1: dropout of every G unit")
    regularizer_weight: float = Field(default=0.1, ge=0, description="§13.2: weight of L_reg = MSE(ĥ, h)")
    kl_weight: float = Field(default=0.1, ge=0, description="§13.2: weight of L_KL / (b·z_dim)")
    adv_weight: float = Field(default=1e-4, ge=0, description="§13.2: gradient-reversal scale on ĥ'")
    consistency: bool = Field(default=True, description="§13.2: add the confidence-masked L_cons")
    consistency_weight: float = Field(default=0.01, ge=0, description="§13.2: weight of L_cons")
    consistency_threshold: float = Field(default=0.5, ge=0, le=1, description="§13.2: τ_c of L_cons")
    aug_lr: float = Field(default=1e-4, gt=0, description="§13.2: augmenter Adam lr")
    aug_weight_decay: float = Field(default=1e-5, ge=0, description="§13.2: augmenter Adam weight decay")
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="official clip_grad_norm 1.0 (null: none); scope: clip_scope"
    )
    clip_scope: Literal["augmenter", "all"] = Field(
        default="augmenter", description="augmenter: G alone (default); all: G + task network (official)"
    )
    output_relu: bool = Field(
        default=False, description="official ReLU after G's zero-initialised last layer (freezes G)"
    )


@register_method("lemda")
class Lemda(Method):
    fidelity = "official-code"
    Params = LemdaParams
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # §18: the same values on every dataset

    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        p = self.params
        width = sum(model.feature_dims.values())
        return {AUGMENTER: FeatureVAE(width, p.z_dim, p.n_layer, p.dropout, p.output_relu)}

    def param_groups(self, model: MultimodalModel) -> list[ParamGroup]:
        """Encoders + fusion head in ``main``; G in its own optimiser; the unimodal heads are unused."""
        main = [p for n, p in model.named_parameters() if n.startswith(("encoders.", "fusion."))]
        augmenter = list(model.method_modules[AUGMENTER].parameters())
        return [ParamGroup("model", main), ParamGroup(AUGMENTER, augmenter, optimizer=AUGMENTER)]

    def optimizers(self) -> dict[str, OptimizerSpec]:
        p = self.params
        return {AUGMENTER: OptimizerSpec(name="adam", lr=p.aug_lr, weight_decay=p.aug_weight_decay)}

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        p = self.params
        dims = model.feature_dims
        features = model.encode(batch.inputs)
        h = torch.cat([features[m] for m in dims], dim=1)
        h_d = h.detach()  # §13.2 step 1: G sees sg(h)
        aug, mu, logvar = model.method_modules[AUGMENTER](h_d)
        loss_reg = F.mse_loss(aug, h_d)
        loss_kl = kl_term(mu, logvar)
        loss = p.regularizer_weight * loss_reg + p.kl_weight * loss_kl
        logs = {"loss_reg": loss_reg.detach(), "loss_kl": loss_kl.detach()}
        if p.consistency:
            with torch.no_grad():  # §13.2: the original side is a constant target
                orig_logits = model.fuse(split_features(h_d, dims))
            loss_cons = consistency_loss(
                model.fuse(split_features(aug, dims)), orig_logits, p.consistency_threshold
            )
            loss = loss + p.consistency_weight * loss_cons
            logs["loss_cons"] = loss_cons.detach()
        both = torch.cat([h, reverse_gradient(aug, p.adv_weight)], dim=0)  # §13.2 step 4: [h; ĥ']
        loss_task = F.cross_entropy(model.fuse(split_features(both, dims)), batch.labels.repeat(2))
        loss = loss_task + loss
        logs["loss_task"] = loss_task.detach()
        # one loss, two optimisers: main gets ∂L/∂θ_main, the augmenter ∂L/∂θ_G (§13.2 step 5)
        return StepOutput(loss=loss, logs=logs, extra_losses={AUGMENTER: loss})

    def after_backward(self, model: MultimodalModel, epoch: int) -> None:
        """The official grad-norm clip, on all-reduced gradients (identical on every rank)."""
        p = self.params
        if p.grad_clip is None:
            return
        groups = self.param_groups(model)
        params = [q for g in groups if p.clip_scope == "all" or g.optimizer == AUGMENTER for q in g.params]
        torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], p.grad_clip)
