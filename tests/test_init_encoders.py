"""``model.init_encoders``: any run's encoders start from earlier ``unimodal`` runs (harness/training/
unimodal_runs.py): the weights at build are the unimodal run's best, bit for bit, and nothing else moves;
provenance tags; the fingerprint; clear errors for a bad key, a missing source and an encoder that does not
fit; resume after a crash equals the uninterrupted run."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from crash_support import Crash, crash_after

from midasbench.harness.errors import ConfigError
from midasbench.harness.tracking import flatten
from midasbench.harness.training import checkpoint as ckpt
from midasbench.harness.training import unimodal_runs
from midasbench.harness.training.trainer import TrainingRun, default_checkpoint_dir, train

ONE_EPOCH = "train.epochs=1"


def init(**sources: Path | str) -> str:
    return "model.init_encoders={" + ", ".join(f"{k}: '{v}'" for k, v in sources.items()) + "}"


@pytest.fixture
def strong_run(tiny_config, tmp_path) -> Path:
    """A finished 1-epoch ``unimodal[strong]`` run on the tiny synthetic data: its checkpoint folder."""
    folder = tmp_path / "unimodal-strong"
    train(
        tiny_config(
            "method.name=unimodal",
            "method.params.modality=strong",
            ONE_EPOCH,
            f"train.checkpoint_dir={folder}",
        )
    )
    return folder


def best_encoder(folder: Path, modality: str) -> dict[str, torch.Tensor]:
    state = ckpt.load(folder / "best.pt")["model"]
    prefix = f"encoders.{modality}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def unverified(record) -> list[str]:
    return [str(w.message) for w in record if "cannot verify" in str(w.message)]


def test_the_encoder_starts_from_the_unimodal_best_weights_bit_for_bit_and_nothing_else_moves(
    strong_run, tiny_config, tmp_path
):
    plain = TrainingRun(tiny_config(ONE_EPOCH, f"train.checkpoint_dir={tmp_path / 'plain'}"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run = TrainingRun(
            tiny_config(ONE_EPOCH, init(**{"0": strong_run}), f"train.checkpoint_dir={tmp_path / 'init'}")
        )
    # the joint run's settings as a unimodal[strong] run are the source's config: verified by fingerprint
    assert unverified(record) == []
    expected = best_encoder(strong_run, "strong")
    assert same(run.model.encoders["strong"].state_dict(), expected)
    assert not same(plain.model.encoders["strong"].state_dict(), expected)  # it did change something
    # the init draws no random numbers: the other encoder and every head are those of the plain run
    for name in ("encoders.weak.", "fusion.", "unimodal_heads."):
        mine = {k: v for k, v in run.model.state_dict().items() if k.startswith(name)}
        theirs = {k: v for k, v in plain.model.state_dict().items() if k.startswith(name)}
        assert mine and same(mine, theirs), name
    # provenance: the source as given, the file, its config, and a hash of the loaded state computed here
    # independently: sha256 over (key|dtype|shape|bytes) for the keys in sorted order
    digest = hashlib.sha256()
    for key in sorted(expected):
        t = expected[key]
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.contiguous().numpy().tobytes())
    tags = run.run_tags()
    assert tags["init_encoders.strong.source"] == str(strong_run)
    assert tags["init_encoders.strong.checkpoint"] == str(strong_run / "best.pt")
    assert tags["init_encoders.strong.fingerprint"] == ckpt.load(strong_run / "best.pt")["fingerprint"]
    assert tags["init_encoders.strong.sha256"] == digest.hexdigest()
    assert not any(k.startswith("init_encoders.") for k in plain.run_tags())


def test_a_best_pt_by_modality_name_loads_the_same_and_a_foreign_split_only_warns(
    strong_run, tiny_config, tmp_path
):
    # 2 epochs here, 1 in the source: the folder's fingerprint proves nothing, so the run warns (and loads)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run = TrainingRun(tiny_config("train.epochs=2", init(strong=strong_run / "best.pt")))
    messages = unverified(record)
    assert len(messages) == 1 and "model.init_encoders.strong: cannot verify" in messages[0]
    assert "unimodal[strong] run on this run's split" in messages[0]
    assert same(run.model.encoders["strong"].state_dict(), best_encoder(strong_run, "strong"))


def test_the_fingerprint_changes_when_set_and_not_when_empty(tiny_config, tmp_path):
    plain = tiny_config()
    assert tiny_config("model.init_encoders={}").fingerprint() == plain.fingerprint()
    by_position = tiny_config(init(**{"0": tmp_path / "u"}))
    assert by_position.fingerprint() != plain.fingerprint()
    assert default_checkpoint_dir(by_position) != default_checkpoint_dir(plain)
    # an int position is stored as a string, so the config reads the same after a JSON trip
    as_int = tiny_config(f"model.init_encoders={{0: '{tmp_path / 'u'}'}}")
    assert as_int.model.init_encoders == {"0": str(tmp_path / "u")}
    assert as_int.fingerprint() == by_position.fingerprint()
    assert tiny_config(init(**{"0": tmp_path / "v"})).fingerprint() != by_position.fingerprint()


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (
            {"2": "x"},
            r"model\.init_encoders\.2: key '2' is neither a modality of this dataset \(strong, weak\) "
            r"nor a position 0-1",
        ),
        ({"audio": "x"}, r"model\.init_encoders\.audio: key 'audio' is neither a modality"),
        ({"0": "x", "strong": "y"}, r"model\.init_encoders\.strong: a second entry for modality 'strong'"),
    ],
)
def test_a_bad_key_is_refused_naming_it(tiny_config, sources, message):
    with pytest.raises(ConfigError, match=message):
        TrainingRun(tiny_config(init(**sources)))


def test_a_missing_source_is_a_clear_config_error(tiny_config, tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(
        ConfigError, match=r"model\.init_encoders\.weak: '.*nowhere' is neither an existing checkpoint folder"
    ):
        TrainingRun(tiny_config(init(weak=nowhere)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"init_encoders\.weak: no checkpoint {empty / 'best.pt'}"):
        TrainingRun(tiny_config(init(weak=empty)))

    def no_run(run_id, uri):
        raise LookupError(f"Run '{run_id}' not found")

    monkeypatch.setattr(unimodal_runs, "mlflow_run", no_run)
    with pytest.raises(
        ConfigError, match=r"init_encoders\.weak: no MLflow run 'abc' in the store .*not found"
    ):
        TrainingRun(tiny_config("tracking.uri=sqlite:///x.db", init(weak="runs:/abc")))


def test_an_encoder_that_does_not_fit_is_refused_naming_the_file_and_the_keys(
    strong_run, tiny_config, tmp_path, monkeypatch
):
    best = strong_run / "best.pt"
    # the file's strong encoder: net.0 = Linear(24 → 32), net.2 = Linear(32 → 16); this run's hidden is 8
    narrow = "model.encoders={strong: {name: mlp, params: {hidden: [8], out_dim: 16}}}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fingerprint differs too (unverified): not tested here
        with pytest.raises(
            ConfigError, match=rf"{best}: the 'strong' encoder there does not fit this run"
        ) as err:
            TrainingRun(tiny_config(narrow, init(strong=strong_run)))
    assert "net.0.weight: (32, 24) in the file, (8, 24) in this run" in str(err.value)
    # a unimodal[strong] run holds a weak encoder too, never trained: this run's own seed-0 draw, bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unimodal[weak] fingerprint is not the folder's: unverified
        with pytest.raises(
            ConfigError, match=r"init_encoders\.weak: the 'weak' encoder in .*best\.pt is its initialisation"
        ):
            TrainingRun(tiny_config(ONE_EPOCH, init(weak=strong_run)))
    # given by run id, the source's MLflow tags are checked: a unimodal[strong] run of other data is refused
    source = TrainingRun(
        tiny_config(
            "method.name=unimodal",
            "method.params.modality=strong",
            ONE_EPOCH,
            f"train.checkpoint_dir={strong_run}",
        )
    )
    logged = SimpleNamespace(
        data=SimpleNamespace(
            tags={**source.run_tags(), "dataset.content_sha256": "0"}, params=flatten(source.cfg.to_dict())
        )
    )
    monkeypatch.setattr(unimodal_runs, "mlflow_run", lambda run_id, uri: logged)
    with pytest.raises(
        ConfigError,
        match=r"init_encoders\.strong: the encoder source does not fit this run: its dataset content",
    ):
        TrainingRun(
            tiny_config("tracking.uri=sqlite:///x.db", init(strong="0123456789abcdef0123456789abcdef"))
        )


def test_resume_after_a_crash_equals_an_uninterrupted_run(strong_run, tiny_config, tmp_path):
    sources = init(strong=strong_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 epochs here, 1 in the source: unverified, warned
        full = train(tiny_config(sources, f"train.checkpoint_dir={tmp_path / 'full'}"))
        cfg = tiny_config(sources, f"train.checkpoint_dir={tmp_path / 'part'}")
        with pytest.raises(Crash):
            train(cfg, callbacks=[crash_after(1)])
        resumed = train(cfg)  # rebuilt from the source, then overwritten from last.pt
    assert resumed.history == full.history and resumed.test == full.test
    plain = train(tiny_config(f"train.checkpoint_dir={tmp_path / 'plain'}"))
    assert plain.history != full.history  # the init reached the training
