"""Modality-usage diagnostics: fixed misaligned pairing, top-2 rule, confidences, zeroing, Shapley.

Expected values are worked out by hand in each test, not by the code under test.
"""

import itertools
import math
import re

import numpy as np
import pytest
import torch

from midasbench.harness.training.diagnostics import (
    code_variant_misaligned_top2,
    fixed_misaligned_pairing,
    kept_alone_accuracies,
    misaligned_confidences,
    misaligned_top2_accuracy,
    modality_diagnostics,
    shapley_values,
    swap_features,
    zeroed_feature_accuracies,
)

# --------------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------------


def _labels(n: int = 300, classes: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def test_pairing_is_deterministic_per_seed_and_changes_with_the_seed():
    labels = _labels()
    a = fixed_misaligned_pairing(labels, seed=3)
    assert np.array_equal(a, fixed_misaligned_pairing(labels, seed=3))
    assert not np.array_equal(a, fixed_misaligned_pairing(labels, seed=4))
    assert a.dtype == np.int64 and a.shape == labels.shape


def test_every_partner_has_a_different_label():
    for seed in range(5):
        labels = _labels(seed=seed)
        partner = fixed_misaligned_pairing(labels, seed)
        assert (partner >= 0).all() and (partner < len(labels)).all()
        assert (labels[partner] != labels).all()


def test_valid_partners_of_the_initial_permutation_are_kept():
    # The recipe: rng.permutation(n) first; only rows paired with their own class are redrawn.
    labels = _labels(n=200, classes=3, seed=1)
    perm = np.random.default_rng(11).permutation(len(labels))
    keep = labels[perm] != labels
    partner = fixed_misaligned_pairing(labels, 11)
    assert keep.sum() > 50 and (~keep).sum() > 20
    assert np.array_equal(partner[keep], perm[keep])


def test_two_rows_of_two_classes_pair_with_each_other():
    for seed in range(10):
        assert fixed_misaligned_pairing(np.array([5, 9]), seed).tolist() == [1, 0]


def test_redraws_are_spread_over_all_rows_of_other_classes():
    # One row of class 0 among rows of class 1: every class-1 row must be paired with row 0, and row 0's
    # partner (a redraw whenever the permutation gave it a class-1 row, i.e. almost always) should hit
    # each of the 4 class-1 rows with roughly equal frequency over seeds.
    labels = np.array([0, 1, 1, 1, 1])
    counts = np.zeros(5, int)
    for seed in range(2000):
        partner = fixed_misaligned_pairing(labels, seed)
        assert (partner[1:] == 0).all()
        counts[partner[0]] += 1
    assert counts[0] == 0
    assert (np.abs(counts[1:] - 500) < 100).all()


def test_pairing_with_one_dominant_class():
    labels = np.zeros(2000, int)
    labels[np.random.default_rng(0).choice(2000, 100, replace=False)] = np.repeat([1, 2], 50)  # 95 % zero
    partner = fixed_misaligned_pairing(labels, 7)
    assert (partner >= 0).all()
    assert (labels[partner] != labels).all()
    minority = np.flatnonzero(labels != 0)
    # the 1900 class-0 rows all pair with the 100 minority rows, spread over many of them
    assert np.isin(partner[labels == 0], minority).all()
    assert len(np.unique(partner[labels == 0])) > 80


def test_single_class_split_gives_minus_one():
    assert fixed_misaligned_pairing(np.full(10, 3), 0).tolist() == [-1] * 10
    assert fixed_misaligned_pairing(np.array([], dtype=int), 0).shape == (0,)


def test_pairing_depends_only_on_labels_and_seed():
    labels = _labels(n=500)
    expected = fixed_misaligned_pairing(labels, 5)
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.rand(10)
    torch.rand(10)
    assert np.array_equal(fixed_misaligned_pairing(labels.astype(np.int32), 5), expected)
    assert np.array_equal(fixed_misaligned_pairing(list(labels), 5), expected)
    # the same label structure under other label values gives the same pairing
    assert np.array_equal(fixed_misaligned_pairing(labels * 10 + 7, 5), expected)


def test_pairing_is_fast_on_large_splits():
    labels = _labels(n=20_000, classes=30)
    partner = fixed_misaligned_pairing(labels, 0)
    assert (labels[partner] != labels).all()


# --------------------------------------------------------------------------------------------------
# Swapping, top-2 rule, confidences
# --------------------------------------------------------------------------------------------------


def test_swap_features_takes_the_swapped_modality_from_the_partner():
    feats = {"a": torch.tensor([[0.0], [1.0], [2.0]]), "b": torch.tensor([[10.0], [11.0], [12.0]])}
    out = swap_features(feats, torch.tensor([2, 0, 1]), "b")
    assert out["a"].view(-1).tolist() == [0, 1, 2]
    assert out["b"].view(-1).tolist() == [12, 10, 11]
    out = swap_features(feats, torch.tensor([0, 1]), "a", rows=torch.tensor([2, 0]))
    assert out["a"].view(-1).tolist() == [0, 1]
    assert out["b"].view(-1).tolist() == [12, 10]
    with pytest.raises(ValueError):
        swap_features(feats, torch.tensor([-1, 0, 1]), "a")
    with pytest.raises(KeyError):
        swap_features(feats, torch.tensor([0, 1, 2]), "c")


def test_top2_rule_on_hand_made_logits():
    logits = torch.tensor(
        [
            [3.0, 2.0, 0.0, -1.0],  # top-2 {0, 1}, pair (1, 0) → correct (either order)
            [3.0, 2.0, 0.0, -1.0],  # top-2 {0, 1}, pair (0, 1) → correct
            [3.0, 0.0, 2.0, -1.0],  # top-2 {0, 2}, pair (1, 0) → wrong
            [0.0, 0.0, 1.0, 5.0],  # top-2 {3, 2}, pair (2, 3) → correct
        ]
    )
    y_i = torch.tensor([1, 0, 1, 2])
    y_j = torch.tensor([0, 1, 0, 3])
    assert misaligned_top2_accuracy(logits, y_i, y_j) == pytest.approx(3 / 4)
    assert misaligned_top2_accuracy(logits[2:3], y_i[2:3], y_j[2:3]) == 0.0
    # a same-label pair can never be correct: the top-2 are two distinct classes
    assert misaligned_top2_accuracy(logits[:1], torch.tensor([0]), torch.tensor([0])) == 0.0


def _one_hot_features(labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    eye = torch.eye(classes)
    return {"a": 2.0 * eye[labels], "b": 1.0 * eye[labels]}


def _balanced_fuse(f: dict[str, torch.Tensor]) -> torch.Tensor:
    # logits = 2 e_{y(a)} + e_{y(b)}: the top-2 are exactly the two sources' classes when they differ
    return f["a"] + f["b"]


def test_code_variant_counts_same_class_pairs_and_fixed_points_as_wrong():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 0, 1, 2])
    feats = _one_hot_features(labels, 4)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(9))
    # with this fuse a pair is right iff its labels differ; the code variant keeps all rows
    expected = (labels != labels[perm]).float().mean().item()
    assert expected < 1.0
    got = code_variant_misaligned_top2(_balanced_fuse, feats, labels, seed=9, batch_size=5)
    assert got == pytest.approx(expected)
    # a single-class split: every pair is a same-class pair
    same = torch.zeros(6, dtype=torch.long)
    assert code_variant_misaligned_top2(_balanced_fuse, _one_hot_features(same, 4), same, seed=0) == 0.0


