"""The ``mmtm`` model kind (``harness/models/mmtm.py``) and the encoders' stage interface: the MMTM block on
tiny tensors with values computed by hand, running means (training only, over ranks, checkpointed),
curation, encoders run stage by stage exactly as their ``forward``, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from tests_support_models import LinearEncoder

from midasbench.harness.config import ModelConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import build_encoder, encoder_stages
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.mmtm import MMTMBlock, MMTMModel, MMTMParams, excite, squeeze
from midasbench.harness.models.model import MODEL_KINDS

S3 = 1 / (1 + math.exp(-3))  # σ(3) = 0.952574…


def hand_block() -> MMTMBlock:
    """C_a = 2, C_b = 1, ratio 6: C_Z = ⌊2·3/6⌋ = 1; Z = relu(S_a0 + S_b0); E_a = 2σ([Z, 0]), E_b = 2σ(−Z)."""
    block = MMTMBlock({"a": 2, "b": 1}, ratio=6.0, gate_scale=2.0)
    with torch.no_grad():
        block.joint.weight.copy_(torch.tensor([[1.0, 0.0, 1.0]]))
        block.joint.bias.zero_()
        block.excitation["a"].weight.copy_(torch.tensor([[1.0], [0.0]]))
        block.excitation["a"].bias.zero_()
        block.excitation["b"].weight.copy_(torch.tensor([[-1.0]]))
        block.excitation["b"].bias.zero_()
    return block


def hand_inputs() -> dict[str, torch.Tensor]:
    # sample 0: A_a = [[1, 3], [2, 2]] → S_a = [2, 2]; A_b = [[0, 2]] → S_b = [1]; sample 1: all zeros
    a = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]]])
    return {"a": a, "b": b}


def mlp(inputs: int, hidden: list[int], out: int, **extra) -> torch.nn.Module:
    return build_encoder("mlp", (inputs,), "float32", {"hidden": hidden, "out_dim": out, **extra})


def tiny_mmtm(**params) -> MMTMModel:
    torch.manual_seed(0)
    encoders = {"a": mlp(4, [3], 3), "b": mlp(2, [3], 2)}
    return MMTMModel(encoders, ConcatFusion({"a": 3, "b": 2}, 3), 3, MMTMParams(**params))


# ---------------------------------------------------------------------------------------------- block


def test_squeeze_and_excite_average_over_frames_and_positions():
    # (B·T, C, S) with B = 1, T = 2 frames, C = 1, S = 2: S = mean(1, 3, 5, 7) = 4
    h = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])
    assert squeeze(h, batch_size=1).tolist() == [[4.0]]
    assert excite(h, torch.tensor([[0.5]]), batch_size=1).tolist() == [[[0.5, 1.5]], [[2.5, 3.5]]]


def test_block_gates_computed_by_hand():
    block = hand_block().eval()
    out = block(hand_inputs(), batch_size=2)
    # sample 0: Z = relu(2 + 1) = 3 → E_a = [2σ(3), 2σ(0)] = [1.905148, 1];
    # E_b = 2σ(−3) = 2(1 − σ(3)) = 0.094852
    torch.testing.assert_close(out["a"][0], torch.tensor([[2 * S3, 3 * 2 * S3], [2.0, 2.0]]))
    torch.testing.assert_close(out["b"][0], torch.tensor([[0.0, 2 * 2 * (1 - S3)]]))
    assert block.running["a"].count.item() == 0  # evaluation updates nothing


def test_running_means_are_cumulative_over_training_forwards_only():
    block = hand_block().train()
    block(hand_inputs(), batch_size=2)
    # step 1, batch means: E_a = ([2σ(3), 1] + [1, 1]) / 2 (sample 1: Z = 0 → 2σ(0) = 1),
    # E_b = (2(1 − σ(3)) + 1) / 2; S_a = ([2, 2] + [0, 0]) / 2 = [1, 1], S_b = (1 + 0) / 2 = 0.5
    gate_a1 = torch.tensor([(2 * S3 + 1) / 2, 1.0])
    torch.testing.assert_close(block.running["a"].gate, gate_a1)
    torch.testing.assert_close(block.running["b"].gate, torch.tensor([(2 * (1 - S3) + 1) / 2]))
    torch.testing.assert_close(block.running["a"].squeeze, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(block.running["b"].squeeze, torch.tensor([0.5]))
    block({m: x[1:] for m, x in hand_inputs().items()}, batch_size=1)  # step 2: E_a = [1, 1]
    # avg = (avg·1 + [1, 1]) / 2
    torch.testing.assert_close(block.running["a"].gate, (gate_a1 + 1) / 2)
    assert block.running["a"].count.item() == 2
    block.eval()(hand_inputs(), batch_size=2)
    assert block.running["a"].count.item() == 2


def test_the_reducer_makes_the_means_global():
    # a second rank with the same samples: Σ gates, Σ squeezes and the count double, the means do not
    calls = []

    def twice(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return 2 * t

    block = hand_block().train()
    block(hand_inputs(), batch_size=2, reducer=twice)
    assert len(calls) == 1 and calls[0][-1].item() == 2.0  # one collective per block; the count is last
    torch.testing.assert_close(block.running["a"].gate, torch.tensor([(2 * S3 + 1) / 2, 1.0]))


def test_curation_replaces_the_gate_by_its_running_mean_and_cuts_the_cross_modal_path():
    block = hand_block().train()
    inputs = {m: x.clone().requires_grad_(True) for m, x in hand_inputs().items()}
    out = block(inputs, batch_size=2, curated="a")
    # the mean is updated first (this batch's gates), then used: sample 0's a scaled by [(2σ(3) + 1)/2, 1]
    g = (2 * S3 + 1) / 2
    torch.testing.assert_close(out["a"][0], torch.tensor([[g, 3 * g], [2.0, 2.0]]))
    torch.testing.assert_close(out["b"][0], torch.tensor([[0.0, 2 * 2 * (1 - S3)]]))  # b as before
    out["a"].sum().backward()
    assert inputs["b"].grad is None or not inputs["b"].grad.any()  # nothing of b reaches a
    eval_out = block.eval()(hand_inputs(), batch_size=2, curated="a")  # evaluation: the normal forward
    torch.testing.assert_close(eval_out["a"][0], torch.tensor([[2 * S3, 3 * 2 * S3], [2.0, 2.0]]))


def test_an_absent_modality_takes_part_through_its_running_squeeze():
    block = hand_block().train()
    block(hand_inputs(), batch_size=2)  # running S_b = 0.5
    out = block.eval()({"a": hand_inputs()["a"][:1]}, batch_size=1)
    # Z = relu(2 + 0.5) = 2.5 → E_a = [2σ(2.5), 1]
    e = 2 / (1 + math.exp(-2.5))
    assert set(out) == {"a"}
    torch.testing.assert_close(out["a"][0], torch.tensor([[e, 3 * e], [2.0, 2.0]]))


# ---------------------------------------------------------------------------------------------- model


def test_model_places_a_block_after_every_shared_stage_and_keeps_features_float32():
    model = tiny_mmtm()
    assert list(model.mmtm) == ["0", "1"]
    assert model.mmtm["0"].channels == {"a": 3, "b": 3} and model.mmtm["1"].channels == {"a": 3, "b": 2}
    # C_Z = ⌊2·(3 + 2)/4⌋ = 2
    assert model.mmtm["1"].joint.out_features == 2
    assert list(tiny_mmtm(stages=[1]).mmtm) == ["1"]
    x = {"a": torch.randn(5, 4), "b": torch.randn(5, 2)}
    features = model.encode(x)
    assert {m: (f.shape, f.dtype) for m, f in features.items()} == {
        "a": (torch.Size([5, 3]), torch.float32),
        "b": (torch.Size([5, 2]), torch.float32),
    }
    assert model(x).shape == (5, 3) and model.fuse(features).shape == (5, 3)
    assert set(model.encode(x, ["b"])) == {"b"}
    with pytest.raises(ConfigError, match=r"mmtm stages \[2\]: the encoders share only stages 0-1"):
        tiny_mmtm(stages=[2])


def test_bypass_and_main_parameters():
    model = tiny_mmtm()
    bypass = {id(p) for p in model.bypass_parameters("a")}
    expected = [*model.mmtm["0"].joint.parameters(), *model.mmtm["0"].excitation["a"].parameters()]
    expected += [*model.mmtm["1"].joint.parameters(), *model.mmtm["1"].excitation["a"].parameters()]
    assert bypass == {id(p) for p in expected}
    assert {id(p) for p in model.main_parameters("b")} == {id(p) for p in model.encoders["b"].parameters()}


def test_cross_modal_flow_and_curation_in_the_model():
    model = tiny_mmtm().train()
    x = {"a": torch.randn(4, 4), "b": torch.randn(4, 2, requires_grad=True)}
    model.encode(x)["a"].sum().backward()
    assert x["b"].grad is not None and x["b"].grad.abs().sum() > 0  # b reaches a through the blocks
    x["b"].grad = None
    model.set_curation("a")
    model.encode(x)["a"].sum().backward()
    assert x["b"].grad is None or not x["b"].grad.any()
    with pytest.raises(ValueError, match="'c' is not one of"):
        model.set_curation("c")


def test_running_means_checkpoint_and_resume_exactly():
    model = tiny_mmtm().train()
    x = {"a": torch.randn(4, 4), "b": torch.randn(4, 2)}
    model.encode(x)
    model.encode(x)
    clone = tiny_mmtm()
    clone.load_state_dict(model.state_dict())
    assert clone.mmtm["1"].running["b"].count.item() == 2
    torch.testing.assert_close(clone.mmtm["1"].running["b"].gate, model.mmtm["1"].running["b"].gate)
    model.set_curation("b")
    clone.train().set_curation("b")
    torch.testing.assert_close(clone.encode(x)["b"], model.encode(x)["b"], rtol=0, atol=0)


def test_registered_kind_names_an_encoder_without_stages():
    fusion = ConcatFusion({"a": 3, "b": 4}, 3)
    encoders = {"a": mlp(4, [3], 3), "b": build_encoder("transformer", (5, 4), "float32", {"d_model": 4})}
    cfg = ModelConfig(encoders={"b": {"name": "transformer", "params": {"d_model": 4}}})
    with pytest.raises(
        ConfigError, match=r"model\.encoders\.b: encoder 'transformer' cannot be run stage by"
    ):
        MODEL_KINDS.get("mmtm").factory(encoders, fusion, 3, cfg, MMTMParams())
    with pytest.raises(ConfigError, match=r"model\.encoders\.a: encoder 'LinearEncoder'"):
        MMTMModel({"a": LinearEncoder(4, 3), "b": mlp(2, [3], 3)}, ConcatFusion({"a": 3, "b": 3}, 3), 3)
    with pytest.raises(ConfigError, match="two or more modalities"):
        MMTMModel({"a": mlp(4, [3], 3)}, ConcatFusion({"a": 3}, 3), 3)


# ------------------------------------------------------------------------------------- encoder stages


def run_stages(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    stages = encoder_stages(encoder)
    h = stages.prepare(x)
    for stage in stages.modules:
        h = stage(h)
    return stages.finish(h, x.shape[0])


def test_mlp_stages_are_its_blocks_and_reproduce_forward_bit_for_bit():
    torch.manual_seed(0)
    encoder = mlp(12, [5, 6], 7, input_batchnorm=True, dropout=0.1).eval()
    stages = encoder_stages(encoder)
    assert stages.channels == (5, 6, 7) and len(stages.modules) == 3
    x = torch.randn(8, 12)
    assert torch.equal(run_stages(encoder, x), encoder(x))
    ints = torch.randint(0, 255, (3, 12), dtype=torch.uint8)  # raw pixels go through the same conversion
    assert torch.equal(run_stages(encoder, ints), encoder(ints))


@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (2, 3, 8, 8)])
def test_resnet18_stages_reproduce_forward_bit_for_bit(shape):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", shape, "float32", {}).eval()
    assert encoder_stages(encoder).channels == (64, 128, 256, 512)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(run_stages(encoder, x), encoder(x))


def test_encoders_without_the_interface_and_mlp_state_dict_keys_unchanged():
    transformer = build_encoder("transformer", (5, 4), "float32", {"d_model": 4})
    assert encoder_stages(transformer) is None
    # the stage interface adds no parameter or buffer: checkpoints keep their keys
    assert list(mlp(4, [3], 2).state_dict()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
