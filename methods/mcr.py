"""``mcr``: Multimodal Competition Regularizer (Kontras, Strypsteen, Chatzichristos, Liang, Blaschko, De Vos,
arXiv 2411.07335, NeurIPS 2025; spec ``../shared/spec/methods.md`` §10, defaults §18).

The fusion is additive and linear: the decomposable head's per-modality shares ``s^m``
(``model.modality_logits``, bias included: "bias everywhere") sum to the fused logits ``z = Σ_m s^m``.
Per step (§10.2):

``L = CE(z, y) + w_u Σ_m CE(u^m, y) + L_MIPD + γ_con L_Con (+ w_ceb L_CEB)``

* ``u^m = g_m(f^m)``: the model's unimodal heads, whose gradients reach the encoders (``shufflegradmulti``).
* ``L_MIPD``: K random permutations π_k of the batch (a method-owned generator). Shuffling modality m in
  a linear head replaces its share by the permuted one, ``s^m_{π(i)}``. Per modality m, with
  ``r^m = Σ_{l≠m} s^l`` the rest:

  * ``own_m    = s^m_{π(i)} + sg(r^m_i)``: gradient only into m's side (M = 2: ``sa_detv``, ``sv_deta``);
  * ``others_m = sg(s^m_{π(i)}) + r^m_i``: gradient only into the others (``sa_deta``, ``sv_detv``);
  * ``full_m   = s^m_{π(i)} + r^m_i``: full gradients (``sa``, ``sv``).

  Each is compared with the unperturbed ``z_i`` (not detached, as the official code):
  ``J = mean over the K·b rows of JSD(softmax(perturbed) ‖ softmax(z))``, natural log. The game
  (``reg_by``): **greedy** ``l Σ_m (−J_own_m + J_others_m)`` (each encoder maximises how much shuffling
  its own modality moves the prediction and minimises the effect of the others), **ind**
  ``l Σ_m (−J_own_m)``, **colab** ``l Σ_m (−J_full_m)``. For M = 2 these are exactly §10.2's
  ``l(−J_sa_detv + J_sa_deta − J_sv_deta + J_sv_detv)``, ``l(−J_sa_detv − J_sv_deta)``, ``l(−J_sa − J_sv)``.
* ``L_Con``: supervised NT-Xent over the M·b features ``[f^1; …; f^M]`` with labels tiled M times
  (``contr_type = label``): cosine similarities over τ; for every ordered pair (i, p), i ≠ p, of equal
  labels, ``−log(e^{s_ip/τ} / (e^{s_ip/τ} + Σ_{n: y_n ≠ y_i} e^{s_in/τ}))``, averaged over all such pairs;
  0 when the batch has no positive pair or no negative (the behaviour of ``pytorch_metric_learning``'s
  ``NTXentLoss`` that the official code calls). It needs equal feature widths: a run whose encoders
  differ in ``out_dim`` is refused with a ``ConfigError`` (set ``contrastive_weight=0``, or give the
  encoders one width); no projection is added, because the official model has none.
* ``L_CEB`` (``ceb_weight > 0``, the official ``--lib``; off by default as in the CREMA-D ResNet recipe):
  ``MSE([f^1; …; f^M], q(sg(z)))`` with ``q`` = Linear(C → d, no bias) → ReLU → Linear(d → Σ d_m, no
  bias), ``d = max_m d_m``, a method-owned module trained with the rest.

Evaluation: ``argmax z``, the fusion head (the ``Method`` default). No state other than the permutation
generator. Logs: ``loss_fused``, ``loss_unimodal``, ``loss_mipd``, ``loss_con`` (``loss_ceb``), and the
per-modality ``jsd_own_<m>`` / ``jsd_others_<m>`` / ``jsd_full_<m>`` the game used.

Params (§18, CREMA-D ResNet recipe of ``run.sh``): ``l`` 0.1, ``num_samples`` (K) 32, ``reg_by`` greedy,
``unimodal_weight`` (w_u, ``--multil``) 0.01, ``contrastive_weight`` (γ_con) 1, ``temperature`` (τ) 0.5,
``ceb_weight`` 0, ``perturb_in_eval_mode`` false (below).

Departures from the official code (``kkontras/MCR`` @ 338d370: ``MCR_Model``, ``Bias_Infusion_MCR``):

* **No unimodal pre-training** of the encoders by default (the CREMA-D recipe's ``--pre``): every method
  of the harness trains from scratch (§10.2 harness row). §10.2's ``mcr_pretrained_encoders`` flag is the
  harness option ``model.init_encoders`` (every method has it), which loads each encoder from a
  ``unimodal`` run (checkpoint folder or MLflow run id) and so reproduces the recipe's ``--pre``.
* ``l`` is used numerically (the standalone ``MCR_Linear`` turns it into a bool, §10.2 pitfall).
* The perturbed logits reuse the step's encoder features. The official ``shuffle_data`` re-encodes the
  batch with the model in eval mode (BatchNorm running statistics, no dropout) for the perturbed
  predictions while the unperturbed ``z`` comes from the train-mode pass; ``perturb_in_eval_mode=true``
  does that (a second encoder pass with the encoders in eval mode, kept in the graph).
* A detached share is detached whole, bias part included (``s^m.detach()``, so the head's weights of the
  detached side get no gradient, as the official ``pred_v.detach()``). The official code adds the shared
  bias *after* detaching, so the bias also collects the detached halves' JSD gradient; here it collects
  only that of the live side's ``c/M`` (a bias-only difference, since the harness head's shares carry
  their bias).
* Permutations: K full ``randperm`` of the batch (``shuffle_type`` "rand", every row kept), drawn from a
  method-owned CPU generator seeded from the run seed and checkpointed; identical on every rank (each rank
  permutes its own local batch the same way; spec §20.4 R7). JSD, NT-Xent and the CE terms are means over
  the local batch, combined by the gradient all-reduce (R2; the contrastive pairs stay within a rank).
* M > 2 [inferred, spec §10.2]: one modality shuffled at a time against the sum of the others, with the
  same sign pattern (the formulas above); NT-Xent over all M modalities' features (as the official
  3-modality ``nt_xent_loss``).
* JSD takes ``log_softmax`` of both distributions and clamps only the mixture at 1e-20; the official
  clamps the probabilities and the mixture at 1e-20 and raises on NaN. The values agree to that floor.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.params import Params

from .base import Method, MethodContext, Requirements, StepOutput, register_method, seeded_generator

Game = Literal["greedy", "ind", "colab"]
CEB = "ceb"  # the L_CEB predictor's method-module name
MIXTURE_FLOOR = 1e-20  # the official JSD clamp

# --------------------------------------------------------------------------------------- functional core


def jsd(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """§10.2: row mean of ``JSD(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)``, ``m = ½(p + q)``, natural log."""
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(reference, dim=1)
    p, q = log_p.exp(), log_q.exp()
    log_m = (0.5 * (p + q)).clamp_min(MIXTURE_FLOOR).log()
    per_row = 0.5 * (p * (log_p - log_m)).sum(1) + 0.5 * (q * (log_q - log_m)).sum(1)
    return per_row.mean()


def perturbed_logits(
    shares: dict[str, torch.Tensor],
    modality: str,
    perms: torch.Tensor,
    detach: Literal["rest", "own", "none"],
) -> torch.Tensor:
    """§10.2: the K·b logits with ``modality`` shuffled by each row of ``perms`` (K, b): its share is the
    permuted one, the others' shares stay. ``detach='rest'`` → gradient only into ``modality``'s side,
    ``'own'`` → only into the others', ``'none'`` → both. Row ``k·b + i`` belongs to permutation k, row i."""
    k = perms.shape[0]
    own = shares[modality][perms.reshape(-1)]  # s^m_{π_k(i)}: a linear head's share of a shuffled feature
    rest = sum(s for m, s in shares.items() if m != modality).repeat(k, 1)  # r^m_i, repeated per π_k
    if detach == "rest":
        rest = rest.detach()
    elif detach == "own":
        own = own.detach()
    return own + rest


