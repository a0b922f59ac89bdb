"""Where a trained unimodal encoder comes from, and whether it fits this run.

Two users: UMT's frozen teachers (``methods/umt.py``) and ``model.init_encoders``, which starts any run's
encoders from earlier ``unimodal`` runs (the unimodal pre-training of ReconBoost's ``--use_pretrain`` and
MCR's ``--pre``).

A **source** is a string (``resolve_source``):

* a checkpoint folder of a ``unimodal`` run, or its ``best.pt``;
* an MLflow run id (``runs:/<id>`` or the bare 32-hex ``<id>``) of such a run, looked up in the store of
  this run's ``tracking.uri``; its checkpoint folder is the run's ``train.checkpoint_dir`` param (else the
  trainer's default ``.midasbench/checkpoints/<config.fingerprint>``, relative to the cwd).

The encoder is modality m's ``encoders.<m>.*`` state of the run's **best** checkpoint (``encoder_state``);
it must load into this run's encoder config for m, else a ``ConfigError`` names the file and the missing,
unexpected and mis-shaped keys (``load_encoder``). A unimodal run's checkpoint holds every modality's
encoder, the untrained ones as initialised; ``model.init_encoders`` refuses one that is, bit for bit, this
run's own initialisation (``never_trained``: a unimodal run of another modality, same seed and encoders).

**Fit** (``check_fits``; the source's split must be this run's, or test samples of this run's split leak
into the encoder):

* with an MLflow run (given by id, or the run id ``last.pt`` records, found in this run's tracking store
  when tracking is on), its tags must say ``unimodal[<m>]`` and give this run's dataset content hash
  (``dataset.content_sha256``) and train/val/test ids hashes (``split.<s>.ids_sha256``), else a
  ``ConfigError``; a different init ``seed`` is only warned about;
* with a folder alone the evidence is the config **fingerprint** its checkpoints hold (not the config, the
  dataset hash or the split ids): one equal to that of the expected unimodal config proves the same
  settings (dataset name/options, split protocol and seed, modality, init seed; a dataset rebuilt with
  other content under the same name would go unnoticed); any other fingerprint proves nothing, and the run
  warns that the split and modality cannot be verified (or refuses, by policy).
"""

from __future__ import annotations

import copy
import hashlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from midasbench.harness.errors import ConfigError
from midasbench.harness.training import checkpoint as ckpt

if TYPE_CHECKING:
    from midasbench.datasets.format import Manifest
    from midasbench.harness.config import RunConfig
    from midasbench.harness.models.model import MultimodalModel

_RUN_ID = re.compile(r"runs:/([^/\s]+)(/.*)?|([0-9a-f]{32})")
INIT_KEY = "model.init_encoders"


@dataclass
class UnimodalSource:
    """A unimodal run's best checkpoint and what is known of the run that wrote it."""

    best: Path  # the best.pt holding the encoder's weights
    state: dict[str, Any]  # its contents (fingerprint, epoch, model, method)
    tags: dict[str, str] | None  # the writing run's MLflow tags, when its run could be found
    where: str  # the config key it was given under, for messages


# ------------------------------------------------------------------------------------------- modalities


def modality_of(key: str | int, modalities: tuple[str, ...], where: str) -> str:
    """A modality name, or a 0-based position (an int, or digits after a JSON trip), as a modality name."""
    if isinstance(key, str) and key in modalities:
        return key
    if (isinstance(key, int) or key.isdigit()) and 0 <= int(key) < len(modalities):
        return modalities[int(key)]
    raise ConfigError(
        f"{where}: key {key!r} is neither a modality of this dataset "
        f"({', '.join(modalities)}) nor a position 0-{len(modalities) - 1}"
    )


def init_encoder_sources(entries: Mapping[str, str], modalities: tuple[str, ...]) -> dict[str, str]:
    """``model.init_encoders`` by modality name: every key a modality or a position, none twice."""
    sources: dict[str, str] = {}
    for key, spec in entries.items():
        m = modality_of(key, modalities, f"{INIT_KEY}.{key}")
        if m in sources:
            raise ConfigError(f"{INIT_KEY}.{key}: a second entry for modality {m!r}")
        sources[m] = spec
    return sources


# ------------------------------------------------------------------------------------------ the encoder


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', … ({len(keys)} in all)' if len(keys) > limit else ''}]"


def encoder_state(model_state: Mapping[str, torch.Tensor], modality: str, source: Path) -> dict[str, Any]:
    """Modality ``modality``'s encoder weights from a run's model state (``encoders.<m>.*``)."""
    prefix = f"encoders.{modality}."
    state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        found = sorted({k.split(".")[1] for k in model_state if k.startswith("encoders.")})
        raise ConfigError(
            f"{source}: holds no encoder for modality {modality!r} (no 'encoders.{modality}.*' keys; "
            f"encoders found: {found or 'none'}); give the checkpoint of a midasbench unimodal run"
        )
    return state


