"""``model.kind: mmtm``: mid-fusion through Multimodal Transfer Modules between encoder stages.

MMTM (Vaezi Joze, Shaban, Iuzzolino, Koishida, "MMTM: Multimodal Transfer Module for CNN Fusion", CVPR
2020) is a squeeze-and-excitation block across modalities. The encoders run stage by stage in lockstep
(``EncoderStages``, ``harness/models/encoders.py``); after each chosen stage ``k`` a block takes every
modality's activation ``A^m`` (``(B·T, C_m, *spatial)``) and

* squeezes it by global average pooling over frames and space: ``S^m = mean(A^m) ∈ R^{C_m}``;
* forms the joint code ``Z = relu(W [S^1; …; S^M] + b) ∈ R^{C_Z}``, ``C_Z = ⌊2 Σ_m C_m / ratio⌋``;
* excites each modality with its own layer: ``E^m = s · σ(W_m Z + b_m)`` and returns ``E^m ⊙ A^m``
  (channel-wise); ``s = gate_scale``.

The block is the one route by which the other modalities reach modality m before the fusion head: the
joint layer (shared by all) and m's excitation layer are m's "bypass" parameters in the sense of Greedy
(Wu et al., ICML 2022, ``methods/greedy.py``), the encoder's own parameters its "main" ones
(``bypass_parameters`` / ``main_parameters``). Everything else is ``MultimodalModel``'s: the fusion head
on the pooled float32 features, the unimodal heads, method modules, autocast (the whole staged pass,
blocks included, runs under the encoders' autocast).

State (registered buffers, so they checkpoint and move with the model): per block and modality the
cumulative means over training forwards of the batch-mean gate ``E^m`` and squeeze ``S^m`` (the
official Greedy code's ``running_avg_weight``: ``avg ← (avg · n + mean_batch) / (n + 1)``), updated in
training mode only. Under data parallelism the batch means are sums over ranks divided by the global
count when a reducer is set (``set_statistics_reducer``, e.g. the runtime's ``all_reduce_sum``), so the
buffers stay identical on every rank; without one each rank keeps its own (harmless unless a method
uses them). Two uses:

* ``set_curation(m)``: in training forwards, modality m's gate is replaced by its running average, so
  m's activations no longer depend on the other modalities (Greedy's re-balancing step);
* a modality absent from the inputs takes part through its running-average squeeze (the Greedy code's
  ``average_squeezemaps``), so ``encode({m: x}, [m])`` is defined.

Departures from the MMTM paper and code, with reasons:

* ``gate_scale`` 2 (the paper's ``2 × σ``; identity gate at initialisation); the MMTM authors'
  re-implementation, the Greedy code and BalanceBenchmark use a plain sigmoid (``gate_scale: 1``).
* ``C_Z = ⌊2 Σ C_m / ratio⌋`` with ``ratio`` 4, as all three codes (``dim_out = int(2*dim/ratio)``).
* Block positions: after every stage both encoders have (ResNet-18: stages 1-4, BalanceBenchmark and
  spec ``methods.md`` §17); the Greedy code uses stages 2-4, the MMTM code the last three of its
  backbones. ``MMTMParams.stages`` picks others; the config has no key for it yet, so a run gets the
  default.
* M ≥ 2 modalities (one joint code over all squeezes); the papers treat two.
* Running means are updated in training forwards only (the codes update in every forward, evaluation
  included) and the second modality's is its own gate (the Greedy code averages the first's twice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt
from torch import nn

from midasbench.harness.config import ModelConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import EncoderStages, encoder_stages
from midasbench.harness.models.model import MultimodalModel, encoder_config_for, register_model_kind
from midasbench.harness.params import Params

Reducer = Callable[[torch.Tensor], torch.Tensor]  # Σ over ranks (identity on one process)


class MMTMParams(Params):
    stages: list[NonNegativeInt] | None = Field(
        default=None, description="0-based stages followed by a block; null = every stage all encoders have"
    )
    ratio: float = Field(default=4.0, gt=0, description="C_Z = ⌊2 Σ_m C_m / ratio⌋ (MMTM and Greedy code: 4)")
    gate_scale: float = Field(default=2.0, gt=0, description="E = s·σ(·): 2 (MMTM paper), 1 (the codes)")


# ------------------------------------------------------------------------------------ per-sample views


def _per_sample(h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(B·T, C, *spatial)`` viewed as ``(B, T, C, S)``: frames and positions of each sample."""
    return h.reshape(batch_size, h.shape[0] // batch_size, h.shape[1], -1)


def squeeze(h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """MMTM's squeeze ``S``: the global average over frames and positions, ``(B, C)``."""
    return _per_sample(h, batch_size).mean(dim=(1, 3))


def excite(h: torch.Tensor, gate: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``E ⊙ A``: each sample's channels scaled by its gate ``(B, C)``, in ``h``'s layout."""
    return (_per_sample(h, batch_size) * gate[:, None, :, None]).reshape(h.shape)


# --------------------------------------------------------------------------------------------- block


class RunningMeans(nn.Module):
    """Cumulative means over training forwards of one modality's batch-mean gate and squeeze."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("gate", torch.zeros(channels))
        self.register_buffer("squeeze", torch.zeros(channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, gate_mean: torch.Tensor, squeeze_mean: torch.Tensor) -> None:
        """``avg ← (avg · n + x) / (n + 1)``, ``n ← n + 1`` (the Greedy code's running average)."""
        n = self.count.to(torch.float64)
        self.gate.copy_((self.gate.double() * n + gate_mean) / (n + 1))
        self.squeeze.copy_((self.squeeze.double() * n + squeeze_mean) / (n + 1))
        self.count += 1


class MMTMBlock(nn.Module):
    """One MMTM between the modalities' stage-k activations (module docstring for the equations)."""

    def __init__(self, channels: dict[str, int], ratio: float = 4.0, gate_scale: float = 2.0) -> None:
        super().__init__()
        self.modalities = list(channels)
        self.channels = dict(channels)
        total = sum(channels.values())
        self.joint = nn.Linear(total, max(1, int(2 * total / ratio)))  # W, b of Z (shared: every bypass)
        self.excitation = nn.ModuleDict(
            {m: nn.Linear(self.joint.out_features, c) for m, c in channels.items()}
        )
        self.running = nn.ModuleDict({m: RunningMeans(c) for m, c in channels.items()})
        self.gate_scale = gate_scale

    def gates(self, squeezes: dict[str, torch.Tensor], present: list[str]) -> dict[str, torch.Tensor]:
        """``E^m = s · σ(W_m relu(W [S^1; …; S^M] + b) + b_m)`` for the present modalities."""
        z = F.relu(self.joint(torch.cat([squeezes[m] for m in self.modalities], dim=1)))
        return {m: self.gate_scale * torch.sigmoid(self.excitation[m](z)) for m in present}

    def forward(
        self,
        hs: dict[str, torch.Tensor],
        batch_size: int,
        curated: str | None = None,
        reducer: Reducer | None = None,
    ) -> dict[str, torch.Tensor]:
        present = [m for m in self.modalities if m in hs]
        own = {m: squeeze(hs[m], batch_size) for m in present}
        squeezes = {
            m: own[m] if m in own else self.running[m].squeeze.expand(batch_size, -1) for m in self.modalities
        }
        gates = self.gates(squeezes, present)
        if self.training:
            self._update_running_means(gates, own, batch_size, reducer)
            if curated in gates:  # Greedy's re-balancing: no cross-modal input reaches `curated`
                gates[curated] = self.running[curated].gate.to(gates[curated].dtype).expand(batch_size, -1)
        return {m: excite(hs[m], gates[m], batch_size) for m in present}

    @torch.no_grad()
    def _update_running_means(
        self,
        gates: dict[str, torch.Tensor],
        squeezes: dict[str, torch.Tensor],
        batch_size: int,
        reducer: Reducer | None,
    ) -> None:
        """Batch means over all ranks (one collective: Σ gates, Σ squeezes, the sample count), then the
        cumulative means."""
        names = list(gates)
        parts = [t.sum(0).double() for m in names for t in (gates[m], squeezes[m])]
        count = torch.tensor([float(batch_size)], dtype=torch.float64, device=parts[0].device)
        local = torch.cat([*parts, count])
        total = reducer(local) if reducer is not None else local
        sums, n = total[:-1], total[-1]
        offset = 0
        for m in names:
            c = self.channels[m]
            gate_mean = sums[offset : offset + c] / n
            squeeze_mean = sums[offset + c : offset + 2 * c] / n
            self.running[m].update(gate_mean, squeeze_mean)
            offset += 2 * c


# --------------------------------------------------------------------------------------------- model


class MMTMModel(MultimodalModel):
    """Encoders run stage by stage with MMTM blocks between the modalities (module docstring)."""

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        fusion: nn.Module,
        num_classes: int,
        params: MMTMParams | None = None,
        encoder_names: dict[str, str] | None = None,
    ) -> None:
        super().__init__(encoders, fusion, num_classes)
        params = params or MMTMParams()
        if len(encoders) < 2:
            raise ConfigError(
                f"model.kind: mmtm fuses two or more modalities, the dataset has {len(encoders)}"
            )
        channels = {m: self._stages_of(m, encoder_names).channels for m in self.modalities}
        depth = min(len(c) for c in channels.values())
        positions = list(range(depth)) if params.stages is None else sorted(set(params.stages))
        if any(k >= depth for k in positions):
            raise ConfigError(f"mmtm stages {positions}: the encoders share only stages 0-{depth - 1}")
        self.mmtm = nn.ModuleDict(
            {
                str(k): MMTMBlock(
                    {m: channels[m][k] for m in self.modalities}, params.ratio, params.gate_scale
                )
                for k in positions
            }
        )
        self.curated: str | None = None
        self.statistics_reducer: Reducer | None = None

    def _stages_of(self, modality: str, encoder_names: dict[str, str] | None = None) -> EncoderStages:
        stages = encoder_stages(self.encoders[modality])
        if stages is None:
            name = (encoder_names or {}).get(modality, type(self.encoders[modality]).__name__)
            raise ConfigError(
                f"model.encoders.{modality}: encoder {name!r} cannot be run stage by stage, which "
                "model.kind=mmtm needs; use mlp or resnet18"
            )
        return stages

    # ---- what Greedy (and any method) may use
    def set_curation(self, modality: str | None) -> None:
        """Replace ``modality``'s gates by their running means in training forwards (None: off)."""
        if modality is not None and modality not in self.modalities:
            raise ValueError(f"set_curation: {modality!r} is not one of {self.modalities}")
        self.curated = modality

    def set_statistics_reducer(self, reducer: Reducer | None) -> None:
        """The Σ-over-ranks the running means use (``runtime.all_reduce_sum``), called in every training
        forward on every rank alike."""
        self.statistics_reducer = reducer

    def bypass_parameters(self, modality: str) -> list[nn.Parameter]:
        """Where the other modalities reach ``modality``: every block's joint layer and its own
        excitation layer (the Greedy code counts the shared joint layer for both modalities)."""
        out: list[nn.Parameter] = []
        for block in self.mmtm.values():
            out += [*block.joint.parameters(), *block.excitation[modality].parameters()]
        return out

    def main_parameters(self, modality: str) -> list[nn.Parameter]:
        """The modality's own branch: its encoder's parameters (heads excluded)."""
        return list(self.encoders[modality].parameters())

    # ---- the forward
    def encode(
        self, inputs: dict[str, torch.Tensor], modalities: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Features per modality, float32. Every modality in ``inputs`` runs (each is the others'
        context); those asked for are returned, and one asked for but absent is a ``KeyError``."""
        names = self.modalities if modalities is None else list(modalities)
        present = [m for m in self.modalities if m in inputs]
        missing = [m for m in names if m not in inputs]
        if missing:
            raise KeyError(f"encode: no input for {missing}")
        first = inputs[present[0]]
        with self._encoder_autocast(first.device):
            features = self._staged({m: inputs[m] for m in present}, first.shape[0])
        return {m: features[m].float() for m in names}

    def _staged(self, inputs: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
        plans = {m: self._stages_of(m) for m in inputs}
        hs = {m: plans[m].prepare(x) for m, x in inputs.items()}
        for k in range(max(len(p.modules) for p in plans.values())):
            hs = {m: plans[m].modules[k](h) if k < len(plans[m].modules) else h for m, h in hs.items()}
            if str(k) in self.mmtm:
                hs = self.mmtm[str(k)](hs, batch_size, self.curated, self.statistics_reducer)
        return {m: plans[m].finish(h, batch_size) for m, h in hs.items()}


@register_model_kind(
    "mmtm", MMTMParams, "mid-fusion: MMTM squeeze-excitation blocks between the encoders' stages (Greedy)"
)
def _mmtm(
    encoders: dict[str, nn.Module],
    fusion: nn.Module,
    num_classes: int,
    model_cfg: ModelConfig,
    params: MMTMParams,
) -> MultimodalModel:
    """Mid-fusion: an MMTM block after every shared encoder stage (Greedy, methods.md §17)."""
    names = {m: encoder_config_for(model_cfg, m).name for m in encoders}
    return MMTMModel(encoders, fusion, num_classes, params, encoder_names=names)
