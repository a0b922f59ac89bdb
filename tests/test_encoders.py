"""Encoder zoo: every registered encoder builds, has the promised output shape and trains end to end.

The per-encoder cases below are keyed by registry name and checked against ``ENCODERS.names()``, so a new
encoder cannot be registered without also getting a tiny case here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import ENCODERS, build_encoder

# transformers is imported lazily by the hf_text factory, i.e. after this line; never reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


def _float_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape)


def _token_ids(shape: tuple[int, ...]) -> torch.Tensor:
    ids = torch.randint(1, TINY_BERT["vocab_size"], shape)
    ids[0, -3:] = 0  # some padding, so the attention mask is exercised
    return ids


@dataclass(frozen=True)
class Case:
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 3  # >= 2 for BatchNorm in training mode
    make_input: Callable[[tuple[int, ...]], torch.Tensor] = _float_input


CASES: dict[str, Case] = {
    "mlp": Case((3, 4), params={"hidden": [8, 8], "out_dim": 5, "dropout": 0.1, "activation": "gelu"}),
    "resnet18": Case((1, 32, 32)),
    "transformer": Case((10, 6), params={"d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32}),
    "hf_text": Case((12,), "int64", params={"config": TINY_BERT}, make_input=_token_ids),
    "identity": Case((2, 3)),  # no parameters: the frozen-feature track's stored features
}


def _case(name: str) -> Case:
    if name not in CASES:
        pytest.fail(f"encoder {name!r} has no test case in CASES")
    return CASES[name]


def _build(name: str, shape: tuple[int, ...], dtype: str = "float32", **params: Any) -> nn.Module:
    return build_encoder(name, shape, dtype, params, key=f"model.encoders.{name}.params")


def _assert_all_grads_finite(module: nn.Module) -> None:
    for pname, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"


def test_every_registered_encoder_has_a_case() -> None:
    assert set(CASES) == set(ENCODERS.names())


@pytest.mark.parametrize("name", ENCODERS.names())
def test_forward_shape_and_gradients(name: str) -> None:
    case = _case(name)
    torch.manual_seed(0)
    encoder = build_encoder(name, case.input_shape, case.input_dtype, case.params)
    assert isinstance(encoder.out_dim, int)
    x = case.make_input((case.batch_size, *case.input_shape))
    out = encoder(x)
    assert out.shape == (case.batch_size, encoder.out_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # hf_text is built with add_pooling_layer=False where the model supports it (BERT does), so no unused
    # pooler parameters remain and every parameter must receive a gradient.
    if any(p.requires_grad for p in encoder.parameters()):
        out.pow(2).mean().backward()
        _assert_all_grads_finite(encoder)


@pytest.mark.parametrize("name", ENCODERS.names())
def test_unknown_param_key_is_a_config_error(name: str) -> None:
    case = _case(name)
    with pytest.raises(ConfigError, match="bogus_key"):
        build_encoder(name, case.input_shape, case.input_dtype, {**case.params, "bogus_key": 1})


# --- mlp ---------------------------------------------------------------------------------------------


def test_mlp_defaults_and_flattening() -> None:
    encoder = _build("mlp", (12,))
    assert encoder.out_dim == 128
    assert encoder(torch.randn(2, 12)).shape == (2, 128)
    assert (encoder(torch.randn(2, 12)) >= 0).all()  # final ReLU: features, not logits


def test_mlp_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="dropout"):
        _build("mlp", (4,), dropout=1.0)
    with pytest.raises(ConfigError, match="activation"):
        _build("mlp", (4,), activation="tanh")


# --- resnet18 ----------------------------------------------------------------------------------------


def test_resnet18_video() -> None:
    torch.manual_seed(0)
    encoder = _build("resnet18", (3, 2, 32, 32))
    out = encoder(torch.randn(2, 3, 2, 32, 32))
    assert out.shape == (2, 512)
    out.sum().backward()
    _assert_all_grads_finite(encoder)


def test_resnet18_video_pools_frames_like_images() -> None:
    """In eval mode the video feature is the mean of the per-frame image features (same-size maps)."""
    torch.manual_seed(0)
    video_enc = _build("resnet18", (3, 2, 32, 32)).eval()
    image_enc = _build("resnet18", (3, 32, 32)).eval()
    image_enc.load_state_dict(video_enc.state_dict())
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        expected = torch.stack([image_enc(x[:, :, t]) for t in range(2)]).mean(0)
        torch.testing.assert_close(video_enc(x), expected)


def test_resnet18_spectrogram_without_channel_axis() -> None:
    encoder = _build("resnet18", (16, 24))
    assert encoder.conv1.in_channels == 1
    assert encoder(torch.randn(2, 16, 24)).shape == (2, 512)


def test_resnet18_uint8_is_scaled() -> None:
    torch.manual_seed(0)
    encoder = _build("resnet18", (3, 32, 32), "uint8").eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder(x.float() / 255))


@pytest.mark.parametrize("shape", [(4, 32, 32), (3,), (1, 2, 3, 4, 5)])
def test_resnet18_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(shape))):
        _build("resnet18", shape)


def test_resnet18_keeps_torchvision_names() -> None:
    encoder = _build("resnet18", (3, 32, 32))
    reference = torchvision.models.resnet18(weights=None)
    assert set(encoder.state_dict()) == set(reference.state_dict()) - {"fc.weight", "fc.bias"}


def test_resnet18_pretrained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)

    gray = _build("resnet18", (1, 32, 32), pretrained_path=str(path))
    assert gray.conv1.weight.shape == (64, 1, 7, 7)  # 3-channel conv1 skipped, fresh 1-channel kept
    torch.testing.assert_close(gray.layer1[0].conv1.weight, reference.layer1[0].conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(gray.bn1.running_var, reference.bn1.running_var, rtol=0, atol=0)

    rgb = _build("resnet18", (3, 32, 32), pretrained_path=str(path))
    torch.testing.assert_close(rgb.conv1.weight, reference.conv1.weight, rtol=0, atol=0)


def test_resnet18_pretrained_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError, match=re.escape("nope.pt")):
        _build("resnet18", (3, 32, 32), pretrained_path=str(missing))


def test_resnet18_pretrained_wrong_names_is_an_error(tmp_path: Path) -> None:
    """A checkpoint with foreign key names must not silently leave the encoder random."""
    state = {f"module.{k}": v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    path = tmp_path / "prefixed.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=re.escape("prefixed.pt")):
        _build("resnet18", (3, 32, 32), pretrained_path=str(path))


# --- transformer -------------------------------------------------------------------------------------


def test_transformer_lengths_mask_the_padding_and_nothing_else() -> None:
    """With lengths, frames past a row's length change nothing (masked attention + masked mean), whatever
    they hold; a frame inside the length does change the features."""
    torch.manual_seed(0)
    encoder = _build("transformer", (10, 6), d_model=16, nhead=2, num_layers=2, dim_feedforward=32).eval()
    x = torch.randn(2, 6, 6)
    lengths = torch.tensor([6, 4])
    garbage = torch.cat([x, 100 * torch.randn(2, 4, 6)], dim=1)
    garbage[1, 4:] = 50.0  # row 1 is 4 frames long: its frames 4.. are padding too
    with torch.no_grad():
        reference = torch.stack([encoder(x[:1]).squeeze(0), encoder(x[1:, :4]).squeeze(0)])
        torch.testing.assert_close(encoder(garbage, lengths), reference, rtol=1e-5, atol=1e-5)
        changed = garbage.clone()
        changed[1, 3] += 1.0  # inside row 1's length
        assert not torch.allclose(encoder(changed, lengths)[1], reference[1])
        torch.testing.assert_close(encoder(changed, lengths)[0], reference[0], rtol=1e-5, atol=1e-5)


def test_transformer_without_lengths_reads_every_frame_even_all_zero_ones() -> None:
    """No padding heuristic: a real all-zero frame is data (MOSI features hold such frames)."""
    torch.manual_seed(0)
    encoder = _build("transformer", (5, 3), d_model=8, nhead=2).eval()
    x = torch.zeros(1, 5, 3)
    with torch.no_grad():
        out = encoder(x)
        h = encoder.encoder(encoder.input_proj(x) + encoder.pos_embedding[:, :5])
        torch.testing.assert_close(out, h.mean(dim=1))
        assert not torch.allclose(
            encoder(torch.randn(1, 3, 3)), encoder(torch.cat([torch.randn(1, 3, 3), x[:, :2]], 1))
        )


def test_transformer_validates_heads_and_shape() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        _build("transformer", (10, 6), d_model=10, nhead=4)
    with pytest.raises(ValueError, match=re.escape("(10, 6, 2)")):
        _build("transformer", (10, 6, 2))


# --- hf_text -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"model": "some/model", "config": TINY_BERT}])
def test_hf_text_needs_exactly_one_source(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        _build("hf_text", (12,), "int64", **params)


def test_hf_text_from_local_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _build("hf_text", (12,), "int64", config=TINY_BERT).eval()
    source.backbone.save_pretrained(tmp_path)
    loaded = _build("hf_text", (12,), "int64", model=str(tmp_path)).eval()
    assert loaded.out_dim == TINY_BERT["hidden_size"]
    ids = _token_ids((2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), source(ids))


def test_hf_text_mean_pooling_ignores_padding() -> None:
    torch.manual_seed(0)
    encoder = _build("hf_text", (12,), "int64", config=TINY_BERT, pooling="mean").eval()
    ids = _token_ids((2, 12))
    with torch.no_grad():
        hidden = encoder.backbone(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        torch.testing.assert_close(encoder(ids)[0], hidden[0, :-3].mean(dim=0))


def test_hf_text_freeze() -> None:
    encoder = _build("hf_text", (12,), "int64", config=TINY_BERT, freeze=True)
    encoder.train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.backbone.training  # frozen backbone stays a deterministic feature extractor


def test_mlp_input_batchnorm_standardises_raw_inputs() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("mlp", (3, 4), "float32", {"input_batchnorm": True, "hidden": []})
    first = encoder.net[0]
    assert isinstance(first, torch.nn.BatchNorm1d)
    x = 50.0 + 7.0 * torch.randn(256, 3, 4)  # far from zero mean / unit variance
    normalised = first(x.flatten(1))
    assert normalised.mean().abs() < 1e-4 and (normalised.std(dim=0) - 1).abs().max() < 0.01
