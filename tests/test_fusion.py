"""Fusion heads: every registered head builds for 2 and 3 modalities, decomposable heads' shares add up to
their logits, the others refuse with a clear error, and each head's mechanism matches values by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import (
    FUSIONS,
    ConcatFusion,
    FiLMFusion,
    FusionEntry,
    FusionHead,
    GatedFusion,
    NotDecomposableError,
    SumFusion,
    build_fusion,
    fusion_is_decomposable,
)
from midasbench.harness.registry import UnknownEntryError

# Small params per registered head, so every head is exercised and the suite stays fast.
PARAMS: dict[str, dict[str, Any]] = {
    "concat": {},
    "concat_mlp": {"hidden": 6, "dropout": 0.1},
    "sum": {},
    "film": {"hidden": 4},
    "gated": {"hidden": 4},
}
DIMS = {2: {"a": 3, "b": 5}, 3: {"a": 3, "b": 5, "c": 2}}
NUM_CLASSES = 4


def _features(dims: dict[str, int], batch: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {m: torch.randn(batch, d, generator=gen) for m, d in dims.items()}


def test_every_registered_head_has_a_case() -> None:
    assert sorted(PARAMS) == FUSIONS.names()


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("name", FUSIONS.names())
def test_head_shape_shares_and_flag(name: str, num_modalities: int) -> None:
    torch.manual_seed(0)
    dims = DIMS[num_modalities]
    head = build_fusion(name, dims, NUM_CLASSES, PARAMS[name])
    assert isinstance(head, FusionHead)
    assert head.modalities == list(dims) and head.feature_dims == dims
    assert FUSIONS.get(name).decomposable is type(head).decomposable is fusion_is_decomposable(name)
    head.eval()
    features = _features(dims)
    logits = head(features)
    assert logits.shape == (3, NUM_CLASSES)
    if head.decomposable:
        shares = head.modality_logits(features)
        assert list(shares) == list(dims)
        assert all(s.shape == (3, NUM_CLASSES) for s in shares.values())
        torch.testing.assert_close(sum(shares.values()), logits)
    else:
        with pytest.raises(NotDecomposableError, match=rf"'{name}'.*decomposable fusion heads: concat, sum"):
            head.modality_logits(features)
    # every parameter takes part in the logits
    head.train()
    head(features).sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_not_decomposable_error_is_a_value_error() -> None:
    assert issubclass(NotDecomposableError, ValueError)


def test_fusion_is_decomposable_flags_and_unknown_name() -> None:
    assert [n for n in FUSIONS.names() if fusion_is_decomposable(n)] == ["concat", "sum"]
    with pytest.raises(UnknownEntryError, match="unknown fusion 'nope'"):
        fusion_is_decomposable("nope")


def test_build_rejects_a_registry_flag_that_disagrees_with_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = FusionEntry(
        factory=lambda dims, c, p: ConcatFusion(dims, c),
        params=FUSIONS.get("concat").params,
        description="mislabelled",
        decomposable=False,
    )
    monkeypatch.setitem(FUSIONS._entries, "mislabelled", entry)
    with pytest.raises(TypeError, match="registered with decomposable=False"):
        build_fusion("mislabelled", {"a": 2}, 3, None)


def test_concat_shares_by_hand() -> None:
    head = ConcatFusion({"a": 1, "b": 2}, 1)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        head.linear.bias.copy_(torch.tensor([0.6]))
    features = {"a": torch.tensor([[2.0]]), "b": torch.tensor([[1.0, -1.0]])}
    shares = head.modality_logits(features)
    torch.testing.assert_close(shares["a"], torch.tensor([[2.3]]))  # 1·2 + 0.6/2
    torch.testing.assert_close(shares["b"], torch.tensor([[-0.7]]))  # 2·1 + 3·(−1) + 0.3
    torch.testing.assert_close(head(features), torch.tensor([[1.6]]))


def test_sum_shares_by_hand() -> None:
    head = SumFusion({"a": 1, "b": 2}, 1)
    with torch.no_grad():
        head.branches["a"].weight.copy_(torch.tensor([[2.0]]))
        head.branches["a"].bias.copy_(torch.tensor([1.0]))
        head.branches["b"].weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.branches["b"].bias.copy_(torch.tensor([0.5]))
    features = {"a": torch.tensor([[3.0]]), "b": torch.tensor([[4.0, 1.0]])}
    shares = head.modality_logits(features)
    torch.testing.assert_close(shares["a"], torch.tensor([[7.0]]))  # 2·3 + 1
    torch.testing.assert_close(shares["b"], torch.tensor([[3.5]]))  # 4 − 1 + 0.5
    torch.testing.assert_close(head(features), torch.tensor([[10.5]]))


def _set_fc_out(head: FiLMFusion | GatedFusion) -> None:
    head.fc_out.weight.copy_(torch.tensor([[1.0, 2.0]]))
    head.fc_out.bias.copy_(torch.tensor([0.25]))


def test_film_with_zero_gamma_gives_fc_out_of_beta() -> None:
    head = FiLMFusion({"a": 2, "b": 3}, 1, hidden=2)  # conditioner: the first modality, a
    assert head.conditioner == "a" and isinstance(head.project, torch.nn.Linear)  # 3 ≠ h = 2
    with torch.no_grad():
        head.film.weight.zero_()
        head.film.bias.copy_(torch.tensor([0.0, 0.0, 1.5, -2.0]))  # γ = 0, β = (1.5, −2)
        _set_fc_out(head)
    features = {"a": torch.randn(2, 2), "b": torch.randn(2, 3)}
    torch.testing.assert_close(head(features), torch.full((2, 1), -2.25))  # 1.5 − 4 + 0.25


def test_film_scales_the_unprojected_feature_when_its_size_is_hidden() -> None:
    head = build_fusion("film", {"a": 2, "b": 4}, 1, {"hidden": 2, "conditioner": "b"})
    assert isinstance(head, FiLMFusion) and isinstance(head.project, torch.nn.Identity)  # d_a == h
    with torch.no_grad():
        head.film.weight.zero_()
        head.film.bias.copy_(torch.tensor([2.0, -1.0, 0.0, 0.0]))  # γ = (2, −1), β = 0
        _set_fc_out(head)
    features = {"a": torch.tensor([[1.0, 3.0]]), "b": torch.randn(1, 4)}
    torch.testing.assert_close(head(features), torch.tensor([[-3.75]]))  # 1·2 + 2·(−3) + 0.25


@pytest.mark.parametrize(("bias", "expected"), [(-1e4, "fc_out bias"), (1e4, "fc_out(fc_rest)")])
def test_gated_saturated_gate(bias: float, expected: str) -> None:
    head = GatedFusion({"a": 3, "b": 2, "c": 1}, 1, hidden=2, gate="b")
    assert head.others == ["a", "c"]
    with torch.no_grad():
        head.fc_gate.weight.zero_()
        head.fc_gate.bias.fill_(bias)  # sigmoid → 0 or 1
        _set_fc_out(head)
    features = _features({"a": 3, "b": 2, "c": 1})
    if expected == "fc_out bias":
        want = torch.full((3, 1), 0.25)
    else:
        want = head.fc_out(head.fc_rest(torch.cat([features["a"], features["c"]], dim=1)))
    torch.testing.assert_close(head(features), want)


@pytest.mark.parametrize(("name", "key"), [("film", "conditioner"), ("gated", "gate")])
def test_unknown_conditioning_modality_is_a_config_error(name: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.fusion\.params\.{key}: unknown modality 'z'.*a, b"):
        build_fusion(name, {"a": 2, "b": 3}, 3, {key: "z"})


@pytest.mark.parametrize("name", ["film", "gated"])
def test_conditioned_heads_need_two_modalities(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.fusion\.name: fusion head '{name}' needs at least two"):
        build_fusion(name, {"a": 2}, 3, None)


def test_hidden_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"model\.fusion\.params\.hidden"):
        build_fusion("film", {"a": 2, "b": 3}, 3, {"hidden": 0})
