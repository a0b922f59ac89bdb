"""MIDAS fidelity: the per-dataset α rules of the official code, the variants' defaults, values by hand.

Modality order in the α tests is the harness's (and the official code's concatenation order): Food-101
(text, image), Kinetics-Sounds (audio, visual). p̄^m is the batch mean of the aligned unimodal confidence
p^m_{i, y_i}; q̄^m_d the mean fused probability of modality m's source class in misaligned direction d.
All inputs are dyadic fractions so every ratio below is exact in float32.
"""

import pytest
import torch
import torch.nn.functional as F
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.midas import (
    Midas,
    MidasCode,
    MidasPaper,
    alpha_update_code,
    code_alpha_decision,
    code_weak_modality,
)

ETA = 0.05


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)


# ------------------------------------------------------------------ Food-101: ratios image/text (mod 2 / 1)


def test_food101_rule_image_dominant_grows_where_the_cremad_rule_shrinks():
    # text p = (0.125, 0.375) → p̄¹ = 0.25; image p = (0.5, 1.0) → p̄² = 0.75
    aligned = t([0.125, 0.375], [0.5, 1.0])
    # direction A: q̄¹ = (0.0625 + 0.1875)/2 = 0.125, q̄² = (0.875 + 0.625)/2 = 0.75 → q̄²/q̄¹ = 6
    shift_a = t([0.0625, 0.1875], [0.875, 0.625])
    # direction B: q̄¹ = q̄² = 0.5 → q̄²/q̄¹ = 1
    shift_b = t([0.5, 0.5], [0.5, 0.5])
    # Food-101: r_uni = 0.75/0.25 = 3 > 1 → text (modality 1) weak; r_mm = (6 + 1)/2 = 3.5 > 3 → grow
    food = code_alpha_decision(aligned, [shift_a, shift_b], "second_over_first")
    assert food.r_uni == pytest.approx(3.0) and food.r_mm == pytest.approx(3.5)
    assert (food.weak, food.grow) == (0, True)
    assert alpha_update_code(1.2, aligned, [shift_a, shift_b], ETA, None, "second_over_first") == (
        pytest.approx(1.25),
        0,
    )
    # CREMA-D/UCF rule on the same batch: r_uni = 1/3 ≤ 1 → modality 1 weak; r_mm = (1/6 + 1)/2 = 7/12,
    # not < 1/3 → shrink: 1.2 − 0.05 = 1.15
    cremad = code_alpha_decision(aligned, [shift_a, shift_b], "first_over_second")
    assert cremad.r_uni == pytest.approx(1 / 3) and cremad.r_mm == pytest.approx(7 / 12)
    assert (cremad.weak, cremad.grow) == (0, False)
    assert alpha_update_code(1.2, aligned, [shift_a, shift_b], ETA, None) == (pytest.approx(1.15), 0)


def test_food101_rule_text_dominant_shrinks_where_the_cremad_rule_grows():
    # text p̄¹ = (0.25 + 0.75)/2 = 0.5, image p̄² = 0.25
    aligned = t([0.25, 0.75], [0.25, 0.25])
    shift_a = t([0.5, 0.5], [0.125, 0.125])  # q̄²/q̄¹ = 0.25 (q̄¹/q̄² = 4)
    shift_b = t([0.25, 0.25], [0.25, 0.25])  # q̄²/q̄¹ = 1
    # Food-101: r_uni = 0.25/0.5 = 0.5 ≤ 1 → image (modality 2) weak; r_mm = (0.25 + 1)/2 = 0.625,
    # not < 0.5 → shrink, and α never goes below 1
    food = code_alpha_decision(aligned, [shift_a, shift_b], "second_over_first")
    assert food.r_uni == pytest.approx(0.5) and food.r_mm == pytest.approx(0.625)
    assert (food.weak, food.grow) == (1, False)
    assert alpha_update_code(1.0, aligned, [shift_a, shift_b], ETA, None, "second_over_first") == (1.0, 1)
    # CREMA-D rule: r_uni = 2 > 1 → modality 2 weak; r_mm = (4 + 1)/2 = 2.5 > 2 → grow to 1.05
    cremad = code_alpha_decision(aligned, [shift_a, shift_b])
    assert (cremad.r_uni, cremad.r_mm, cremad.weak, cremad.grow) == (2.0, 2.5, 1, True)
    assert alpha_update_code(1.0, aligned, [shift_a, shift_b], ETA, None)[0] == pytest.approx(1.05)