def game_loss(
    own: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    full: dict[str, torch.Tensor],
    reg_by: Game,
    weight: float,
) -> torch.Tensor:
    """§10.2 sign patterns: greedy ``l Σ_m (−J_own + J_others)``, ind ``l Σ_m (−J_own)``, colab
    ``l Σ_m (−J_full)``; only the dicts the game reads need entries."""
    if reg_by == "greedy":
        return weight * sum(-own[m] + others[m] for m in own)
    if reg_by == "ind":
        return weight * sum(-own[m] for m in own)
    return weight * sum(-full[m] for m in full)


def supervised_nt_xent(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """§10.2 ``L_Con``: NT-Xent with same-label positives over the rows of ``features`` (cosine / τ);
    mean over ordered positive pairs; 0 (in the graph) when there is no positive pair or no negative."""
    n = features.shape[0]
    z = F.normalize(features, dim=1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(n, dtype=torch.bool, device=features.device)
    negative = ~same
    if not bool(positive.any()) or not bool(negative.any()):
        return features.sum() * 0.0
    # with two labels present every row has a negative, so no row of the logsumexp is all -inf
    neg_lse = torch.logsumexp(sim.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    per_pair = torch.logaddexp(sim, neg_lse) - sim  # −log(e^s / (e^s + Σ_neg e^s_n))
    return per_pair[positive].mean()


def draw_permutations(num: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """K random permutations of the batch, (K, b), from the method's generator (CPU)."""
    return torch.stack([torch.randperm(batch_size, generator=generator) for _ in range(num)])


# --------------------------------------------------------------------------------------------- method


class McrParams(Params):
    l: float = Field(default=0.1, ge=0, description="§10.2: weight of L_MIPD (run.sh --l; numeric)")  # noqa: E741
    num_samples: int = Field(default=32, ge=1, description="§10.2: K permutations per step (run.sh)")
    reg_by: Game = Field(default="greedy", description="§10.2: the game; greedy (paper default), ind, colab")
    unimodal_weight: float = Field(default=0.01, ge=0, description="§10.2: w_u of the unimodal CE (--multil)")
    contrastive_weight: float = Field(default=1.0, ge=0, description="§10.2: γ_con of L_Con (--contr_coeff)")
    temperature: float = Field(default=0.5, gt=0, description="§10.2: NT-Xent τ (Bias_Infusion_MCR)")
    ceb_weight: float = Field(default=0.0, ge=0, description="§10.2: weight of L_CEB (--lib); 0 = off")
    perturb_in_eval_mode: bool = Field(
        default=False, description="official: perturbed logits from an eval-mode re-encoding of the batch"
    )


class CebPredictor(nn.Sequential):
    """L_CEB's q(sg(z)): Linear(C → d, no bias) → ReLU → Linear(d → Σ d_m, no bias) (official ``fc_yz``)."""

    def __init__(self, num_classes: int, hidden: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(num_classes, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, out_dim, bias=False)
        )


@register_method("mcr")
class Mcr(Method):
    fidelity = "official-code"
    Params = McrParams
    requires = Requirements(min_modalities=2, decomposable_fusion=True)
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # §18: l = 0.1 on CREMA-D and KS alike

    def __init__(self, params: McrParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.generator = seeded_generator(context.seed, salt=2411)

    @property
    def label(self) -> str:
        return self.name if self.params.reg_by == "greedy" else f"{self.name}[{self.params.reg_by}]"

    def build_modules(self, model: MultimodalModel) -> dict[str, nn.Module]:
        dims = model.feature_dims
        if self.params.contrastive_weight > 0 and len(set(dims.values())) > 1:
            raise ConfigError(
                f"method.params.contrastive_weight: mcr's L_Con contrasts the modalities' features, which "
                f"needs equal widths, but the encoders give {dims}; set contrastive_weight=0 or give every "
                f"encoder the same out_dim"
            )
        if self.params.ceb_weight <= 0:
            return {}
        return {CEB: CebPredictor(model.num_classes, max(dims.values()), sum(dims.values()))}

    def _perturbation_shares(
        self, model: MultimodalModel, batch: Batch, shares: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The shares the perturbed logits use: this pass's, or (official) an eval-mode re-encoding's."""
        if not self.params.perturb_in_eval_mode:
            return shares
        was_training = model.encoders.training
        model.encoders.eval()
        try:
            return model.modality_logits(model.encode(batch.inputs))
        finally:
            model.encoders.train(was_training)

    def mipd(
        self, model: MultimodalModel, batch: Batch, shares: dict[str, torch.Tensor], z: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """§10.2 L_MIPD: JSD of the perturbed logits against the unperturbed z, combined by the game."""
        p = self.params
        perms = draw_permutations(p.num_samples, z.shape[0], self.generator).to(z.device)
        pert = self._perturbation_shares(model, batch, shares)
        base = z.repeat(p.num_samples, 1)  # z_i for row k·b + i
        wanted = {"greedy": ("own", "others"), "ind": ("own",), "colab": ("full",)}[p.reg_by]
        detach_of = {"own": "rest", "others": "own", "full": "none"}
        terms: dict[str, dict[str, torch.Tensor]] = {"own": {}, "others": {}, "full": {}}
        logs = {}
        for kind in wanted:
            for m in model.modalities:
                terms[kind][m] = jsd(perturbed_logits(pert, m, perms, detach_of[kind]), base)
                logs[f"jsd_{kind}_{m}"] = terms[kind][m].detach()
        return game_loss(terms["own"], terms["others"], terms["full"], p.reg_by, p.l), logs

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        p = self.params
        labels = batch.labels
        features = model.encode(batch.inputs)
        shares = model.modality_logits(features)
        z = sum(shares[m] for m in model.modalities)  # the additive head: z = Σ_m s^m
        loss_fused = F.cross_entropy(z, labels)
        unimodal = model.unimodal(features)
        loss_uni = sum(F.cross_entropy(unimodal[m], labels) for m in model.modalities)
        loss_mipd, logs = self.mipd(model, batch, shares, z)
        loss = loss_fused + p.unimodal_weight * loss_uni + loss_mipd
        logs.update(
            {
                "loss_fused": loss_fused.detach(),
                "loss_unimodal": loss_uni.detach(),
                "loss_mipd": loss_mipd.detach(),
            }
        )
        if p.contrastive_weight > 0:
            stacked = torch.cat([features[m] for m in model.modalities], dim=0)  # [f^1; …; f^M]
            loss_con = supervised_nt_xent(stacked, labels.repeat(len(model.modalities)), p.temperature)
            loss = loss + p.contrastive_weight * loss_con
            logs["loss_con"] = loss_con.detach()
        if p.ceb_weight > 0:
            joint = torch.cat([features[m] for m in model.modalities], dim=1)
            loss_ceb = F.mse_loss(model.method_modules[CEB](z.detach()), joint)  # MSE(features, q(sg(z)))
            loss = loss + p.ceb_weight * loss_ceb
            logs["loss_ceb"] = loss_ceb.detach()
        return StepOutput(loss=loss, logs=logs)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
