"""The frozen-feature track: run a config's encoders once over every split of its dataset and store
the embeddings as a new canonical dataset (``midasbench data extract``).

Heads tuned on frozen embeddings are swept by the hundred; encoding the inputs in every trial would
spend nearly all of it in the encoders. The extracted dataset keeps the source's classes, sample ids,
splits and subsets; each modality becomes a float32 feature vector (``kind: features``). Its manifest
records where the features came from under ``build_options.frozen_features``: the source dataset (name,
content hash, split), and per modality the encoder (name, params), the weights' sha256 and
``model.init_encoders``' source if one was given. Train on it with the ``identity`` encoder
(``'model.default_encoder={name: identity}'``: heads only); runs on it are tagged
``dataset.track = frozen-features`` and, being another dataset, never share a column of a report with
end-to-end runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from midasbench.datasets.builders import default_data_root
from midasbench.datasets.format import (
    FROZEN_FEATURES_KEY,
    SPLIT_NAMES,
    ArrowDataset,
    ModalitySpec,
    SplitArrays,
)
from midasbench.datasets.writer import DatasetWriter
from midasbench.harness.config import RunConfig
from midasbench.harness.models.model import MultimodalModel, encoder_config_for
from midasbench.harness.training.evaluation import encode_rows
from midasbench.harness.training.trainer import _device, build_run_model, dataset_path, run_feed
from midasbench.harness.training.unimodal_runs import state_sha256


def frozen_provenance(
    cfg: RunConfig, source: ArrowDataset, model: MultimodalModel, tags: dict[str, str]
) -> dict:
    """What the features are: the source dataset and, per modality, the encoder and its weights."""
    m = source.manifest
    encoders: dict[str, Any] = {}
    for modality, encoder in model.encoders.items():
        component = encoder_config_for(cfg.model, modality)
        encoders[modality] = {
            "encoder": component.name,
            "params": component.params,
            "weights_sha256": state_sha256(encoder.state_dict()),
            "init_source": tags.get(f"init_encoders.{modality}.source"),
            "seed": cfg.train.seed,
        }
    return {
        "source": {
            "name": m.name,
            "content_sha256": m.content_sha256,
            "split": m.split_protocol,
            "split_seed": m.split_seed,
        },
        "encoders": encoders,
        # the eval transforms the inputs went through (data.transforms), part of what the features are
        "transforms": {m: t.model_dump(mode="json") for m, t in cfg.data.transforms.items()},
    }


def extract_features(
    cfg: RunConfig, *, name: str, root: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Encode every split of ``cfg``'s dataset with ``cfg``'s encoders (eval mode, seeded init, then
    ``model.init_encoders``) and write the features as the dataset ``name``; returns its directory."""
    source = ArrowDataset(dataset_path(cfg))
    manifest = source.manifest
    model, tags = build_run_model(cfg, manifest)  # as a training run of cfg starts it
    device = _device(cfg.train.device)
    model = model.to(device).eval()
    feed = run_feed(cfg, manifest, device)  # the eval transforms, as validation sees the inputs
    target = (
        Path(out) if out is not None else (Path(root) if root is not None else default_data_root()) / name
    )
    specs = {
        m: ModalitySpec(dtype="float32", shape=(d,), kind="features") for m, d in model.feature_dims.items()
    }
    batch = cfg.train.eval_batch_size
    with DatasetWriter(
        target,
        name=name,
        version="features-1",
        classes=manifest.classes,
        modalities=specs,
        subsets=manifest.subsets,
        description=f"frozen features of {manifest.name}",
        build_options={FROZEN_FEATURES_KEY: frozen_provenance(cfg, source, model, tags)},
    ) as writer:
        for split_name in SPLIT_NAMES:
            data = source.split(split_name)
            with writer.split(split_name) as sink:
                for start in range(0, len(data), batch):
                    rows = np.arange(start, min(start + batch, len(data)))
                    features, _ = encode_rows(model, data, rows, model.modalities, batch, feed)
                    sink.append(
                        SplitArrays(
                            ids=data.ids[rows],
                            labels=data.labels[rows],
                            modalities={m: f.cpu().numpy() for m, f in features.items()},
                            subsets={s: data.subsets[s][rows] for s in manifest.subsets},
                        )
                    )
        writer.finish(split_protocol=manifest.split_protocol, split_seed=manifest.split_seed)
    return target
