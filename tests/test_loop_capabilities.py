"""The loop capabilities issue 12's methods need, each through the ``Method`` interface only: several
optimiser steps per batch, segments no batch may mix, an optimiser's state reset at a phase boundary, a
method's own trainings (fresh optimisers, seeded passes over the training split), the coalition hook of
the zeroed-feature diagnostics, and model kinds a method asks for."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from midasbench.datasets.format import ArrowDataset
from midasbench.datasets.loader import Batch, BatchLoader, EpochPlan
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.diagnostics import zeroed_feature_accuracies
from midasbench.harness.training.trainer import TrainingRun, dataset_path
from midasbench.methods import METHODS, Method, StepOutput
from midasbench.methods.base import Requirements

MLP = "model.default_encoder.params={hidden: [], out_dim: 4}"


class TwoSubSteps(Method):
    """Each batch: a step on the strong modality's unimodal loss, then one on the weak one's; records
    the head weight the second forward saw."""

    fidelity = "baseline"
    seen: ClassVar[list[torch.Tensor]] = []

    def training_step(self, model: MultimodalModel, batch: Batch, epoch: int) -> StepOutput:
        raise AssertionError("training_steps replaces it")

    def training_steps(self, model, batch, epoch):
        for m in model.modalities:
            self.seen.append(model.unimodal_heads["weak"].weight.detach().clone())
            logits = model.unimodal_heads[m](model.encode(batch.inputs, [m])[m])
            yield StepOutput(loss=F.cross_entropy(logits, batch.labels), logs={f"loss_{m}": 1.0})


@pytest.fixture
def two_sub_steps():
    TwoSubSteps.seen = []
    with METHODS.temporarily("two-sub-steps", TwoSubSteps):
        TwoSubSteps.name = "two-sub-steps"
        yield


def test_each_sub_step_is_an_optimizer_step_and_the_next_forward_sees_it(two_sub_steps, tiny_config):
    run = TrainingRun(tiny_config("method.name=two-sub-steps", "optimizer.momentum=0", MLP))
    batch = next(iter(run.loader)).to(run.runtime.device)
    weak_before = run.model.unimodal_heads["weak"].weight.detach().clone()
    logs = run._step(batch, 0)
    strong_seen, weak_seen = TwoSubSteps.seen
    # the strong step does not touch the weak head (no gradient: the optimiser skips it) ...
    assert torch.equal(strong_seen, weak_before) and torch.equal(weak_seen, weak_before)
    # ... the weak step does, and only after its own backward
    assert not torch.equal(run.model.unimodal_heads["weak"].weight, weak_before)
    # the batch's loss is the sum over sub-steps; each sub-step's own keys are kept
    assert logs["loss_strong"] == logs["loss_weak"] == 1.0 and logs["loss"] > 0


def test_sub_steps_step_only_what_their_loss_reached(two_sub_steps, tiny_config):
    run = TrainingRun(tiny_config("method.name=two-sub-steps", MLP))
    batch = next(iter(run.loader))
    run._step(batch, 0)
    # SGD creates a momentum buffer for a parameter the first time it steps it: each branch has
    # one after its sub-step; the fusion head, which no loss reached, has none (grad None: skipped)
    state = run.optimizers.main.state
    stepped = {id(p) for p in state}
    for m in ("strong", "weak"):
        assert all(id(p) in stepped for p in run.model.encoders[m].parameters())
        assert all(id(p) in stepped for p in run.model.unimodal_heads[m].parameters())
    assert not any(id(p) in stepped for p in run.model.fusion.parameters())


def test_reset_optimizer_state_forgets_momentum_but_keeps_groups_and_lr(tiny_config):
    run = TrainingRun(tiny_config(MLP))
    run.optimizers.main.param_groups[0]["lr"] = 0.123
    run._step(next(iter(run.loader)), 0)
    assert run.optimizers.main.state
    run.runtime.reset_optimizer_state("main")
    assert not run.optimizers.main.state and run.optimizers.main.param_groups[0]["lr"] == 0.123
    with pytest.raises(KeyError, match="no optimizer 'probe'"):
        run.runtime.reset_optimizer_state("probe")


def test_new_optimizer_has_the_configured_kind_and_settings(tiny_config):
    run = TrainingRun(tiny_config(MLP, "optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.5"))
    params = list(run.model.fusion.parameters())
    opt = run.runtime.new_optimizer(params)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.5, 1e-4)
    assert opt not in run.optimizers.by_name.values()  # the trainer neither steps nor saves it


def test_train_batches_are_a_seeded_sharded_pass_over_the_training_split(tiny_config):
    run = TrainingRun(tiny_config(MLP, "train.batch_size=32"))
    first = [b.index.tolist() for b in run.runtime.train_batches(epoch=0, seed=7)]
    again = [b.index.tolist() for b in run.runtime.train_batches(epoch=0, seed=7)]
    other = [b.index.tolist() for b in run.runtime.train_batches(epoch=1, seed=7)]
    assert first == again and first != other
    assert sorted(i for b in first for i in b) == list(range(len(run.train_split)))
    assert all(len(b) in (32, len(run.train_split) % 32) for b in first)
    carve = np.array([5, 3, 9, 40, 41])
    subset = [i for b in run.runtime.train_batches(epoch=0, seed=7, rows=carve) for i in b.index.tolist()]
    assert sorted(subset) == sorted(carve.tolist())


def test_segments_are_sharded_and_batched_on_their_own(tiny_config):
    split = ArrowDataset(dataset_path(tiny_config())).split("train")
    rows = np.array([0, 1, 2, 3, 4, 10, 11, 12])  # segment A = 5 rows, segment B = 3 rows
    tags = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    plan = EpochPlan(rows, tags, segments=np.array([5, 8]))
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = BatchLoader(split, 2, shuffle=False, rank=rank, world_size=world_size)
            batches = list(loader.plan_batches(plan))
            # no batch mixes the segments' tags
            assert all(len(set(b.tags.tolist())) == 1 for b in batches)
    # two ranks: A → 3 rows each (0,2,4 | 1,3,0 padded by wrapping), B → 2 each (10,12 | 11,10)
    shard = plan.shard(1, 2)
    assert shard.rows.tolist() == [1, 3, 0, 11, 10] and shard.segments.tolist() == [3, 5]
    # one process, batch 2: A gives (0,1) (2,3,4 merged: no 1-row batch), B gives (10,11,12)
    assert plan.batch_slices(2) == [(0, 2), (2, 5), (5, 8)]


def test_a_one_row_segment_joins_a_neighbouring_batch():
    # BatchNorm cannot train on one row: a single-row segment (Remix gave one row to a modality on
    # avdigits) joins the batch before it, or after it when it comes first
    plan = EpochPlan(np.arange(7), segments=np.array([4, 5, 7]))
    assert plan.batch_slices(4) == [(0, 5), (5, 7)]  # [0-3] + [4] | [5-6]
    first = EpochPlan(np.arange(5), segments=np.array([1, 5]))
    assert first.batch_slices(2) == [(0, 3), (3, 5)]
    assert EpochPlan(np.arange(1), segments=np.array([1])).batch_slices(2) == [(0, 1)]  # nothing to join


def test_segments_must_end_at_the_plan_length():
    with pytest.raises(ValueError, match="ending at 3 rows"):
        EpochPlan(np.arange(3), segments=np.array([1, 2]))


def test_the_coalition_hook_replaces_zeroing_in_the_diagnostics():
    features = {"a": torch.tensor([[1.0], [0.0]]), "b": torch.tensor([[0.0], [1.0]])}
    labels = torch.tensor([0, 1])

    def fuse(f):  # class 1 wins where b is larger
        return torch.cat([f["a"], f["b"]], dim=1)

    zeroed = zeroed_feature_accuracies(fuse, features, labels)
    assert zeroed[frozenset({"a", "b"})] == 1.0 and zeroed[frozenset()] == 0.5  # tie → class 0

    def dropped(f, kept):  # a method that predicts class 1 whenever b is dropped
        return torch.tensor([[0.0, 1.0]]).expand(len(f["a"]), 2) if "b" not in kept else fuse(f)

    custom = zeroed_feature_accuracies(fuse, features, labels, coalition=dropped)
    assert custom[frozenset({"a"})] == 0.5 and custom[frozenset()] == 0.5
    assert custom[frozenset({"b"})] == zeroed[frozenset({"b"})]


def test_a_method_s_model_kind_is_built_and_a_conflicting_one_refused():
    needs = Requirements(model_kind="late_fusion")
    assert needs.resolve_model_kind("m", None) == "late_fusion"
    assert Requirements().resolve_model_kind("m", None) == "late_fusion"
    with pytest.raises(ConfigError, match=r"model\.kind: method 'm' needs model kind 'late_fusion'"):
        needs.resolve_model_kind("m", "other")
    with pytest.raises(ConfigError, match="unknown model kind 'nope'"):
        Requirements().resolve_model_kind("m", "nope")
