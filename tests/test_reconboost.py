"""ReconBoost (methods-more §28): the boosting loss (§28.8), the stage/phase schedule, what each phase
trains, the per-phase optimiser reset and resume, the ensemble prediction, state and requirement errors."""

import math

import pytest
import torch
from tests_support_models import IdentityEncoder as Identity
from tests_support_models import LinearEncoder as Linear

from midasbench.datasets.loader import Batch
from midasbench.harness.errors import ConfigError
from midasbench.harness.models.fusion import ConcatFusion
from midasbench.harness.models.model import MultimodalModel
from midasbench.harness.training.trainer import TrainingRun, train
from midasbench.methods import METHODS, MethodContext, build_method
from midasbench.methods.reconboost import (
    ENSEMBLE,
    Phase,
    boosting_loss,
    ensemble_members,
    phase_of,
)

CONTEXT = MethodContext(modalities=("a", "b"), num_classes=2, epochs=4, steps_per_epoch=1)
MLP = "model.default_encoder.params={hidden: [16], out_dim: 8, input_batchnorm: true}"
LN4 = math.log(4.0)


def identity_setup(beta: float = 1.0, **params):
    """Identity encoders (d = 2) and an identity head (hidden 2: Linear I → ReLU → Linear I, zero
    biases), so h(f) = relu(f) and every logit can be written down from the inputs."""
    method = build_method("reconboost", {"hidden": 2, "beta_init": beta, **params}, CONTEXT)
    model = MultimodalModel({"a": Identity(2), "b": Identity(2)}, ConcatFusion({"a": 2, "b": 2}, 2), 2)
    model.attach_method_modules(method.build_modules(model))
    with torch.no_grad():
        for layer in (model.method_modules[ENSEMBLE].head[0], model.method_modules[ENSEMBLE].head[2]):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return method, model


def batch_of(a: list[float], b: list[float], label: int = 0) -> Batch:
    return Batch(
        inputs={"a": torch.tensor([a]), "b": torch.tensor([b])},
        labels=torch.tensor([label]),
        index=torch.arange(1),
    )


# ---- §28.8 the boosting loss


def test_boosting_loss_unit_values():
    # C = 2, y = 0, logits (0, 0): p = (½, ½), −log p_y = ln 2 = 0.693147
    # q = (0.8, 0.2): ℓ = ½ · 0.693147 · (5 − 1·0.8) = ½ · 0.693147 · 4.2 = 1.455609
    logits, labels = torch.zeros(1, 2, requires_grad=True), torch.tensor([0])
    loss = boosting_loss(logits, labels, torch.tensor([0.8]), w1=5.0, w2=1.0)
    assert loss.item() == pytest.approx(1.4556, abs=1e-4)
    assert loss.item() == pytest.approx(0.5 * math.log(2) * 4.2, rel=1e-6)
    # ∂ℓ/∂z = −(4.2/2)(e_y − p) = −2.1 · (½, −½) = (−1.05, 1.05)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-1.05, 1.05]]))
    # stage 0, q_y := 1: ℓ = ½ · 0.693147 · 4 = 1.386294
    stage0 = boosting_loss(torch.zeros(1, 2), labels, torch.ones(1), w1=5.0, w2=1.0)
    assert stage0.item() == pytest.approx(1.3863, abs=1e-4)


def test_the_method_s_phase_1_loss_reproduces_the_unit_values_and_logs_ga():
    method, model = identity_setup()
    # f^a = (ln 4, 0) → h = (ln 4, 0), β = 1 → q = (4/5, 1/5) = (0.8, 0.2); f^b = 0 → p = (½, ½)
    batch = batch_of([LN4, 0.0], [0.0, 0.0])
    out = method.training_step(model, batch, epoch=2)  # stage 1: phase 1 of b, a is the other member
    assert out.loss.item() == pytest.approx(1.4556, abs=1e-4)
    assert out.logs["q_true"] == pytest.approx(0.8)
    # ga = MSE((½, ½), (0.8, 0.2)) = (0.3² + 0.3²) / 2 = 0.09 (detached: logged only)
    assert out.logs["ga"] == pytest.approx(0.09, abs=1e-6)
    # stage 0: phase 1 of a with no other member, q_y := 1; a's logits (0, 0) here
    out0 = method.training_step(model, batch_of([0.0, 0.0], [LN4, 0.0]), epoch=0)
    assert out0.loss.item() == pytest.approx(1.3863, abs=1e-4)
    assert out0.logs["q_true"] == 1.0 and "ga" not in out0.logs


def test_q_uses_beta_and_carries_no_gradient():
    method, model = identity_setup(beta=0.5)
    # β = ½: β h(f^a) = (ln 2, 0) → q = (2/3, 1/3); ℓ = ½ ln 2 (5 − 2/3) = 1.501819
    out = method.training_step(model, batch_of([2 * math.log(2), 0.0], [0.0, 0.0]), epoch=2)
    assert out.loss.item() == pytest.approx(0.5 * math.log(2) * (5 - 2 / 3), rel=1e-6)
    out.loss.backward()
    ens = model.method_modules[ENSEMBLE]
    assert ens.beta.grad is None and all(p.grad is None for p in model.encoders["a"].parameters())
    assert model.encoders["b"].weight.grad is not None and ens.head[0].weight.grad is not None