def test_misaligned_confidences_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    out = misaligned_confidences(probs, {"a": torch.tensor([0, 2]), "b": torch.tensor([1, 0])})
    assert out["a"] == pytest.approx((0.7 + 0.6) / 2)
    assert out["b"] == pytest.approx((0.2 + 0.1) / 2)


# --------------------------------------------------------------------------------------------------
# Zeroed features and Shapley values
# --------------------------------------------------------------------------------------------------


def _linear_head() -> torch.nn.Linear:
    # logits = [a, b, 0.5]: the bias alone predicts class 2
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    return head


# rows (a, b, y) and the predictions with      full | a only | b only | none
_ROWS = [
    (2.0, 0.0, 0),  #                              0 ✓ |  0 ✓   |  2 ✗   |  2 ✗
    (0.0, 2.0, 1),  #                              1 ✓ |  2 ✗   |  1 ✓   |  2 ✗
    (1.0, 3.0, 1),  #                              1 ✓ |  0 ✗   |  1 ✓   |  2 ✗
    (3.0, 1.0, 0),  #                              0 ✓ |  0 ✓   |  1 ✗   |  2 ✗
    (0.2, 0.1, 2),  #                              2 ✓ |  2 ✓   |  2 ✓   |  2 ✓
    (1.0, -1.0, 0),  #                             0 ✓ |  0 ✓   |  2 ✗   |  2 ✗
]


def _linear_case() -> tuple:
    head = _linear_head()
    feats = {"a": torch.tensor([[r[0]] for r in _ROWS]), "b": torch.tensor([[r[1]] for r in _ROWS])}
    labels = torch.tensor([r[2] for r in _ROWS])

    def fuse(f: dict[str, torch.Tensor]) -> torch.Tensor:
        return head(torch.cat([f["a"], f["b"]], dim=1))

    return fuse, feats, labels


