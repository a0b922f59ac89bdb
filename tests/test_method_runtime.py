"""The method interface's runtime: method-owned modules and a second optimiser, epoch plans with tags,
requirements refused up front, and the one evaluation path (best checkpoint = model + method state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crash_support import Crash, crash_after
from owning_method import INSTANCES, NAME, REPEAT_TAG, OwningMethod

from midasbench.datasets.format import ArrowDataset
from midasbench.datasets.loader import BatchLoader, EpochPlan
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import build_model
from midasbench.harness.training import checkpoint as ckpt
from midasbench.harness.training.evaluation import evaluate
from midasbench.harness.training.trainer import check_method_requirements, dataset_path, train
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.base import Requirements

OVERRIDES = (
    f"method.name={NAME}",
    "train.epochs=3",
    "model.default_encoder.params={hidden: [16], out_dim: 8, input_batchnorm: true, dropout: 0.2}",
)


@pytest.fixture
def owning():
    with METHODS.temporarily(NAME, OwningMethod):
        yield


def test_owned_modules_are_switched_clipped_trained_by_their_optimizer_and_checkpointed(owning, tiny_config):
    cfg = tiny_config(*OVERRIDES, "train.grad_clip=0.001")
    result = train(cfg)
    method = INSTANCES[-1]
    # switched: training mode in the step, eval mode in every evaluated prediction
    assert method.train_modes and all(method.train_modes)
    assert method.eval_modes and not any(method.eval_modes)
    # clipped: the second optimiser's gradients too
    assert method.aux_grad_norms and max(method.aux_grad_norms) <= 0.001 * (1 + 1e-4)
    # checkpointed: best.pt holds the owned modules and the method state of its epoch
    best = ckpt.load(result.checkpoint_dir / ckpt.CheckpointDir.BEST)
    assert best["epoch"] == result.best_epoch
    assert {"method_modules.mask.weight", "method_modules.aux.1.running_mean"} <= set(best["model"])
    assert best["method"]["steps"] > 0
    last = ckpt.load(result.checkpoint_dir / ckpt.CheckpointDir.LAST)
    assert sorted(last["optimizers"]) == ["aux", "main"] and last["optimizers"]["aux"]["state"]
    # trained: the mask (main optimiser) moved off the identity, the probe by Adam alone
    assert not torch.equal(best["model"]["method_modules.mask.weight"], torch.eye(4))
    # Adam holds exactly the probe's 6 tensors (two Linear layers and the BatchNorm affine pair)
    assert len(last["optimizers"]["aux"]["param_groups"][0]["params"]) == 6

    # restored for test: the reported test metrics are the best checkpoint's model *and* state
    dataset = ArrowDataset(dataset_path(cfg))
    model = build_model(cfg.model, dataset.manifest)
    again = build_method(NAME, {}, MethodContext(("strong", "weak"), 4, 3, 8))
    model.attach_method_modules(again.build_modules(model))
    model.load_state_dict(best["model"])
    again.load_state_dict(best["method"])
    test = evaluate(model, again, dataset.split("test"), 512, torch.device("cpu"), diagnostics_seed=0)
    assert test == result.test


def test_epoch_plan_tags_reach_the_batches_and_resume_is_exact(owning, tiny_config, tmp_path):
    full = train(tiny_config(*OVERRIDES, f"train.checkpoint_dir={tmp_path / 'full'}"))
    tagged = INSTANCES[-1].tagged_rows
    # epoch 1 re-visits the first third of its plan with the tag: 240 + 80 rows, 80 of them tagged
    assert sum(tag == REPEAT_TAG for _, tag in tagged) == 80
    assert len(tagged) == 240 + 80  # only the planned epoch carries tags

    cfg = tiny_config(*OVERRIDES, f"train.checkpoint_dir={tmp_path / 'part'}")
    with pytest.raises(Crash):
        train(cfg, callbacks=[crash_after(1)])
    resumed = train(cfg)
    assert resumed.history == full.history
    assert resumed.test == full.test


def test_an_epoch_plan_gives_every_rank_the_same_steps_and_keeps_tags_with_rows(tiny_config):
    split = ArrowDataset(dataset_path(tiny_config())).split("train")
    rows = np.array([9, 4, 4, 7, 1, 0, 3])  # a repeat, unequal shards for three ranks
    tags = np.array([0, 1, 2, 0, 1, 2, 3])
    plan = EpochPlan(rows, tags)
    seen = []
    steps = []
    for rank in range(3):
        loader = BatchLoader(split, 2, shuffle=True, rank=rank, world_size=3)
        batches = list(loader.plan_batches(plan))
        steps.append(len(batches))
        for batch in batches:
            seen += list(zip(batch.index.tolist(), batch.tags.tolist(), strict=True))
            np.testing.assert_array_equal(batch.labels.numpy(), split.labels[batch.index.numpy()])
    assert steps == [1, 1, 1]  # 7 rows padded to 9: three per rank, one batch (2 + a trailing 1 merge)
    # every (row, tag) pair of the plan arrives, the two copies of row 4 with their own tags
    assert set(seen) == set(zip(rows.tolist(), tags.tolist(), strict=True))
    assert len(seen) == 9 and seen.count((9, 0)) == 2  # the wrap-around pad repeats the first rows
    with pytest.raises(ValueError, match="one tag a row"):
        EpochPlan(rows, tags[:3])


def test_a_method_that_needs_a_decomposable_head_refuses_film(owning, tiny_config):
    with pytest.raises(
        ConfigError,
        match=r"model\.fusion\.name: method 'owning-test' needs a decomposable fusion head .* 'film' is not; "
        r"use one of: concat, sum",
    ):
        tiny_config(*OVERRIDES, "model.fusion.name=film")
    tiny_config(*OVERRIDES, "model.fusion.name=sum")  # decomposable: accepted


def test_a_method_that_needs_more_modalities_is_refused_naming_the_key(tiny_config):
    class ThreeModal(OwningMethod):
        requires = Requirements(min_modalities=3, max_modalities=3)

    with METHODS.temporarily("three-modal", ThreeModal):
        cfg = tiny_config("method.name=three-modal")
        with pytest.raises(
            ConfigError, match=r"data\.name: method 'three-modal' needs exactly 3 modalities, .* 2"
        ):
            check_method_requirements(cfg, 2)
        with pytest.raises(ConfigError, match="needs exactly 3 modalities"):
            train(cfg)


def test_adding_one_methods_defaults_leaves_other_runs_fingerprints_alone(tiny_config, monkeypatch):
    from midasbench.methods.midas import Midas

    joint, midas = tiny_config(), tiny_config("method.name=midas")
    monkeypatch.setattr(Midas, "dataset_defaults", {"synthetic": {"lam": 3.0, "warmup_epochs": 2}})
    assert tiny_config().fingerprint() == joint.fingerprint()
    changed = tiny_config("method.name=midas")
    assert changed.method.params["lam"] == 3.0 and changed.fingerprint() != midas.fingerprint()
    # the config's own method_defaults apply the same way: to their method only
    mine = tiny_config("method_defaults={midas: {lam: 0.5}}")
    assert mine.fingerprint() == joint.fingerprint()
    assert tiny_config("method_defaults={midas: {lam: 0.5}}", "method.name=midas").method.params["lam"] == 0.5
    # and what the user sets wins over both
    assert tiny_config("method.name=midas", "method.params.lam=2").method.params["lam"] == 2.0


def test_runtime_collectives_are_identity_on_one_process():
    from midasbench.harness.training.runtime import Runtime

    runtime = Runtime()
    x = torch.tensor([1.0, 2.0])
    for op in (runtime.all_reduce_sum, runtime.all_reduce_mean, runtime.broadcast, runtime.all_gather):
        y = op(x)
        assert torch.equal(y, x) and y is not x
    with pytest.raises(RuntimeError, match="bound to a run"):
        runtime.encode_rows(None, np.arange(3))  # type: ignore[arg-type]


def test_a_staged_best_is_promoted_or_dropped_to_agree_with_last_and_a_mismatch_is_refused(tmp_path):
    from midasbench.harness.training.checkpoint import CheckpointDir, CheckpointError

    d = CheckpointDir(tmp_path, "abc")
    d.stage_best({"epoch": 0, "model": {}, "method": {}})
    d.save_last({"epoch": 0, "completed": False, "best_epoch": 0})
    assert d.load_best(0)["epoch"] == 0 and not (tmp_path / d.STAGED).exists()
    # a crash between staging epoch 1's best and writing its last.pt: the staged file is dropped
    d.stage_best({"epoch": 1, "model": {}, "method": {}})
    assert d.load_last()["best_epoch"] == 0 and not (tmp_path / d.STAGED).exists()
    assert d.load_best(0)["epoch"] == 0
    # a crash after last.pt named epoch 1 but before the promotion: the staged file is promoted
    d.stage_best({"epoch": 1, "model": {}, "method": {}})
    ckpt.atomic_save(
        {"fingerprint": "abc", "epoch": 1, "completed": False, "best_epoch": 1}, tmp_path / d.LAST
    )
    assert d.load_last()["best_epoch"] == 1 and d.load_best(1)["epoch"] == 1
    # best.pt of another config or epoch is an error naming both files, never a silent test on it
    ckpt.atomic_save({"fingerprint": "other", "epoch": 1}, tmp_path / d.BEST)
    with pytest.raises(CheckpointError, match=r"best\.pt: holds epoch 1 of config other, but .*last\.pt"):
        d.load_last()


def test_encoders_run_under_autocast_and_everything_after_them_in_float32():
    from midasbench.harness.models.fusion import ConcatFusion
    from midasbench.harness.models.model import MultimodalModel

    class Encoder(torch.nn.Linear):
        out_dim = 3

    encoders = {"a": Encoder(4, 3), "b": Encoder(2, 3)}
    model = MultimodalModel(encoders, ConcatFusion({"a": 3, "b": 3}, 2), num_classes=2)
    seen = []
    encoders["a"].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    model.set_autocast(torch.bfloat16)  # CPU autocast supports bf16, as CUDA's does
    features = model.encode({"a": torch.randn(5, 4), "b": torch.randn(5, 2)})
    assert seen == [torch.bfloat16]  # the encoder itself ran in bf16
    assert {f.dtype for f in features.values()} == {torch.float32}
    assert model.fuse(features).dtype == torch.float32  # heads see fp32 features, outside autocast
    model.set_autocast(None)
    model.encode({"a": torch.randn(5, 4), "b": torch.randn(5, 2)})
    assert seen[-1] == torch.float32


def test_a_sweep_that_breaks_a_requirement_is_refused_before_any_trial(
    owning, tmp_path, data_root, mlflow_uri
):
    import json

    import yaml
    from conftest import TINY_SYNTHETIC

    from midasbench.harness.sweeps.sweep import expand, load_sweep, run_sweep

    base = {
        "name": "needs",
        "base": "synthetic",
        "storage": str(tmp_path / "store"),
        "overrides": [f"data.root={data_root}", f"data.options={json.dumps(TINY_SYNTHETIC)}"],
    }
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({**base, "grid": {"method.name": [NAME], "model.fusion.name": ["sum", "film"]}})
    )
    with pytest.raises(ConfigError, match=r"trial 1 .*method 'owning-test' needs a decomposable fusion head"):
        expand(load_sweep(path), str(path))

    class ThreeModal(OwningMethod):
        requires = Requirements(min_modalities=3)

    with METHODS.temporarily("three-modal", ThreeModal):
        path.write_text(yaml.safe_dump({**base, "grid": {"method.name": ["joint", "three-modal"]}}))
        with pytest.raises(ConfigError, match=r"trial .*three-modal.* needs at least 3 modalities"):
            run_sweep(expand(load_sweep(path)), tracking_uri=mlflow_uri, echo=False)


def test_param_groups_keep_their_own_lr_and_weight_decay_and_overlaps_are_refused(tiny_config):
    from tests_support_models import two_layer_model

    from midasbench.harness.training.optim import build_optimizers
    from midasbench.methods.base import OptimizerSpec, ParamGroup

    cfg = tiny_config("optimizer.lr=0.1", "optimizer.weight_decay=0.001")
    model = two_layer_model()

    class Grouped(OwningMethod):
        def param_groups(self, model):
            return [
                ParamGroup("encoders", list(model.encoders.parameters()), lr=0.5),
                ParamGroup("heads", list(model.fusion.parameters()), weight_decay=0.0),
                ParamGroup("probe", list(model.unimodal_heads.parameters()), optimizer="probe"),
            ]

        def optimizers(self):
            return {"probe": OptimizerSpec("sgd", lr=0.2, weight_decay=0.3)}

    method = Grouped(OwningMethod.Params(), MethodContext(("a", "b"), 2, 1, 1))
    built = build_optimizers(cfg, method, model)
    groups = {g["name"]: g for g in built.main.param_groups}
    assert (groups["encoders"]["lr"], groups["encoders"]["weight_decay"]) == (0.5, 0.001)
    assert (groups["heads"]["lr"], groups["heads"]["weight_decay"]) == (0.1, 0.0)
    probe = built.by_name["probe"].param_groups[0]
    assert isinstance(built.by_name["probe"], torch.optim.SGD) and (probe["lr"], probe["weight_decay"]) == (
        0.2,
        0.3,
    )

    class Overlapping(Grouped):
        def param_groups(self, model):
            return [
                ParamGroup("x", list(model.parameters())),
                ParamGroup("y", list(model.fusion.parameters())),
            ]

    with pytest.raises(ValueError, match="a parameter is in groups 'x' and 'y'"):
        build_optimizers(cfg, Overlapping(OwningMethod.Params(), method.context), model)

    class Undeclared(Grouped):
        def optimizers(self):
            return {}

    with pytest.raises(
        ValueError, match=r"names optimizer 'probe', which method\.optimizers\(\) does not declare"
    ):
        build_optimizers(cfg, Undeclared(OwningMethod.Params(), method.context), model)