def test_food101_rule_breaks_a_tie_toward_the_other_modality():
    aligned = t([0.5, 0.25], [0.25, 0.5])  # p̄¹ = p̄² = 0.375: both ratios are exactly 1, not > 1
    assert code_weak_modality(aligned, "first_over_second") == 0  # CREMA-D code: else-branch, audio weak
    assert code_weak_modality(aligned, "dominant_over_weak") == 0  # KS code: the same branch
    assert code_weak_modality(aligned, "second_over_first") == 1  # Food-101 code: else-branch, image weak


# ------------------------------------------------- Kinetics-Sounds: r_mm flipped to dominant/weak


def test_kinetics_rule_audio_dominant_is_the_cremad_rule_and_caps_at_ten():
    aligned = t([0.25, 0.75], [0.25, 0.25])  # audio p̄¹ = 0.5, visual p̄² = 0.25 → r_uni = 2 > 1
    shift_a = t([0.75, 0.75], [0.25, 0.25])  # q̄¹/q̄² = 3
    shift_b = t([0.5, 0.5], [0.25, 0.25])  # q̄¹/q̄² = 2 → r_mm = 2.5 > 2 → grow, visual weak
    ks = code_alpha_decision(aligned, [shift_a, shift_b], "dominant_over_weak")
    assert (ks.r_uni, ks.r_mm, ks.weak, ks.grow) == (2.0, 2.5, 1, True)
    assert code_alpha_decision(aligned, [shift_a, shift_b]) == ks  # same as CREMA-D while audio dominates
    # 9.98 + 0.05 = 10.03 → the KS code's max(1, min(10, α)) = 10
    assert alpha_update_code(9.98, aligned, [shift_a, shift_b], ETA, 10.0, "dominant_over_weak") == (10.0, 1)
    # r_mm = (1 + 1)/2 = 1 < 2 → shrink: 1.2 → 1.15
    flat = t([0.25, 0.25], [0.25, 0.25])
    assert alpha_update_code(1.2, aligned, [flat, flat], ETA, 10.0, "dominant_over_weak")[0] == pytest.approx(
        1.15
    )


def test_kinetics_rule_visual_dominant_flips_r_mm_and_grows_where_the_cremad_rule_shrinks():
    aligned = t([0.25, 0.25], [0.25, 0.75])  # audio p̄¹ = 0.25, visual p̄² = 0.5 → r_uni = 0.5 ≤ 1
    shift_a = t([0.25, 0.25], [0.5, 0.5])  # q̄²/q̄¹ = 2 (q̄¹/q̄² = 0.5)
    shift_b = t([0.5, 0.5], [0.5, 0.5])  # q̄²/q̄¹ = 1
    # KS: r_mm = q̄²/q̄¹ averaged = (2 + 1)/2 = 1.5 > r_uni = 0.5 → grow; audio (modality 1) weak
    ks = code_alpha_decision(aligned, [shift_a, shift_b], "dominant_over_weak")
    assert (ks.r_uni, ks.r_mm, ks.weak, ks.grow) == (0.5, 1.5, 0, True)
    assert alpha_update_code(1.0, aligned, [shift_a, shift_b], ETA, 10.0, "dominant_over_weak") == (
        pytest.approx(1.05),
        0,
    )
    # CREMA-D rule: r_mm = q̄¹/q̄² averaged = (0.5 + 1)/2 = 0.75, not < 0.5 → shrink (floor 1)
    cremad = code_alpha_decision(aligned, [shift_a, shift_b])
    assert (cremad.r_mm, cremad.grow) == (0.75, False)
    assert alpha_update_code(1.0, aligned, [shift_a, shift_b], ETA, 10.0)[0] == 1.0
    # the KS rule shrinks here only when q̄²/q̄¹ ≤ r_uni: (0.25 + 0.5)/2 = 0.375 < 0.5 → 1.2 → 1.15
    lean_a, lean_b = t([0.5, 0.5], [0.125, 0.125]), t([0.5, 0.5], [0.25, 0.25])
    shrink = code_alpha_decision(aligned, [lean_a, lean_b], "dominant_over_weak")
    assert (shrink.r_mm, shrink.grow) == (0.375, False)
    assert alpha_update_code(1.2, aligned, [lean_a, lean_b], ETA, 10.0, "dominant_over_weak")[0] == (
        pytest.approx(1.15)
    )


# ------------------------------------------------------------------------- variants and their defaults


def test_variants_fidelity_and_registration():
    assert {"midas", "midas-code", "midas-paper"} <= set(METHODS.names())
    assert (Midas.fidelity, MidasCode.fidelity, MidasPaper.fidelity) == ("inferred", "official-code", "paper")
    assert METHODS.get("midas-paper") is MidasPaper


