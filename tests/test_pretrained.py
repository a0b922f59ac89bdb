"""Pretrained encoders done properly: ImageNet weights fetched (or a clear offline message), their
normalisation required of the inputs, the projection, freezing, a separate lr, the weights' hash in the
run, the pad token from the model's config, sentence pairs' segment ids, and the tokenizer check."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torchvision
from raw_fixtures import tiny_tokenizer

from midasbench.datasets.format import ModalitySpec
from midasbench.datasets.transforms import ModalityPipelines
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.encoders import IMAGENET_STATS, build_encoder

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def fake_imagenet(monkeypatch: pytest.MonkeyPatch) -> dict:
    """torchvision's download replaced by a seeded random ResNet-18 state (the tests stay offline)."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(type(WEIGHTS), "get_state_dict", lambda self, *a, **k: state)
    return state


def test_imagenet_weights_load_and_say_where_they_came_from(fake_imagenet: dict):
    encoder = build_encoder("resnet18", (3, 16, 16), "uint8", {"pretrained": "imagenet"})
    assert torch.equal(encoder.conv1.weight, fake_imagenet["conv1.weight"])
    assert encoder.pretrained_source == f"torchvision:{WEIGHTS}"
    assert encoder.expected_normalization == IMAGENET_STATS


def test_offline_imagenet_weights_say_how_to_give_a_local_copy(monkeypatch: pytest.MonkeyPatch):
    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(type(WEIGHTS), "get_state_dict", offline)
    with pytest.raises(ConfigError, match=r"could not fetch .*set pretrained_path to it"):
        build_encoder("resnet18", (3, 16, 16), "uint8", {"pretrained": "imagenet"})


def test_projection_and_freezing(fake_imagenet: dict):
    encoder = build_encoder(
        "resnet18", (3, 16, 16), "uint8", {"pretrained": "imagenet", "project_to": 8, "freeze": True}
    )
    assert encoder.out_dim == 8
    assert encoder(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 8)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"projection.weight", "projection.bias"}  # the trunk is fixed
    encoder.train()
    assert not encoder.bn1.training  # its BatchNorm keeps the weights' statistics


def test_an_encoders_lr_scale_gives_its_parameters_their_own_group(tiny_config):
    from midasbench.harness.training.trainer import TrainingRun

    run = TrainingRun(tiny_config("model.encoders={strong: {name: mlp, params: {lr_scale: 0.1}}}"))
    groups = run.optimizers.main.param_groups
    scaled = [g for g in groups if "@lr×0.1" in g["name"]]
    assert scaled and all(g["lr"] == pytest.approx(0.1 * run.cfg.optimizer.lr) for g in scaled)
    strong = {id(p) for p in run.model.encoders["strong"].parameters()}
    assert strong == {id(p) for g in scaled for p in g["params"]}
    run.optimizers.main.step()  # no gradients yet: a no-op, so the schedule may step after it
    for _ in range(run.cfg.scheduler.step_size):
        run.scheduler.step()  # the schedule scales every group alike: the ratio holds
    main_lr = next(g["lr"] for g in groups if "@lr×" not in g["name"])
    assert main_lr == pytest.approx(run.cfg.optimizer.lr * run.cfg.scheduler.gamma)
    assert all(g["lr"] == pytest.approx(0.1 * main_lr) for g in scaled)


def test_pretrained_image_weights_require_imagenet_normalisation(fake_imagenet: dict):
    from midasbench.harness.training.pretrained import check_normalization, pretrained_tags
    from midasbench.harness.training.unimodal_runs import state_sha256

    class Model:
        encoders: ClassVar = {
            "visual": build_encoder("resnet18", (3, 8, 8), "uint8", {"pretrained": "imagenet"})
        }

    spec = {"visual": ModalitySpec(dtype="uint8", shape=(3, 8, 8))}
    with pytest.raises(ConfigError, match=r"add `data.transforms.visual.normalize: \{preset: imagenet\}`"):
        check_normalization(ModalityPipelines({}, spec), Model())  # type: ignore[arg-type]
    wrong = ModalityPipelines({"visual": {"normalize": {"mean": [0.5], "std": [0.5]}}}, spec)
    with pytest.raises(ConfigError, match="end with"):
        check_normalization(wrong, Model())  # type: ignore[arg-type]
    check_normalization(ModalityPipelines({"visual": {"normalize": {"preset": "imagenet"}}}, spec), Model())  # type: ignore[arg-type]
    tags = pretrained_tags(Model())  # type: ignore[arg-type]
    assert tags["pretrained.visual.source"] == f"torchvision:{WEIGHTS}"
    assert tags["pretrained.visual.sha256"] == state_sha256(Model.encoders["visual"].state_dict())


TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "pad_token_id": 3,
}


def test_hf_text_reads_the_pad_token_from_the_models_config():
    encoder = build_encoder("hf_text", (6,), "int32", {"config": TINY_BERT})
    assert encoder.pad_token_id == 3  # not the old fixed 0


def test_a_sentence_pair_hands_segment_ids_to_the_model():
    torch.manual_seed(0)
    encoder = build_encoder("hf_text", (6, 2), "int32", {"config": TINY_BERT}).eval()
    ids = torch.tensor([[[5, 0], [6, 0], [7, 1], [8, 1]]])  # (B, L, 2): ids and segments
    lengths = torch.tensor([4])
    same_segment = ids.clone()
    same_segment[..., 1] = 0
    with torch.no_grad():
        assert not torch.allclose(encoder(ids, lengths), encoder(same_segment, lengths))
    with pytest.raises(ConfigError, match=r"\(L, 2\) for a sentence pair"):
        build_encoder("hf_text", (6, 3), "int32", {"config": TINY_BERT})


def test_a_text_encoder_with_another_vocabulary_is_refused(tmp_path: Path, tiny_config):
    from midasbench.datasets.raw.text import identity
    from midasbench.harness.training.pretrained import check_tokenizers

    cfg = tiny_config(
        f"model.encoders={{strong: {{name: hf_text, params: {{model: {tmp_path / 'other'}}}}}}}"
    )
    tiny_tokenizer(tmp_path / "other", ["bad", "day"])
    stored = identity(tiny_tokenizer(tmp_path / "built", ["good", "food"]), "built", 8).as_dict()

    class Manifest:
        modalities: ClassVar = {"strong": None}
        build_options: ClassVar = {"tokenizer": {"strong": stored}}

    with pytest.raises(ConfigError, match="tokenized with 'built'"):
        check_tokenizers(cfg, Manifest())  # type: ignore[arg-type]
    Manifest.build_options = {
        "tokenizer": {
            "strong": identity(tiny_tokenizer(tmp_path / "other2", ["bad", "day"]), "o", 8).as_dict()
        }
    }
    check_tokenizers(cfg, Manifest())  # type: ignore[arg-type]  # same vocabulary: accepted