@pytest.mark.parametrize("batch_size", [1, 4, 4096])
def test_zeroed_feature_accuracies_with_a_linear_head(batch_size):
    fuse, feats, labels = _linear_case()
    v = zeroed_feature_accuracies(fuse, feats, labels, batch_size=batch_size)
    assert v == {
        frozenset(): pytest.approx(1 / 6),
        frozenset({"a"}): pytest.approx(4 / 6),
        frozenset({"b"}): pytest.approx(3 / 6),
        frozenset({"a", "b"}): pytest.approx(6 / 6),
    }
    phi = shapley_values(v, ["a", "b"])
    assert phi["a"] == pytest.approx(0.5 * (4 / 6 - 1 / 6) + 0.5 * (1 - 3 / 6))  # = 1/2
    assert phi["b"] == pytest.approx(0.5 * (3 / 6 - 1 / 6) + 0.5 * (1 - 4 / 6))  # = 1/3
    assert kept_alone_accuracies(fuse, feats, labels, batch_size) == v  # for M = 2 these are all subsets


def test_shapley_two_modalities_by_hand():
    v = {frozenset(): 0.1, frozenset("a"): 0.6, frozenset("b"): 0.3, frozenset("ab"): 0.7}
    phi = shapley_values(v, ["a", "b"])
    assert phi["a"] == pytest.approx(0.45)  # ½(0.6 − 0.1) + ½(0.7 − 0.3)
    assert phi["b"] == pytest.approx(0.15)  # ½(0.3 − 0.1) + ½(0.7 − 0.6)


def test_shapley_additive_value_function_gives_the_weights():
    w = {"a": 0.3, "b": -0.1, "c": 0.25}
    subsets = [frozenset(s) for r in range(4) for s in itertools.combinations("abc", r)]
    v = {s: 0.05 + sum(w[m] for m in s) for s in subsets}
    phi = shapley_values(v, ["a", "b", "c"])
    assert phi == {m: pytest.approx(w[m]) for m in w}


def test_shapley_three_modalities_efficiency_and_symmetry():
    rng = np.random.default_rng(0)
    subsets = [frozenset(s) for r in range(4) for s in itertools.combinations("abc", r)]
    v = {s: float(rng.random()) for s in subsets}
    phi = shapley_values(v, ["a", "b", "c"])
    assert sum(phi.values()) == pytest.approx(v[frozenset("abc")] - v[frozenset()])
    # b and c symmetric: v depends only on whether a is in S and on |S ∩ {b, c}|
    table = {(has_a, k): float(rng.random()) for has_a in (0, 1) for k in range(3)}
    sym = {s: table[("a" in s, len(s & {"b", "c"}))] for s in subsets}
    phi = shapley_values(sym, ["a", "b", "c"])
    assert phi["b"] == pytest.approx(phi["c"])
    assert sum(phi.values()) == pytest.approx(sym[frozenset("abc")] - sym[frozenset()])
    # a modality that never changes the value is a null player
    null = {s: v[s - {"c"}] for s in subsets}
    assert shapley_values(null, ["a", "b", "c"])["c"] == pytest.approx(0.0)


def test_shapley_needs_every_coalition():
    with pytest.raises(KeyError, match="coalition"):
        shapley_values({frozenset(): 0.0, frozenset("a"): 1.0}, ["a", "b"])


# --------------------------------------------------------------------------------------------------
# modality_diagnostics
# --------------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[A-Za-z0-9_./-]+")


def _a_only_case(n: int = 60, seed: int = 0) -> tuple:
    """Labels in {0, 1, 2} of 4 classes; logits = 10·e_{y(a)} + 0.5·e_3, so class 3 is always second."""
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, 3, n))
    eye = torch.eye(4)
    feats = {"a": eye[labels], "b": torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))}
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5])

    def fuse(f: dict[str, torch.Tensor]) -> torch.Tensor:
        return 10.0 * f["a"] + bias + 0.0 * f["b"].sum(dim=1, keepdim=True)

    return fuse, feats, labels