def test_midas_paper_params_are_the_literal_equations():
    p = MidasPaper.Params()
    assert p.alpha_mode == "paper"  # Eq. 5-7: per-modality vector α
    assert p.uni_reduction == "sum"  # Eq. 9: Σ_m CE
    assert p.direction_reduction == "sum"  # Eq. 11: one L_mis per misaligned sample, both directions
    assert p.pairing == "resample_diff_label"  # §3.2: x_j with y_j ≠ y_i for every x_i
    assert p.alpha_max is None  # Eq. 7: no cap (A12)
    assert p.alpha_reset_each_epoch is True  # Alg. 1 line 11 (A1)
    assert p.similarity == "cosine" and p.level == "feature"  # Eq. 8, Eq. 12
    assert p.use_warmup and p.use_weak_modality_weight and p.use_hard_sample_weight
    # midas keeps the code's α rule and means; midas-code its unmasked permutation and no cap
    m, c = Midas.Params(), MidasCode.Params()
    assert (m.alpha_mode, m.uni_reduction, m.direction_reduction, m.pairing) == (
        "code",
        "mean",
        "mean",
        "randperm_masked",
    )
    assert (m.alpha_ratio, m.alpha_max, m.alpha_reset_each_epoch) == ("first_over_second", 10.0, False)
    assert (c.pairing, c.alpha_max, c.alpha_ratio) == ("randperm", None, "first_over_second")


LAM_ETA_WARMUP = {
    "cremad": (1.0, 0.05, 10),
    "food101": (1.0, 0.05, 2),
    "kinetics_sounds": (5.0, 0.05, 10),
    "mosi": (1.0, 0.05, 10),
    "sarcasm": (1.0, 0.05, 2),
    "twitter2015": (1.0, 0.05, 2),
    "ucf101": (1.0, 0.05, 0),
}


@pytest.mark.parametrize("cls", [Midas, MidasCode, MidasPaper])
def test_dataset_defaults_carry_lambda_eta_warmup_and_validate(cls):
    assert set(cls.dataset_defaults) == set(LAM_ETA_WARMUP)
    for dataset, (lam, eta, warmup) in LAM_ETA_WARMUP.items():
        entry = cls.dataset_defaults[dataset]
        assert (entry["lam"], entry["eta"], entry["warmup_epochs"]) == (lam, eta, warmup), dataset
        cls.Params(**entry)  # every entry is a valid set of this variant's params
    if cls is not MidasCode:  # only midas-code carries the official files' per-dataset switches
        assert all(set(e) == {"lam", "eta", "warmup_epochs"} for e in cls.dataset_defaults.values())


def test_midas_code_dataset_switches_for_food101_and_kinetics():
    food = MidasCode.dataset_defaults["food101"]
    assert food["scheduler_after_warmup"] is False  # model_midas_food101.py steps StepLR every epoch
    assert food["alpha_ratio"] == "second_over_first"  # image/text ratios
    ks = MidasCode.dataset_defaults["kinetics_sounds"]
    assert (ks["alpha_ratio"], ks["alpha_max"], ks["lam"]) == ("dominant_over_weak", 10.0, 5.0)
    for dataset in ("cremad", "ucf101"):  # the default rule is these files'
        assert "alpha_ratio" not in MidasCode.dataset_defaults[dataset]
        assert "scheduler_after_warmup" not in MidasCode.dataset_defaults[dataset]
    context = MethodContext(modalities=("text", "visual"), num_classes=3, epochs=30, steps_per_epoch=1)
    on_food = build_method("midas-code", food, context)
    assert on_food.scheduler_should_step(0) and on_food.scheduler_should_step(1)  # during warm-up too
    on_cremad = build_method("midas-code", MidasCode.dataset_defaults["cremad"], context)
    assert not on_cremad.scheduler_should_step(9) and on_cremad.scheduler_should_step(10)


# ---------------------------------------------------------------------- the switch inside the method


def tiny(names: tuple[str, ...] = ("a", "b"), seed: int = 0) -> tuple[MultimodalModel, Batch]:
    torch.manual_seed(seed)
    model = MultimodalModel(
        {m: Linear(3, 4) for m in names}, ConcatFusion(dict.fromkeys(names, 4), 3), num_classes=3
    )
    batch = Batch(
        inputs={m: torch.randn(4, 3) for m in names},
        labels=torch.tensor([0, 1, 2, 0]),
        index=torch.arange(4),
    )
    return model, batch


def context(names: tuple[str, ...] = ("a", "b")) -> MethodContext:
    return MethodContext(modalities=names, num_classes=3, epochs=10, steps_per_epoch=1)


def test_food101_rule_is_the_cremad_rule_with_the_modality_order_reversed():
    # the Food-101 code's image/text is the CREMA-D code's first/second once image is listed first
    gen = torch.Generator().manual_seed(0)
    aligned = torch.rand(2, 4, generator=gen)
    shifts = [torch.rand(2, 4, generator=gen) for _ in range(2)]
    food = code_alpha_decision(aligned, shifts, "second_over_first")
    flipped = code_alpha_decision(aligned.flip(0), [s.flip(0) for s in shifts], "first_over_second")
    assert (food.r_uni, food.r_mm, food.grow) == (flipped.r_uni, flipped.r_mm, flipped.grow)
    assert food.weak == 1 - flipped.weak