# ---- the schedule


def test_stage_phase_and_modality_schedule():
    mods = ("a", "b")
    one_one = [phase_of(e, mods, 1, 1) for e in range(6)]
    assert one_one == [
        Phase(0, 1, "a", True),
        Phase(0, 2, "a", True),
        Phase(1, 1, "b", True),
        Phase(1, 2, "b", True),
        Phase(2, 1, "a", True),
        Phase(2, 2, "a", True),
    ]
    # T1 = 2, T2 = 1: stages of 3 epochs; the second phase-1 epoch does not start a phase
    two_one = [phase_of(e, mods, 2, 1) for e in range(6)]
    assert [(p.stage, p.phase, p.modality, p.starts_phase) for p in two_one] == [
        (0, 1, "a", True),
        (0, 1, "a", False),
        (0, 2, "a", True),
        (1, 1, "b", True),
        (1, 1, "b", False),
        (1, 2, "b", True),
    ]
    # three modalities cycle in dataset order
    assert [phase_of(e, ("a", "b", "c"), 1, 1).modality for e in range(0, 8, 2)] == ["a", "b", "c", "a"]


def test_ensemble_grows_one_learner_per_stage_or_starts_full():
    assert ensemble_members(0, ("a", "b"), "empty") == ["a"]
    assert ensemble_members(1, ("a", "b"), "empty") == ["a", "b"]
    assert ensemble_members(7, ("a", "b"), "empty") == ["a", "b"]  # never duplicated
    assert ensemble_members(1, ("a", "b", "c"), "empty") == ["a", "b"]
    assert ensemble_members(0, ("a", "b"), "full") == ["a", "b"]


# ---- what each phase trains (the trainer's real step: SGD with momentum and weight decay)


