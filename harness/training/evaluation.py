"""The one evaluation path: encode a split once, run the method's prediction on the features, score it.

Validation, test, the modality diagnostics and a method's own passes over the training set
(``Runtime.encode_rows``) all use ``encode_rows``; predictions always come from
``Method.logits_from_features``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from midasbench.datasets.device_feed import DeviceFeed
from midasbench.datasets.format import SplitData
from midasbench.datasets.loader import BatchLoader
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.diagnostics import modality_diagnostics
from midasbench.harness.training.metrics import split_metrics
from midasbench.methods.base import Method


@torch.no_grad()
def encode_rows(
    model: MultimodalModel,
    split: SplitData,
    rows: np.ndarray,
    modalities: list[str],
    batch_size: int,
    feed: DeviceFeed | torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Encoder features (float32, on the feed's device, eval mode, the eval transforms) and labels of
    ``rows``, in the order given."""
    feed = as_feed(feed)
    device = feed.device
    was_training = model.training
    model.eval()
    try:
        rows = np.asarray(rows, dtype=np.int64)
        chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
        labels, index = [], []
        host_batches = BatchLoader(split, batch_size, shuffle=False).batches(rows)
        for batch in feed.batches(host_batches, epoch=None):
            features = model.encode(batch.inputs, modalities)
            for m in modalities:
                chunks[m].append(features[m])
            labels.append(batch.labels)
            index.append(batch.index)
        if not labels:
            empty = {m: torch.zeros(0, model.feature_dims[m], device=device) for m in modalities}
            return empty, torch.zeros(0, dtype=torch.long, device=device)
        # the loader reads each batch's rows sorted; put them back in the order asked for
        positions = _positions_in_request(rows, batch_size)
        features = {m: torch.cat(c)[positions] for m, c in chunks.items()}
        return features, torch.cat(labels)[positions]
    finally:
        model.train(was_training)


def as_feed(feed: DeviceFeed | torch.device) -> DeviceFeed:
    """A device stands for the plain feed to it (stored values, no transforms)."""
    return feed if isinstance(feed, DeviceFeed) else DeviceFeed(torch.device(feed))


def _positions_in_request(rows: np.ndarray, batch_size: int) -> torch.Tensor:
    """Where each requested row landed once every batch was read in sorted order."""
    out = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        order = np.argsort(chunk, kind="stable")  # the loader's order within the batch
        out[start + order] = start + np.arange(len(chunk))
    return torch.from_numpy(out)


def encode_split(
    model: MultimodalModel,
    split: SplitData,
    modalities: list[str],
    batch_size: int,
    feed: DeviceFeed | torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A whole split's features and labels, encoded once and reused by prediction and diagnostics."""
    return encode_rows(model, split, np.arange(len(split)), modalities, batch_size, feed)


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    method: Method,
    split: SplitData,
    batch_size: int,
    feed: DeviceFeed | torch.device,
    diagnostics_seed: int | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1, loss and subset accuracies over the whole split; with ``diagnostics_seed``, also
    the modality diagnostics (``harness/training/diagnostics.py``) on the same features, for every method."""
    was_training = model.training
    model.eval()
    try:
        modalities = method.eval_modalities(model)
        features, labels = encode_split(model, split, modalities, batch_size, feed)

        def head(f: dict[str, torch.Tensor]) -> torch.Tensor:
            return method.logits_from_features(model, f).float()

        def coalition(f: dict[str, torch.Tensor], kept: frozenset[str]) -> torch.Tensor:
            return method.coalition_logits(model, f, kept).float()

        if len(labels):
            logits = torch.cat(
                [
                    head({m: v[s : s + batch_size] for m, v in features.items()})
                    for s in range(0, len(labels), batch_size)
                ]
            )
            loss = F.cross_entropy(logits, labels, reduction="mean").item()
        else:
            logits, loss = torch.zeros(0, 1), float("nan")
        out = split_metrics(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), split.subsets)
        out["loss"] = loss
        if diagnostics_seed is not None and len(modalities) == len(model.modalities) > 1:
            out.update(
                modality_diagnostics(
                    head, features, labels, model.num_classes, diagnostics_seed, batch_size, coalition
                )
            )
        return out
    finally:
        model.train(was_training)