@pytest.mark.parametrize("ratio", ["second_over_first", "dominant_over_weak"])
def test_training_step_uses_the_ratio_switch(ratio):
    model, batch = tiny(seed=2)  # a batch with r_uni < 1, where the KS flip changes the decision
    method = build_method("midas-code", {"warmup_epochs": 0, "alpha_ratio": ratio, "eta": 0.5}, context())
    method.alpha_code = 2.0
    method.training_step(model, batch, epoch=0)
    pending = method._pending
    # the switch's rule written out here from the step's statistics (p̄ and q̄ as in the module docstring)
    p1, p2 = (float(pending["aligned"][m].mean()) for m in (0, 1))
    q = [(float(c[0].mean()), float(c[1].mean())) for c in pending["class_probs"]]
    if ratio == "second_over_first":
        r_uni, r_mm = p2 / p1, sum(b / a for a, b in q) / len(q)
        weak = 0 if r_uni > 1 else 1
        grow = r_mm > r_uni if r_uni > 1 else r_mm < r_uni
    else:
        r_uni = p1 / p2
        r_mm = sum(a / b if r_uni > 1 else b / a for a, b in q) / len(q)
        weak, grow = (1 if r_uni > 1 else 0), r_mm > r_uni
        assert r_uni < 1 and grow  # here the CREMA-D rule (r_mm = mean q̄¹/q̄² < r_uni) shrinks instead
        assert sum(a / b for a, b in q) / len(q) >= r_uni
    assert method.weak_code == weak  # α is put on this modality before the loss is built
    method.after_optimizer_step(model, epoch=0)
    assert method.alpha_code == pytest.approx(2.5 if grow else 1.5)


def test_food101_switch_puts_alpha_on_the_second_modality_on_a_tie_in_the_step():
    model, batch = tiny()
    with torch.no_grad():  # two identical modalities: p̄¹ = p̄² exactly
        model.encoders["b"].load_state_dict(model.encoders["a"].state_dict())
        model.unimodal_heads["b"].load_state_dict(model.unimodal_heads["a"].state_dict())
    batch = Batch(
        inputs={"a": batch.inputs["a"], "b": batch.inputs["a"]}, labels=batch.labels, index=batch.index
    )
    weak = {}
    for ratio in ("first_over_second", "second_over_first"):
        method = build_method("midas-code", {"warmup_epochs": 0, "alpha_ratio": ratio}, context())
        method.training_step(model, batch, epoch=0)
        weak[ratio] = method.weak_code
    assert weak == {"first_over_second": 0, "second_over_first": 1}


def test_two_modality_ratio_rules_refuse_three_modalities():
    names = ("a", "b", "c")
    with pytest.raises(ConfigError, match="alpha_ratio"):
        build_method("midas-code", {"alpha_ratio": "dominant_over_weak"}, context(names))
    build_method("midas-code", {"alpha_ratio": "dominant_over_weak", "alpha_mode": "paper"}, context(names))
    with pytest.raises(ValueError, match="two modalities"):
        code_alpha_decision(torch.full((3, 2), 0.5), [torch.full((3, 2), 0.5)], "second_over_first")


def test_midas_paper_step_sums_unimodal_losses_pairs_every_anchor_and_resets_alpha_each_epoch():
    model, batch = tiny()
    method = build_method("midas-paper", {"warmup_epochs": 1, "eta": 0.5}, context())
    out = method.training_step(model, batch, epoch=1)
    features = model.encode(batch.inputs)
    uni = model.unimodal(features)
    expected_uni = F.cross_entropy(uni["a"], batch.labels) + F.cross_entropy(uni["b"], batch.labels)
    assert out.logs["loss_unimodal"] == pytest.approx(expected_uni.item())  # Eq. 9's sum
    assert out.logs["valid_pairs"] == 1.0  # every anchor has a different-label partner
    method.after_optimizer_step(model, epoch=1)
    assert method.current_alpha().max().item() in (1.0, 1.5)  # one vector entry moved by η or stayed at 1
    method.alpha = torch.tensor([1.0, 3.0])
    method.on_epoch_start(model, 0)  # still warm-up: no reset
    assert method.current_alpha().tolist() == [1.0, 3.0]
    method.on_epoch_start(model, 2)  # Alg. 1 line 11: α_m ← 1 at every post-warm-up epoch
    assert method.current_alpha().tolist() == [1.0, 1.0]
