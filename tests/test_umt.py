"""UMT (``umt``) and UME (``ume``), methods-more §23: the distillation term and its gradient (§23.8), frozen
teachers (no gradient, BatchNorm buffers untouched), teachers loaded from real ``unimodal`` runs (a folder,
a ``best.pt``, an MLflow run id), the fit checks, ``missing_teacher`` (error; train in-process, then reuse),
resume without the teacher source, and UME's combination rules. Expected values are computed by hand in
the comments."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_SYNTHETIC
from tests_support_models import IdentityEncoder
from torch import nn

from midasbench.datasets.loader import Batch
from midasbench.harness.config import RunConfig, load_config
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.tracking import flatten
from midasbench.harness.training import checkpoint as ckpt
from midasbench.harness.training import unimodal_runs as sources_module
from midasbench.harness.training.trainer import TrainingRun, train
from midasbench.harness.training.unimodal_runs import encoder_state
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods import umt as umt_module
from midasbench.methods.ume import combine_unimodal
from midasbench.methods.umt import TeacherSource, check_source_fits, distillation_loss

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=3, epochs=3, steps_per_epoch=1, seed=0)


# ----------------------------------------------------------------------------------- helpers


def config(data_root: Path, checkpoint_dir: Path, *overrides: str) -> RunConfig:
    """A one-epoch tiny synthetic run with BatchNorm in the encoders (so teachers have BN buffers)."""
    return load_config(
        "synthetic",
        [
            f"data.root={data_root}",
            f"data.options={json.dumps(TINY_SYNTHETIC)}",
            "model.default_encoder.params={hidden: [16], out_dim: 8, input_batchnorm: true}",
            "train.epochs=1",
            "train.batch_size=32",
            "train.progress=false",
            "train.num_threads=1",
            "train.diagnostics=false",
            f"train.checkpoint_dir={checkpoint_dir}",
            "tracking.enabled=false",
            *overrides,
        ],
    )


def umt_params(**params) -> str:
    return f"method.params={json.dumps(params)}"


@pytest.fixture(scope="module")
def unimodal_runs(tmp_path_factory, data_root) -> dict[str, Path]:
    """One finished 1-epoch ``unimodal`` run per synthetic modality: the teachers' checkpoint folders."""
    root = tmp_path_factory.mktemp("unimodal")
    folders = {}
    for m in ("strong", "weak"):
        folders[m] = root / m
        train(config(data_root, folders[m], "method.name=unimodal", f"method.params.modality={m}"))
    return folders


def encoder_of(best: Path, modality: str) -> dict[str, torch.Tensor]:
    return encoder_state(ckpt.load(best)["model"], modality, best)


def teacher_state(model: MultimodalModel, modality: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.method_modules["teachers"][modality].encoder.state_dict().items()}


def unverified(record) -> list[str]:
    return [str(w.message) for w in record if "cannot verify" in str(w.message)]