def load_encoder(
    encoder: nn.Module, state: Mapping[str, torch.Tensor], modality: str, source: Path, target: str
) -> None:
    """Load an encoder's weights, refusing a state that does not fit ``encoder`` (``target``'s encoder
    config for that modality): a ``ConfigError`` naming the file and the mismatched keys."""
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in {target}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{source}: the {modality!r} encoder there does not fit {target}'s encoder config "
            f"(model.encoders.{modality}, else model.default_encoder): missing keys {_listed(missing)}, "
            f"unexpected keys {_listed(unexpected)}, shape mismatches {_listed(shapes)}"
        )
    encoder.load_state_dict(dict(state))


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of an encoder state: each key (sorted), dtype, shape and the tensor's bytes, so the same
    weights give the same hash whatever file or dict order they came in."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- sources


def mlflow_run(run_id: str, uri: str) -> Any:
    """The one MLflow lookup (tests replace it with a stand-in store)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id)


def load_best(best: Path, where: str) -> dict[str, Any]:
    if not best.is_file():
        raise ConfigError(f"{where}: no checkpoint {best} (a finished run's folder holds best.pt)")
    state = ckpt.load(best)
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"{where}: {best} is not a midasbench checkpoint (no 'model' state)")
    return state


def source_from_run_id(run_id: str, uri: str, where: str) -> UnimodalSource:
    """An MLflow run's checkpoint folder (its ``train.checkpoint_dir`` param, else the trainer's default
    folder for its ``config.fingerprint`` tag, relative to the cwd) and its tags."""
    try:
        run = mlflow_run(run_id, uri)
    except Exception as exc:  # MLflow raises its own exception types (not found, bad store)
        raise ConfigError(f"{where}: no MLflow run {run_id!r} in the store {uri} ({exc})") from None
    tags, params = dict(run.data.tags), dict(run.data.params)
    folder = params.get("train.checkpoint_dir")
    if folder in (None, "None", ""):  # trainer.default_checkpoint_dir
        folder = str(Path(".midasbench") / "checkpoints" / tags.get("config.fingerprint", "?"))
    best = Path(folder) / ckpt.CheckpointDir.BEST
    return UnimodalSource(best, load_best(best, where), tags, where)


def source_from_path(path: Path, where: str, tracking_uri: str | None) -> UnimodalSource:
    """A checkpoint folder or its ``best.pt``; the tags of the MLflow run its ``last.pt`` names, when
    ``tracking_uri`` is given and that store has the run."""
    folder, best = (path, path / ckpt.CheckpointDir.BEST) if path.is_dir() else (path.parent, path)
    state = load_best(best, where)
    tags = None
    last = folder / ckpt.CheckpointDir.LAST
    if tracking_uri is not None and last.is_file():
        run_id = ckpt.load(last).get("run_id")
        if run_id:
            try:
                tags = dict(mlflow_run(run_id, tracking_uri).data.tags)
            except Exception:  # the run lives in another store: fall back on the fingerprint
                tags = None
    return UnimodalSource(best, state, tags, where)


def resolve_source(spec: str, where: str, cfg: RunConfig | None) -> UnimodalSource:
    """A source string: a folder, a ``best.pt``, or an MLflow run id (``runs:/<id>`` or ``<id>``)."""
    from midasbench.harness.tracking import resolve_tracking_uri

    path = Path(spec)
    if path.exists():
        uri = resolve_tracking_uri(cfg.tracking.uri) if cfg is not None and cfg.tracking.enabled else None
        return source_from_path(path, where, uri)
    match = _RUN_ID.fullmatch(spec.strip())
    if match:
        uri = resolve_tracking_uri(cfg.tracking.uri if cfg is not None else None)
        return source_from_run_id(match.group(1) or match.group(3), uri, where)
    raise ConfigError(
        f"{where}: {spec!r} is neither an existing checkpoint folder or best.pt of a unimodal run, nor an "
        "MLflow run id (runs:/<id> or the 32-hex <id>)"
    )


# -------------------------------------------------------------------------------------------------- fit


def tag_problems(
    tags: Mapping[str, str], source: UnimodalSource, modality: str, manifest: Manifest | None
) -> list[str]:
    """Why an MLflow run's tags (``TrainingRun.run_tags``) say its checkpoint is not this run's unimodal
    run of ``modality``: not ``unimodal[<m>]``, a checkpoint of another config, another dataset or split."""
    problems = []
    if tags.get("method.name") != "unimodal" or tags.get("method.label") != f"unimodal[{modality}]":
        label = tags.get("method.label", tags.get("method.name"))
        problems.append(f"it is run {label!r}, not 'unimodal[{modality}]'")
    if tags.get("config.fingerprint") not in (None, source.state.get("fingerprint")):
        problems.append(
            f"{source.best} holds a checkpoint of config {source.state.get('fingerprint')}, "
            f"the run's is {tags['config.fingerprint']}"
        )
    if manifest is None:
        return problems
    if tags.get("dataset.content_sha256") != manifest.content_sha256:
        problems.append("its dataset content hash (dataset.content_sha256) is not this run's")
    return problems + [
        f"its {s} split ids (split.{s}.ids_sha256) are not this run's"
        for s, info in manifest.splits.items()
        if tags.get(f"split.{s}.ids_sha256") != info.ids_sha256
    ]


def check_fits(
    source: UnimodalSource,
    modality: str,
    manifest: Manifest | None,
    expected_fingerprint: str | None,
    seed: int | None,
    policy: Literal["warn", "error"],
    *,
    role: str,
    policy_key: str | None = None,
) -> None:
    """The source must be a unimodal run of ``modality`` on this run's split. Proven by the MLflow tags
    (dataset hash, split ids hashes) where there are tags, else by a fingerprint equal to
    ``expected_fingerprint`` (the unimodal config of this run's settings); otherwise unverifiable (a
    warning, or by policy an error naming ``policy_key``). ``role`` names the source in messages."""
    if source.tags is not None:
        problems = tag_problems(source.tags, source, modality, manifest)
        if problems:
            raise ConfigError(f"{source.where}: the {role} does not fit this run: {'; '.join(problems)}")
        if seed is not None and source.tags.get("seed") not in (None, str(seed)):
            warnings.warn(
                f"{source.where}: the {role} was trained with seed {source.tags['seed']}, "
                f"this run uses {seed}",
                stacklevel=2,
            )
        if manifest is not None:
            return
    elif expected_fingerprint is not None and source.state.get("fingerprint") == expected_fingerprint:
        return
    message = (
        f"{source.where}: cannot verify that the {role} {source.best} is a unimodal[{modality}] run on "
        f"this run's split: the checkpoint folder holds only a config fingerprint "
        f"({source.state.get('fingerprint')}; a unimodal[{modality}] run of this run's settings would be "
        f"{expected_fingerprint}), no dataset hash or split ids, and no MLflow run of it was found (give its "
        "MLflow run id, or train it with this run's settings, to have it checked)"
    )
    if policy == "error":
        raise ConfigError(f"{message}; {policy_key or 'policy'}=error")
    warnings.warn(message, stacklevel=2)


# ---------------------------------------------------------------------------------- model.init_encoders


def never_trained(
    encoder: nn.Module, state: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]
) -> bool:
    """Whether a trainable encoder's loaded ``state`` is, bit for bit, ``initial`` (this run's own fresh
    initialisation): a unimodal run holds every encoder, the ones it did not train as initialised, and
    with this run's seed and encoder config that is exactly this run's draw (trained weights never are)."""
    trainable = any(p.requires_grad for p in encoder.parameters())
    return (
        trainable
        and state.keys() == initial.keys()
        and all(torch.equal(initial[k], v) for k, v in state.items())
    )


def unimodal_fingerprint(cfg: RunConfig, modality: str) -> str | None:
    """The fingerprint of ``cfg`` as a from-scratch ``unimodal`` run of ``modality`` (the pre-training
    run of this run's settings), or None where such a config does not validate."""
    from midasbench.harness.config import build_config

    data = copy.deepcopy(cfg.to_dict())
    data["method"] = {"name": "unimodal", "params": {"modality": modality}}
    data["model"]["init_encoders"] = {}
    try:
        return build_config(data).fingerprint()
    except ConfigError:
        return None


def load_init_encoders(
    model: MultimodalModel, cfg: RunConfig, manifest: Manifest, sources: Mapping[str, str]
) -> dict[str, str]:
    """Load ``model.init_encoders`` (by modality, ``init_encoder_sources``) into ``model``'s encoders,
    each checked to fit this run; the provenance tags (``init_encoders.<m>.source`` / ``.checkpoint`` /
    ``.fingerprint`` / ``.sha256``, the last over the loaded encoder state, ``state_sha256``)."""
    tags: dict[str, str] = {}
    fresh = {m: {k: v.clone() for k, v in model.encoders[m].state_dict().items()} for m in sources}
    for m, spec in sources.items():
        where = f"{INIT_KEY}.{m}"
        source = resolve_source(spec, where, cfg)
        expected = unimodal_fingerprint(cfg, m)
        check_fits(source, m, manifest, expected, cfg.train.seed, "warn", role="encoder source")
        state = encoder_state(source.state["model"], m, source.best)
        encoder = model.encoders[m]
        load_encoder(encoder, state, m, source.best, target="this run")
        if never_trained(encoder, state, fresh[m]):
            raise ConfigError(
                f"{where}: the {m!r} encoder in {source.best} is its initialisation, bit for bit: that run "
                f"never trained it (a unimodal run of another modality?); give a unimodal[{m}] run"
            )
        tags.update(
            {
                f"init_encoders.{m}.source": spec,
                f"init_encoders.{m}.checkpoint": str(source.best),
                f"init_encoders.{m}.fingerprint": str(source.state.get("fingerprint")),
                f"init_encoders.{m}.sha256": state_sha256(state),
            }
        )
    return tags
