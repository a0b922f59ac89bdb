"""``ogm``: on-the-fly gradient modulation, journal version (Wei, Hu, Du, Wen, TPAMI 2024).

Spec ``methods.md`` §7.1 and §7.3, after the official ``GeWu-Lab/BML_TPAMI2024`` (``code/main.py``,
``code/models/Classifier.py``, ``code/scripts/train_ogm.sh``). The step of OGM-GE (§6.1, the functional core
of ``ogm_ge.py``: ``ogm_coefficients``, ``modulate_gradient``, ``modulated_parameters``) with:

* the discrepancy scores of §7.1: ``P_m = Σ_i softmax(t^m_i)[y_i]`` with ``t^m = f^m sg(W_m)^T + sg(c)/M``
  (concat head; for ``sum`` the branch with its own bias), sliced logits through which nothing is trained;
* warm-up: epochs ``< warmup_epochs`` (6: the code's ``warm_up`` flag for epochs 0-5) are plain joint
  training, unmodulated;
* the window ``[modulation_starts, modulation_ends]`` = epochs 0-60 (``train_ogm.sh``), inclusive;
* α = 0.8 (``train_ogm.sh``, the harness default for CREMA-D and Kinetics-Sounds, §18);
* conv (4-D) weights of each encoder, GE noise on by default (``--modulation OGM_GE``).

Params: ``alpha`` (0.8), ``warmup_epochs`` (6), ``modulation_starts`` (0), ``modulation_ends`` (60),
``use_ge`` (true), ``modulate`` (``conv``; ``weights`` = every ≥2-D encoder tensor). Logs as ``ogm_ge``.

Departures from the official code:

* ``t^m`` is computed under ``no_grad`` from ``model.modality_logits`` on detached features: its values are
  those of the detached-weight slices of §7.1, and since ``t`` enters no loss, no gradient path is lost
  (the encoders are trained through the fused logits alone, as in the code).
* The scores are summed over ranks and the GE noise comes from a method-owned, checkpointed generator
  seeded from the run seed, so replicas stay equal under data parallelism (spec §20.4 R1, R7); drawn on
  the CPU and copied to the device (cost in ``ogm_ge.py``).
* The journal's CREMA-D run used AdamW and α = 2.6 (BML_TPAMI2024 issue #3); the harness keeps the §1
  protocol and the script's α = 0.8.
* M > 2, modality order, σ of a one-element tensor and selection by module: as in ``ogm_ge.py``.
* ``OGM_plus`` (a fixed coefficient on the weak modality, in the code but not the paper) is not offered.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from .base import in_window, register_method
from .ogm_ge import OgmGe, OgmGeParams

__all__ = ["Ogm", "OgmParams"]


class OgmParams(OgmGeParams):
    alpha: float = Field(default=0.8, gt=0, description="α of k = 1 − tanh(α·relu(ρ)) (train_ogm.sh)")
    warmup_epochs: int = Field(default=6, ge=0, description="epochs < this are plain joint training")
    modulation_ends: int | None = Field(
        default=60, ge=0, description="last modulated epoch, inclusive (train_ogm.sh); null = to the end"
    )


@register_method("ogm")
class Ogm(OgmGe):
    fidelity = "official-code"
    Params = OgmParams
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # α = 0.8 on every dataset (§18)

    GENERATOR_SEED_OFFSET: ClassVar[int] = 2024

    def modulating(self, epoch: int) -> bool:
        p = self.params
        return epoch >= p.warmup_epochs and in_window(epoch, p.modulation_starts, p.modulation_ends)