class BNEncoder(nn.Module):
    """BatchNorm → linear, so the teacher has running statistics a train-mode forward would update."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.bn, self.fc, self.out_dim = nn.BatchNorm1d(i), nn.Linear(i, o), o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


# ----------------------------------------------------------------------------- §23.8 mechanism


def test_distillation_term_and_its_gradient_are_those_of_spec_23_8():
    # f = (1, 2), t = (0, 0), λ = 10: λ · mean((1 − 0)², (2 − 0)²) = 10 · (1 + 4)/2 = 25;
    # ∂/∂f = λ · 2 (f − t) / 2 = (10, 20)
    f = torch.tensor([[1.0, 2.0]], requires_grad=True)
    total, per_modality = distillation_loss({"a": f}, {"a": torch.zeros(1, 2)}, 10.0)
    assert total.item() == pytest.approx(25.0) and per_modality["a"].item() == pytest.approx(2.5)
    total.backward()
    torch.testing.assert_close(f.grad, torch.tensor([[10.0, 20.0]]))


def test_umt_step_is_fused_ce_plus_distillation_computed_by_hand():
    # Identity student encoders (f = x), zero teachers (t = 0), zero fusion head (z = 0, 3 classes).
    # One sample, x_a = (1, 2), x_b = (0, 0): CE = log 3; distillation = 10 · (1 + 4)/2 + 10 · 0 = 25.
    # ∂L/∂f_a = (10, 20) from the MSE and W_aᵀ(p − y) = 0 from the CE (W = 0), so the gradient of the
    # encoder's bias is (10, 20) for a and (0, 0) for b.
    model = MultimodalModel(
        {"a": IdentityEncoder(2), "b": IdentityEncoder(2)}, ConcatFusion({"a": 2, "b": 2}, 3), 3
    )
    method = build_method("umt", {}, CONTEXT)
    model.attach_method_modules(method.build_modules(model))
    with torch.no_grad():
        model.fusion.linear.weight.zero_()
        model.fusion.linear.bias.zero_()
        for teacher in model.method_modules["teachers"].values():
            teacher.encoder.weight.zero_()
            teacher.encoder.bias.zero_()
    batch = Batch(
        inputs={"a": torch.tensor([[1.0, 2.0]]), "b": torch.zeros(1, 2)},
        labels=torch.tensor([0]),
        index=torch.arange(1),
    )
    out = method.training_step(model, batch, 0)
    assert out.loss.item() == pytest.approx(math.log(3) + 25.0, rel=1e-6)
    assert out.logs["loss_distill"] == pytest.approx(25.0) and out.logs["mse_a"] == pytest.approx(2.5)
    out.loss.backward()
    torch.testing.assert_close(model.encoders["a"].bias.grad, torch.tensor([10.0, 20.0]))
    torch.testing.assert_close(model.encoders["b"].bias.grad, torch.zeros(2))


def test_teacher_gets_no_gradient_and_its_batchnorm_buffers_are_unchanged_after_a_train_step():
    torch.manual_seed(0)
    model = MultimodalModel(
        {"a": BNEncoder(4, 3), "b": BNEncoder(2, 3)}, ConcatFusion({"a": 3, "b": 3}, 3), 3
    )
    method = build_method("umt", {}, CONTEXT)
    model.attach_method_modules(method.build_modules(model))
    teachers = model.method_modules["teachers"]
    before = {k: v.clone() for k, v in teachers.state_dict().items()}
    student_bn = model.encoders["a"].bn.running_mean.clone()
    params = [p for g in method.param_groups(model) for p in g.params]
    assert not {id(p) for p in teachers.parameters()} & {id(p) for p in params}
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model.train()
    assert not any(x.training for t in teachers.values() for x in t.modules())  # teachers stay in eval
    torch.manual_seed(1)
    batch = Batch(
        inputs={"a": torch.randn(6, 4), "b": torch.randn(6, 2)},
        labels=torch.arange(6) % 3,
        index=torch.arange(6),
    )
    out = method.training_step(model, batch, 0)
    out.loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in teachers.parameters())
    after = teachers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats, counters, weights
    assert not torch.equal(model.encoders["a"].bn.running_mean, student_bn)  # the student's BN did update


# --------------------------------------------------------------------- teachers from real runs


def test_teachers_load_from_a_unimodal_run_folder_and_best_pt_and_are_verified(
    unimodal_runs, data_root, tmp_path
):
    # teacher_epochs=1: the teacher config this run would train is the 1-epoch unimodal run (same fingerprint)
    teachers = {"strong": str(unimodal_runs["strong"]), 1: str(unimodal_runs["weak"] / "best.pt")}
    cfg = config(
        data_root,
        tmp_path / "s",
        "method.name=umt",
        "train.epochs=2",
        umt_params(teachers=teachers, teacher_epochs=1, missing_teacher="error"),
    )
    run = TrainingRun(cfg)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.method.on_epoch_start(run.model, 0)
    assert unverified(record) == []
    for m in ("strong", "weak"):
        expected = encoder_of(unimodal_runs[m] / "best.pt", m)
        got = teacher_state(run.model, m)
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got)
        assert bool(run.model.method_modules["teachers"][m].loaded)


def test_a_folder_that_cannot_prove_its_split_warns_or_is_refused(unimodal_runs, data_root, tmp_path):
    # the student trains 2 epochs and so would its teachers: the 1-epoch folder's fingerprint differs
    teachers = {"strong": str(unimodal_runs["strong"]), "weak": str(unimodal_runs["weak"])}
    cfg = config(
        data_root, tmp_path / "s", "method.name=umt", "train.epochs=2", umt_params(teachers=teachers)
    )
    run = TrainingRun(cfg)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run.method.on_epoch_start(run.model, 0)
    messages = unverified(record)  # one per teacher, and both are loaded all the same
    assert len(messages) == 2 and "unimodal[strong] run on this run's split" in messages[0]
    assert "no dataset hash or split ids" in messages[0]
    assert all(bool(t.loaded) for t in run.model.method_modules["teachers"].values())
    strict = config(
        data_root,
        tmp_path / "t",
        "method.name=umt",
        "train.epochs=2",
        umt_params(teachers=teachers, unverified_teacher="error"),
    )
    run = TrainingRun(strict)
    with pytest.raises(ConfigError, match=r"method\.params\.teachers\.strong: cannot verify"):
        run.method.on_epoch_start(run.model, 0)


def test_an_encoder_that_does_not_fit_the_student_names_the_file_and_the_keys(
    unimodal_runs, data_root, tmp_path
):
    teachers = {"strong": str(unimodal_runs["strong"]), "weak": str(unimodal_runs["weak"])}
    best = unimodal_runs["strong"] / "best.pt"
    # the file's encoder: net.0 = input BatchNorm(24), net.1 = Linear(24 → 16), net.3 = Linear(16 → 8)
    for encoder, expected in (
        ("{hidden: [12], out_dim: 8, input_batchnorm: true}", "net.1.weight: (16, 24) in the file, (12, 24)"),
        ("{hidden: [16], out_dim: 8}", "missing keys [net.2.bias, net.2.weight], unexpected keys [net.0.num"),
    ):
        cfg = config(
            data_root,
            tmp_path / "s",
            "method.name=umt",
            f"model.default_encoder.params={encoder}",
            umt_params(teachers=teachers),
        )
        run = TrainingRun(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fingerprint differs too (unverified): not tested here
            with pytest.raises(ConfigError, match=rf"{best}: the 'strong' encoder .*does not fit") as err:
                run.method.on_epoch_start(run.model, 0)
        assert expected in str(err.value)
    odd = tmp_path / "odd.pt"
    torch.save({"fingerprint": "x", "epoch": 0, "model": {"encoders.other.w": torch.zeros(1)}}, odd)
    with pytest.raises(ConfigError, match=r"odd\.pt: holds no encoder for modality 'strong'.*\['other'\]"):
        encoder_state(ckpt.load(odd)["model"], "strong", odd)


def test_a_teacher_given_by_run_id_is_found_and_checked_against_its_tags(
    unimodal_runs, data_root, tmp_path, monkeypatch
):
    # a stand-in for the MLflow store: the 1-epoch weak run's real tags and params, as the trainer logs them
    teacher_run = TrainingRun(
        config(data_root, unimodal_runs["weak"], "method.name=unimodal", "method.params.modality=weak")
    )
    logged = SimpleNamespace(
        data=SimpleNamespace(tags=teacher_run.run_tags(), params=flatten(teacher_run.cfg.to_dict()))
    )
    asked = []
    monkeypatch.setattr(
        sources_module, "mlflow_run", lambda run_id, uri: asked.append((run_id, uri)) or logged
    )
    run_id = "0123456789abcdef0123456789abcdef"
    cfg = config(
        data_root,
        tmp_path / "s",
        "method.name=umt",
        "train.epochs=5",
        "tracking.uri=sqlite:///x.db",
        umt_params(teachers={"weak": f"runs:/{run_id}", "strong": run_id}),
    )
    run = TrainingRun(cfg)
    with pytest.raises(ConfigError, match=r"teachers\.strong: the teacher does not fit.*'unimodal\[weak\]'"):
        run.method.given_teacher("strong")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        source = run.method.given_teacher("weak")
    # it passed on its tags (dataset hash, split ids) although its fingerprint (1 epoch, not 5) differs;
    # its folder is the run's train.checkpoint_dir param
    assert unverified(record) == [] and source.best == unimodal_runs["weak"] / "best.pt"
    assert asked[-1][0] == run_id and asked[-1][1].endswith("/x.db")


@pytest.mark.slow
def test_a_teacher_from_a_real_mlflow_run_id_is_loaded(data_root, tmp_path, mlflow_uri):
    tracked = config(
        data_root,
        tmp_path / "u",
        "method.name=unimodal",
        "method.params.modality=weak",
        "tracking.enabled=true",
        f"tracking.uri={mlflow_uri}",
    )
    run_id = train(tracked).run_id
    cfg = config(
        data_root,
        tmp_path / "s",
        "method.name=umt",
        "train.epochs=5",
        f"tracking.uri={mlflow_uri}",
        umt_params(teachers={"weak": f"runs:/{run_id}"}),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        source = TrainingRun(cfg).method.given_teacher("weak")
    assert unverified(record) == [] and source.best == tmp_path / "u" / "best.pt"
    assert source.tags is not None and source.tags["method.label"] == "unimodal[weak]"


def test_fit_check_refuses_another_dataset_or_split_from_the_tags(data_root, tmp_path):
    manifest = TrainingRun(config(data_root, tmp_path / "s")).dataset.manifest
    tags = {
        "method.name": "unimodal",
        "method.label": "unimodal[weak]",
        "dataset.content_sha256": manifest.content_sha256,
        **{f"split.{s}.ids_sha256": info.ids_sha256 for s, info in manifest.splits.items()},
    }
    source = TeacherSource(Path("t/best.pt"), {"fingerprint": "f"}, tags, "method.params.teachers.weak")
    check_source_fits(source, "weak", manifest, None, None, "error")  # fits: no error
    bad = TeacherSource(source.best, source.state, {**tags, "split.test.ids_sha256": "0"}, source.where)
    with pytest.raises(ConfigError, match=r"teachers\.weak: the teacher does not fit.*test split ids"):
        check_source_fits(bad, "weak", manifest, None, None, "warn")
    other = TeacherSource(source.best, source.state, {**tags, "dataset.content_sha256": "0"}, source.where)
    with pytest.raises(ConfigError, match="dataset content hash"):
        check_source_fits(other, "weak", manifest, None, None, "warn")


def test_missing_teacher_error_and_bad_sources_are_refused_with_how_to_give_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"no teacher for modality 'b' .*method\.params\.teachers\.b=.*unimodal"
    ):
        build_method("umt", {"teachers": {"a": "x"}, "missing_teacher": "error"}, CONTEXT)
    with pytest.raises(
        ConfigError, match=r"teachers: key 'c' is neither a modality .*\(a, b\) nor a position 0-1"
    ):
        build_method("umt", {"teachers": {"c": "x"}}, CONTEXT)
    with pytest.raises(ConfigError, match="two entries for modality 'a'"):
        build_method("umt", {"teachers": {"a": "x", "0": "y"}}, CONTEXT)
    model = MultimodalModel(
        {"a": IdentityEncoder(2), "b": IdentityEncoder(2)}, ConcatFusion({"a": 2, "b": 2}, 3), 3
    )
    method = build_method("umt", {"teachers": {"a": str(tmp_path / "nowhere")}}, CONTEXT)
    model.attach_method_modules(method.build_modules(model))
    with pytest.raises(
        ConfigError, match=r"teachers\.a: .*nowhere' is neither an existing checkpoint folder"
    ):
        method.on_epoch_start(model, 0)
    with pytest.raises(ConfigError, match="training the 'a' teacher needs the run"):  # no run to clone
        build_method("umt", {}, CONTEXT).on_epoch_start(model, 0)


def test_missing_teacher_train_trains_then_reuses_the_teachers_end_to_end(data_root, tmp_path, monkeypatch):
    cfg = config(data_root, tmp_path / "s", "method.name=umt", "train.epochs=2", umt_params(teacher_epochs=1))
    first = train(cfg)
    best = ckpt.load(tmp_path / "s" / "best.pt")["model"]
    for m in ("strong", "weak"):
        folder = tmp_path / "s" / "teachers" / m
        last = ckpt.load(folder / "last.pt")
        # the in-process teacher is exactly the standalone 1-epoch unimodal run of this config
        standalone = config(data_root, tmp_path / "x", "method.name=unimodal", f"method.params.modality={m}")
        assert last["completed"] and last["fingerprint"] == standalone.fingerprint()
        expected = encoder_of(folder / "best.pt", m)
        prefix = f"method_modules.teachers.{m}.encoder."
        assert all(torch.equal(best[prefix + k], v) for k, v in expected.items())  # BN buffers included
    calls = []
    monkeypatch.setattr(umt_module, "train_in_process", lambda c: calls.append(c))
    second = train(cfg)  # the student finished, so it starts over; its finished teachers are reused
    assert calls == [] and second.test == first.test and second.history == first.history


def test_a_resumed_student_needs_no_teacher_source_and_method_state_round_trips(tmp_path):
    model = MultimodalModel(
        {"a": IdentityEncoder(2), "b": IdentityEncoder(2)}, ConcatFusion({"a": 2, "b": 2}, 3), 3
    )
    method = build_method(
        "umt", {"teachers": {"a": str(tmp_path / "gone"), "b": str(tmp_path / "gone")}}, CONTEXT
    )
    model.attach_method_modules(method.build_modules(model))
    with torch.no_grad():
        for t in model.method_modules["teachers"].values():
            t.encoder.weight.fill_(0.5)
            t.loaded.fill_(True)
    saved = model.state_dict()
    fresh = MultimodalModel(
        {"a": IdentityEncoder(2), "b": IdentityEncoder(2)}, ConcatFusion({"a": 2, "b": 2}, 3), 3
    )
    clone = build_method(
        "umt", {"teachers": {"a": str(tmp_path / "gone"), "b": str(tmp_path / "gone")}}, CONTEXT
    )
    fresh.attach_method_modules(clone.build_modules(fresh))
    fresh.load_state_dict(saved)
    clone.load_state_dict(method.state_dict())
    clone.on_epoch_start(fresh, 1)  # loaded flags came with the checkpoint: the missing source is not read
    assert torch.equal(fresh.method_modules["teachers"]["a"].encoder.weight, torch.full((2, 2), 0.5))
    assert method.state_dict() == {} and build_method("ume", {}, CONTEXT).state_dict() == {}


def test_both_methods_need_two_modalities():
    for name in ("umt", "ume"):
        with pytest.raises(ConfigError, match=rf"method '{name}' needs at least 2 modalities"):
            METHODS.get(name).requires.check(name, "concat", True, 1)


# --------------------------------------------------------------------------------------- UME


def ume_model() -> MultimodalModel:
    """Unimodal heads that ignore the features: u^a = (1.2, 0, −10), u^b = (−10, 0, 1) for every row."""
    model = MultimodalModel(
        {"a": IdentityEncoder(2), "b": IdentityEncoder(2)}, ConcatFusion({"a": 2, "b": 2}, 3), 3
    )
    with torch.no_grad():
        for m, bias in (("a", [1.2, 0.0, -10.0]), ("b", [-10.0, 0.0, 1.0])):
            model.unimodal_heads[m].weight.zero_()
            model.unimodal_heads[m].bias.copy_(torch.tensor(bias))
    return model


def test_ume_combination_rules_computed_by_hand():
    # logit_mean: ((1.2 − 10)/2, 0, (−10 + 1)/2) = (−4.4, 0, −4.5) → class 1
    # prob_mean: softmax(u^a) = (3.320117, 1, 0.0000454)/4.320162 = (0.768517, 0.231473, 0.0000105);
    #            softmax(u^b) = (0.0000454, 1, 2.718282)/3.718327 = (0.0000122, 0.268938, 0.731050);
    #            mean = (0.384264, 0.250205, 0.365530) → class 0 (the rules disagree here)
    model, features = ume_model(), {"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)}
    logit_mean = build_method("ume", {}, CONTEXT).logits_from_features(model, features)
    torch.testing.assert_close(logit_mean, torch.tensor([[-4.4, 0.0, -4.5]]))
    prob = build_method("ume", {"ume_combine": "prob_mean"}, CONTEXT)
    assert prob.label == "ume[prob_mean]"
    logits = prob.logits_from_features(model, features)
    torch.testing.assert_close(
        logits.softmax(1), torch.tensor([[0.384264, 0.250205, 0.365530]]), atol=2e-6, rtol=0
    )
    assert logit_mean.argmax().item() == 1 and logits.argmax().item() == 0
    # a probability that underflows in float32 stays finite as a log-probability
    huge = combine_unimodal(
        {"a": torch.tensor([[200.0, 0.0]]), "b": torch.tensor([[200.0, 0.0]])}, "prob_mean"
    )
    assert torch.isfinite(huge).all() and huge[0, 1].item() == pytest.approx(-200.0)


def test_ume_coalitions_average_only_the_kept_branches():
    model, features = ume_model(), {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}
    method = build_method("ume", {}, CONTEXT)
    torch.testing.assert_close(
        method.coalition_logits(model, features, frozenset("a")), torch.tensor([[1.2, 0.0, -10.0]] * 2)
    )
    torch.testing.assert_close(method.coalition_logits(model, features, frozenset()), torch.zeros(2, 3))


def test_ume_loss_is_the_sum_of_unimodal_ces_and_leaves_the_fusion_head_out():
    # label 0: CE_a = −log 0.768517 = 0.263293; CE_b = log 3.718327 + 10 = 11.313274; sum 11.576567
    model, method = ume_model(), build_method("ume", {}, CONTEXT)
    batch = Batch(
        inputs={"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)},
        labels=torch.tensor([0]),
        index=torch.arange(1),
    )
    out = method.training_step(model, batch, 0)
    assert out.loss.item() == pytest.approx(11.576567, abs=1e-5)
    assert out.logs["loss_a"] == pytest.approx(0.263293, abs=1e-5)
    names = {id(p) for p in method.trainable_parameters(model)}
    assert not any(id(p) in names for p in model.fusion.parameters())
    out.loss.backward()
    assert model.fusion.linear.weight.grad is None
    # CE_b does not reach branch a: its head's bias gradient is softmax(u^a) − onehot(0) alone
    torch.testing.assert_close(
        model.unimodal_heads["a"].bias.grad,
        torch.tensor([0.768517 - 1, 0.231473, 0.0000105]),
        atol=2e-6,
        rtol=0,
    )


def test_each_ume_branch_trains_exactly_as_its_own_unimodal_run(unimodal_runs, data_root, tmp_path):
    train(config(data_root, tmp_path / "ume", "method.name=ume"))
    ume = ckpt.load(tmp_path / "ume" / "last.pt")["model"]
    for m, folder in unimodal_runs.items():
        alone = ckpt.load(folder / "last.pt")["model"]
        branch = [k for k in alone if k.startswith((f"encoders.{m}.", f"unimodal_heads.{m}."))]
        assert branch and all(torch.equal(ume[k], alone[k]) for k in branch), m
