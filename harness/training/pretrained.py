"""Pretrained encoders in a run: what their weights are (recorded with the run) and whether the inputs
are what the weights were trained on (their normalisation, their tokenizer).

Checked when the run's model is built (``trainer.build_run_model``), before any step:

* an encoder with ImageNet weights (``resnet18`` ``pretrained`` / ``pretrained_path``) expects inputs
  normalised with ImageNet's mean and std: the modality's transforms must end with that ``normalize``
  (``data.transforms.<m>.normalize: {preset: imagenet}``), else the run is refused with the line to add —
  weights fed unnormalised pixels silently lose most of what pretraining gave them;
* a text encoder naming a model (``hf_text`` ``model``) must use the vocabulary the dataset was
  tokenized with (the manifest's ``tokenizer`` identity, ``datasets/raw/text.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from midasbench.datasets.format import Manifest
from midasbench.datasets.raw.layout import RawDataError
from midasbench.datasets.raw.text import TOKENIZER_KEY, check_tokenizer, load_tokenizer
from midasbench.datasets.transforms import ModalityPipelines, Normalize
from midasbench.harness.config import RunConfig
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel, encoder_config_for
from midasbench.harness.training.unimodal_runs import state_sha256


def pretrained_tags(model: MultimodalModel) -> dict[str, str]:
    """``pretrained.<m>.source`` and ``pretrained.<m>.sha256`` (of the encoder's state as loaded) for
    every encoder whose weights came from elsewhere."""
    tags = {}
    for m, encoder in model.encoders.items():
        source = getattr(encoder, "pretrained_source", None)
        if source:
            tags[f"pretrained.{m}.source"] = str(source)
            tags[f"pretrained.{m}.sha256"] = state_sha256(encoder.state_dict())
    return tags


def _final_normalization(pipelines: ModalityPipelines, modality: str, phase: str) -> Normalize | None:
    steps = pipelines.steps.get(modality, {}).get(phase, ())
    last = steps[-1].transform if steps else None
    return last if isinstance(last, Normalize) else None


def check_normalization(pipelines: ModalityPipelines, model: MultimodalModel) -> None:
    """Refuse pretrained image weights whose inputs are not normalised as the weights expect."""
    for m, encoder in model.encoders.items():
        expected = getattr(encoder, "expected_normalization", None)
        if expected is None:
            continue
        for phase in ("train", "eval"):
            norm = _final_normalization(pipelines, m, phase)
            given = None if norm is None else (norm.p.mean, norm.p.std)
            if given is None or not all(np.allclose(g, e) for g, e in zip(given, expected, strict=True)):
                mean, std = list(expected[0]), list(expected[1])
                raise ConfigError(
                    f"data.transforms.{m}: encoder {m!r} has ImageNet weights ({encoder.pretrained_source}), "
                    f"which expect inputs normalised with mean {mean} and std {std}, but its {phase} "
                    f"transforms end with {given or 'no normalize'}; add "
                    f"`data.transforms.{m}.normalize: {{preset: imagenet}}`"
                )


def check_tokenizers(cfg: RunConfig, manifest: Manifest) -> None:
    """Refuse a pretrained text encoder whose vocabulary is not the one the dataset was tokenized with."""
    stored: dict[str, Any] = manifest.build_options.get(TOKENIZER_KEY, {}) or {}
    for m, identity in stored.items():
        if m not in manifest.modalities:
            continue
        component = encoder_config_for(cfg.model, m)
        name = component.params.get("model") if component.name == "hf_text" else None
        if name:
            try:
                check_tokenizer(identity, load_tokenizer(name), name, f"model.encoders.{m}")
            except RawDataError as exc:  # the encoder is the config's choice: a config error
                raise ConfigError(str(exc)) from None
