"""Parameters that make each registered method exercise its full mechanism in a few steps.

Shared by the per-method unit tests and the registry-wide two-rank test; a new method must add an entry
(``test_every_method_has_a_case`` fails until it does). ``TRAIN_OVERRIDES`` are extra config overrides a
method needs on the tiny synthetic dataset (e.g. a decomposable fusion head).
"""

from __future__ import annotations

from typing import Any

METHOD_CASES: dict[str, dict[str, Any]] = {
    "joint": {"unimodal_weight": 0.5},
    "midas": {"warmup_epochs": 1},
    "midas-code": {"warmup_epochs": 1},
    "midas-paper": {"warmup_epochs": 1},
    "mixup": {"alpha": 0.4, "mixup_mode": "add"},  # clean + mixed CE, one λ and π per step
    "powmix": {"r_max": 3},  # all five components on: varying n, dynamic r and α, ρ = 2, anisotropic
    "ogm": {"modulate": "weights", "warmup_epochs": 1},  # MLP encoders: no conv; epochs 1-2 modulated
    "ogm_ge": {"modulate": "weights"},  # MLP encoders have no conv weights; window from epoch 0
    "opm": {"warmup_epochs": 1, "p_exe": 1.0},  # epoch 0 joint, then every batch dropped
    "unimodal": {"modality": "b"},
}

#: the modality the two-rank synthetic runs name where a case says "b" (synthetic has strong/weak)
SYNTHETIC_RENAMES = {"b": "weak", "a": "strong"}

TRAIN_OVERRIDES: dict[str, list[str]] = {}


def synthetic_params(name: str) -> dict[str, Any]:
    """The case's params with modality names mapped onto the synthetic dataset's."""
    return {k: SYNTHETIC_RENAMES.get(v, v) if k == "modality" else v for k, v in METHOD_CASES[name].items()}