def test_diagnostics_of_a_model_that_only_uses_modality_a():
    fuse, feats, labels = _a_only_case()
    out = modality_diagnostics(fuse, feats, labels, num_classes=4, pairing_seed=0, batch_size=16)
    assert all(_SAFE.fullmatch(k) for k in out)
    z = math.exp(10) + math.exp(0.5) + 2  # softmax denominator: 10 on a's class, 0.5 on class 3, 0, 0
    assert out["mis_conf_a"] == pytest.approx(math.exp(10) / z)
    assert out["mis_conf_b"] == pytest.approx(1 / z)
    # the top-2 are {class of a's source, 3} and 3 is never a label: no pair is right
    assert out["mis_top2_swap_a"] == out["mis_top2_swap_b"] == out["mis_top2"] == 0.0
    assert out["mis_top2_code"] == 0.0
    # keeping a alone keeps every prediction; b alone or nothing predicts class 3, never a label
    assert out["zeroed_acc_a"] == 1.0
    assert out["zeroed_acc_b"] == 0.0
    assert out["zeroed_acc_none"] == 0.0
    assert out["shapley_a"] == pytest.approx(1.0)
    assert out["shapley_b"] == 0.0


def test_diagnostics_of_a_model_that_uses_both_modalities():
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 5, 80))
    feats = _one_hot_features(labels, 5)
    out = modality_diagnostics(_balanced_fuse, feats, labels, num_classes=5, pairing_seed=3)
    # every fixed pair has different labels and the top-2 are both sources' classes
    assert out["mis_top2_swap_a"] == out["mis_top2_swap_b"] == out["mis_top2"] == 1.0
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(3))
    assert out["mis_top2_code"] == pytest.approx((labels != labels[perm]).float().mean().item())
    z = math.exp(2) + math.exp(1) + 3  # logits 2 on a's class, 1 on b's class, 0 on 3 others
    assert out["mis_conf_a"] == pytest.approx(math.exp(2) / z)
    assert out["mis_conf_b"] == pytest.approx(math.exp(1) / z)


def test_diagnostics_do_not_depend_on_the_chunk_size():
    fuse, feats, labels = _a_only_case(n=50, seed=2)
    a = modality_diagnostics(fuse, feats, labels, num_classes=4, pairing_seed=1, batch_size=7)
    b = modality_diagnostics(fuse, feats, labels, num_classes=4, pairing_seed=1)
    assert a.keys() == b.keys()
    assert all(a[k] == pytest.approx(b[k]) for k in a)


def test_binary_task_skips_top2_keys():
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    feats = _one_hot_features(labels, 2)
    out = modality_diagnostics(_balanced_fuse, feats, labels, num_classes=2, pairing_seed=0)
    assert not any(k.startswith("mis_top2") for k in out)
    assert {"mis_conf_a", "mis_conf_b", "zeroed_acc_a", "zeroed_acc_b", "zeroed_acc_none"} <= out.keys()
    assert {"shapley_a", "shapley_b"} <= out.keys()


def test_three_and_four_modalities():
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 4, 40))
    eye = torch.eye(4)

    def fuse(f: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(f.values())

    three = {m: w * eye[labels] for m, w in zip("abc", (3.0, 2.0, 1.0), strict=True)}
    out = modality_diagnostics(fuse, three, labels, num_classes=4, pairing_seed=0)
    assert {"shapley_a", "shapley_b", "shapley_c", "mis_top2_swap_c"} <= out.keys()
    assert "mis_top2_code" not in out
    # any single kept modality predicts every label; all zeroed: logits tie at 0 → argmax 0
    v_none = (labels == 0).float().mean().item()
    assert out["zeroed_acc_none"] == pytest.approx(v_none)
    assert sum(out[f"shapley_{m}"] for m in "abc") == pytest.approx(1.0 - v_none)
    assert out["shapley_a"] == pytest.approx(out["shapley_c"])

    four = {**three, "d": 0.5 * eye[labels]}
    out = modality_diagnostics(fuse, four, labels, num_classes=4, pairing_seed=0)
    assert not any(k.startswith("shapley_") for k in out)
    assert {"zeroed_acc_a", "zeroed_acc_d", "zeroed_acc_none", "mis_conf_d", "mis_top2"} <= out.keys()
    assert out["zeroed_acc_d"] == 1.0


def test_single_class_split_skips_the_pair_metrics():
    labels = torch.zeros(6, dtype=torch.long)
    out = modality_diagnostics(_balanced_fuse, _one_hot_features(labels, 4), labels, 4, pairing_seed=0)
    assert not any(k.startswith(("mis_top2_swap", "mis_conf")) for k in out)
    assert "mis_top2" not in out
    assert out["zeroed_acc_a"] == 1.0


def test_unsafe_modality_names_are_rejected():
    labels = torch.tensor([0, 1])
    feats = {"a@1": torch.eye(2)[labels], "b": torch.eye(2)[labels]}
    with pytest.raises(ValueError, match="metric names"):
        modality_diagnostics(_balanced_fuse, feats, labels, 2, pairing_seed=0)
