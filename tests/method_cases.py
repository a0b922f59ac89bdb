"""Parameters that make each registered method exercise its full mechanism in a few steps.

Shared by the per-method unit tests and the registry-wide two-rank test; a new method must add an entry
(``test_every_method_has_a_case`` fails until it does). ``TRAIN_OVERRIDES`` are extra config overrides a
method needs on the tiny synthetic dataset (e.g. a decomposable fusion head).
"""

from __future__ import annotations

from typing import Any

METHOD_CASES: dict[str, dict[str, Any]] = {
    "joint": {"unimodal_weight": 0.5},
    "umt": {"teacher_epochs": 1},  # both teachers trained in-process first (1 epoch each), then distilled
    "ume": {"ume_combine": "prob_mean"},  # both branches trained side by side; probability-mean ensemble
    "mla": {},  # code_v1 projection from the second sub-step, per-sample gate; alternation every batch
    "reconboost": {},  # 1 + 1 passes per stage: P1 (q_y = 1), P2 (first learner), P1 (q from it, ga)
    # probes of one epoch at epochs 0 and 2 (online, S = 2): the two-rank resume re-estimates after loading
    "gblending": {"probe_epochs": 1, "mode": "online", "super_epoch": 2},
    "remix": {"warmup_epochs": 1},  # assigned after epoch 0: epochs 1-2 train on the remixed segments
    "relearning": {"reinit_every": 1},  # after epoch 1 (start of 2): train/val KMeans, α, encoder blend
    "greedy": {"curation_starts": 1},  # epoch 0 accumulates d on the MMTM model; epochs 1-2 may curate
    "dgl": {"alpha": 4.0, "grad_clip": 1.0},  # detached fused CE + zero-padded unimodal CEs; clip active
    "mmcosine": {"scale": 10.0},  # cosine logits in training and at evaluation
    "mbsd": {},  # stateless, always on: fused + sliced CEs and both pairwise terms every step
    "cml": {},  # official per-sample hinge, nested feature-zero removal, sum reduction (×W)
    "inforeg": {"window_threshold": 0.9},  # epochs 0-1 open (k = 1), epoch 2 closed unless F_1 > 9 F_0
    "lemda": {"clip_scope": "all"},  # G trained adversarially from step 0; official joint clip
    "mcr": {"num_samples": 4, "ceb_weight": 0.1},  # greedy game, NT-Xent and the optional L_CEB
    "amco": {},  # feature_mask: dependence, the p_t ramp (30% of 3 epochs), masks, co-optimization
    "lfm": {"schedule": "learnable"},  # late fusion, JSD, the per-epoch HVP update of α on held-out rows
    "agm": {"modulation_starts": 1},  # epoch 0 unmodulated (σ̄ still updated), epochs 1-2 modulated
    "mmpareto": {"gamma": 1.5},  # no window: probes, MinNorm/equal weights and the edit on every step
    "smv": {"warmup_epochs": 1},  # valued after epoch 0: epochs 1-2 train on the re-sampled plan
    "pmr": {"momentum": 0.5},  # prototypes before epoch 0 and after each; PCE from epoch 0
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
