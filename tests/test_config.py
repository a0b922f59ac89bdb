import pytest

from midasbench.harness.config import apply_overrides, load_config, parse_override, preset_names
from midasbench.harness.errors import ConfigError


def test_defaults_and_every_preset_validate():
    load_config(None)
    assert {"synthetic", "cremad", "kinetics_sounds"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.optimizer.lr > 0


def test_paper_presets_carry_appendix_a3_settings():
    cremad = load_config("cremad")
    assert (cremad.optimizer.name, cremad.optimizer.lr, cremad.optimizer.momentum) == ("sgd", 1e-3, 0.9)
    assert cremad.optimizer.weight_decay == 1e-4
    assert (cremad.train.batch_size, cremad.train.epochs, cremad.scheduler.step_size) == (64, 70, 50)
    assert cremad.data.split == "midas70"
    food = load_config("food101")
    assert (food.train.epochs, food.scheduler.step_size) == (30, 15)
    assert load_config("ucf101").optimizer.lr == 1e-2


def test_overrides_are_parsed_as_yaml_values():
    assert parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert parse_override("optimizer.lr=1e-2") == (["optimizer", "lr"], 0.01)
    assert parse_override("tracking.enabled=false") == (["tracking", "enabled"], False)
    cfg = load_config("synthetic", ["train.epochs=5", "method.name=unimodal", "method.params.modality=weak"])
    assert cfg.train.epochs == 5
    assert cfg.method.params == {"modality": "weak"}


def test_method_params_are_stored_with_defaults_for_reproduction():
    cfg = load_config("synthetic")
    assert cfg.method.params == {"unimodal_weight": 0.0}
    assert cfg.model.default_encoder.params["activation"] == "relu"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=5", r"train\.epoch: unknown key"),
        ("train.epochs=five", r"train\.epochs: .*integer"),
        ("train.epochs=0", r"train\.epochs: .*greater than or equal to 1"),
        ("optimizer.name=rmsprop", r"optimizer\.name: .*'sgd', 'adam' or 'adamw'"),
        ("data.split=random", r"data\.split: .*'official' or 'midas70'"),
        ("method.name=nope", r"method\.name: unknown method 'nope'; known methods: .*joint"),
        ("method.params.lam=1", r"method\.params\.lam: unknown key"),
        (
            "method.params.unimodal_weight=-1",
            r"method\.params\.unimodal_weight: .*greater than or equal to 0",
        ),
        ("model.fusion.name=attention", r"model\.fusion\.name: unknown fusion 'attention'"),
        ("model.encoders.weak.name=cnn", r"model\.encoders\.weak\.name: unknown encoder 'cnn'"),
        ("model.default_encoder.params.hidden=7", r"model\.default_encoder\.params\.hidden: "),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("synthetic", [override])


def test_override_through_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"train\.epochs is a value"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.epochs")


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; known presets: .*synthetic"):
        load_config("nope")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_config_file_with_preset_underneath(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: synthetic\ntrain: {epochs: 7}\n")
    cfg = load_config(str(path), ["train.batch_size=16"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.name) == (7, 16, "synthetic")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(bad))


def test_resolved_config_round_trips_and_fingerprint_ignores_tracking(tmp_path):
    cfg = load_config("synthetic", ["train.epochs=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg
    moved = load_config(str(path), ["tracking.experiment=other", "train.checkpoint_dir=/x"])
    assert moved.fingerprint() == cfg.fingerprint()
    assert load_config(str(path), ["train.seed=1"]).fingerprint() != cfg.fingerprint()


def test_fields_added_later_stay_out_of_the_fingerprint_at_their_default():
    """``model.kind`` / ``model.kind_params`` / ``model.init_encoders`` / ``data.transforms`` came after
    sweeps existed (``train.prefetch_batches`` changes no number and is never in it): at their
    defaults a config's fingerprint (its trial key, its checkpoint folder) is what it was before they were
    added."""
    import hashlib
    import json

    cfg = load_config("synthetic")
    before = cfg.to_dict()
    del before["model"]["kind"], before["model"]["kind_params"], before["model"]["init_encoders"]
    del before["data"]["transforms"]
    for key in ("tracking", "method_defaults"):
        before.pop(key)
    for key in ("progress", "checkpoint_dir", "resume", "prefetch_batches"):
        before["train"].pop(key)
    legacy = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert cfg.fingerprint() == legacy
    assert load_config("synthetic", ["model.kind=late_fusion"]).fingerprint() != legacy
    mmtm = load_config("synthetic", ["model.kind=mmtm", "model.kind_params={ratio: 2.0}"])
    assert mmtm.fingerprint() != legacy