def snapshot(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without BatchNorm buffers (running statistics, batch counts)."""
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def changed(before: dict, after: dict, prefix: str) -> list[bool]:
    return [not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)]


@pytest.mark.parametrize("others_train_mode", [True, False])
def test_phase_1_moves_only_the_stage_s_learner_and_the_head(tiny_config, others_train_mode):
    run = TrainingRun(
        tiny_config("method.name=reconboost", MLP, f"method.params.others_train_mode={others_train_mode}")
    )
    run.model.train()
    batch = next(iter(run.loader)).to(run.runtime.device)
    before = snapshot(run)
    run._step(batch, 2)  # stage 1, phase 1: the weak learner; strong is the other member
    after = snapshot(run)
    assert not any(changed(weights(before), after, "encoders.strong."))
    assert not any(changed(before, after, f"method_modules.{ENSEMBLE}.beta"))
    assert all(changed(weights(before), after, "encoders.weak."))
    assert all(changed(before, after, f"method_modules.{ENSEMBLE}.head."))
    # the other learner's no-grad forward ran in train mode (BN running stats move) or in eval mode
    stats = {k: v for k, v in before.items() if k.startswith("encoders.strong.") and "running" in k}
    moved = changed(stats, after, "encoders.strong.")
    assert stats and (all(moved) if others_train_mode else not any(moved))
    assert run.model.encoders["strong"].training  # the mode is restored
    assert not any(changed(before, after, "fusion.")) and not any(changed(before, after, "unimodal_heads."))


def test_phase_2_moves_every_member_the_head_and_beta(tiny_config):
    run = TrainingRun(tiny_config("method.name=reconboost", MLP))
    batch = next(iter(run.loader)).to(run.runtime.device)
    before = weights(snapshot(run))
    run._step(batch, 1)  # stage 0, phase 2: the ensemble holds the strong learner only
    after = snapshot(run)
    assert all(changed(before, after, "encoders.strong.")) and not any(
        changed(before, after, "encoders.weak.")
    )
    assert all(changed(before, after, f"method_modules.{ENSEMBLE}."))
    before = weights(snapshot(run))
    run._step(batch, 3)  # stage 1, phase 2: both learners, h and β
    after = snapshot(run)
    assert all(changed(before, after, "encoders.")) and all(
        changed(before, after, f"method_modules.{ENSEMBLE}.")
    )
    assert not any(changed(before, after, "fusion.")) and not any(changed(before, after, "unimodal_heads."))
    trained = {id(p) for p in run.optimizers.all_params()}
    assert not any(id(p) in trained for p in run.model.fusion.parameters())
    assert not any(id(p) in trained for p in run.model.unimodal_heads.parameters())


# ---- the optimiser is "re-created" (its momentum forgotten) at each phase start, and resume is exact


def test_optimizer_state_is_cleared_at_each_phase_start_only(tiny_config):
    run = TrainingRun(tiny_config("method.name=reconboost", "method.params.phase1_epochs=2", MLP))
    batch = next(iter(run.loader)).to(run.runtime.device)
    run._step(batch, 0)
    assert run.optimizers.main.state
    run.method.on_epoch_start(run.model, 1)  # phase 1 continues: momentum kept
    assert run.optimizers.main.state
    run.method.on_epoch_start(run.model, 2)  # phase 2 starts: momentum forgotten, lr kept
    assert not run.optimizers.main.state
    assert run.optimizers.main.param_groups[0]["lr"] == run.cfg.optimizer.lr
    run._step(batch, 2)
    run.method.on_epoch_start(run.model, 3)  # stage 1, phase 1 starts
    assert not run.optimizers.main.state and run.method.stage == 1


@pytest.mark.parametrize("crash_after", [0, 1])  # mid-phase 1, and at the phase-1 → phase-2 boundary
def test_resume_mid_phase_and_at_a_phase_boundary_equals_an_uninterrupted_run(
    tiny_config, tmp_path, crash_after
):
    overrides = ("method.name=reconboost", "method.params.phase1_epochs=2", "train.epochs=4", MLP)
    full = train(tiny_config(*overrides, f"train.checkpoint_dir={tmp_path / 'full'}"))
    cfg = tiny_config(*overrides, f"train.checkpoint_dir={tmp_path / 'part'}")

    def crash(epoch, metrics, checkpoint_dir):
        if epoch == crash_after:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train(cfg, callbacks=[crash])
    resumed = train(cfg)
    assert resumed.history == full.history and resumed.test == full.test
    assert [h["method/phase"] for h in full.history] == [1.0, 1.0, 2.0, 1.0]
    assert [h["method/ensemble_size"] for h in full.history] == [1.0, 1.0, 1.0, 2.0]


# ---- the evaluated prediction and the coalitions


def test_prediction_is_beta_times_the_sum_over_members():
    method, model = identity_setup(beta=2.0)
    features = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 3.0]])}
    # stage 0 (only a is a member): β h(f^a) = 2 (1, 0) = (2, 0)
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([[2.0, 0.0]]))
    method.stage = 1  # both: 2 ((1, 0) + (0, 3)) = (2, 6)
    torch.testing.assert_close(method.logits_from_features(model, features), torch.tensor([[2.0, 6.0]]))
    # coalitions drop the left-out member from the sum (zeroing would add h(0); see the next test)
    torch.testing.assert_close(
        method.coalition_logits(model, features, frozenset({"b"})), torch.tensor([[0.0, 6.0]])
    )
    torch.testing.assert_close(method.coalition_logits(model, features, frozenset()), torch.zeros(1, 2))
    method.stage = 0  # b is not a member yet: keeping it alone predicts nothing
    torch.testing.assert_close(method.coalition_logits(model, features, frozenset({"b"})), torch.zeros(1, 2))
    full, model_full = identity_setup(beta=2.0, ensemble_start="full")
    torch.testing.assert_close(full.logits_from_features(model_full, features), torch.tensor([[2.0, 6.0]]))
    assert full.label == "reconboost[full]" and method.label == "reconboost"


def test_coalition_sum_differs_from_zeroing_when_h_of_zero_is_not_zero():
    method, model = identity_setup()
    method.stage = 1
    with torch.no_grad():
        model.method_modules[ENSEMBLE].head[2].bias.copy_(torch.tensor([1.0, 0.0]))
    features = {"a": torch.tensor([[0.0, 2.0]]), "b": torch.tensor([[0.0, 1.0]])}
    # kept {a}: h(f^a) = (1, 2); zeroing b would add h(0) = (1, 0) → (2, 2), a different prediction
    torch.testing.assert_close(
        method.coalition_logits(model, features, frozenset({"a"})), torch.tensor([[1.0, 2.0]])
    )


# ---- state and requirements


def test_state_round_trips_the_stage_and_its_prediction():
    method, model = identity_setup()
    method.stage = 3
    clone = build_method("reconboost", {"hidden": 2}, CONTEXT)
    clone.load_state_dict(method.state_dict())
    assert clone.state_dict() == {"stage": 3}
    features = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
    torch.testing.assert_close(
        clone.logits_from_features(model, features), method.logits_from_features(model, features)
    )


def test_unequal_feature_widths_and_bad_weights_are_refused():
    method = build_method("reconboost", {}, CONTEXT)
    model = MultimodalModel({"a": Linear(4, 3), "b": Linear(2, 5)}, ConcatFusion({"a": 3, "b": 5}, 2), 2)
    with pytest.raises(ConfigError, match=r"equal widths.*'a': 3, 'b': 5"):
        method.build_modules(model)
    with pytest.raises(ConfigError, match="w2 must be ≤ w1"):
        build_method("reconboost", {"w1": 1.0, "w2": 2.0}, CONTEXT)
    with pytest.raises(ConfigError, match="at least 2 modalities"):
        METHODS.get("reconboost").requires.check("reconboost", "concat", True, 1)
