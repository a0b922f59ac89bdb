"""Every registered method under torch.distributed (as inside a Ray Train worker): two CPU ranks over gloo.

One spawn runs every method (plus the tests' own module-owning method): a few steps on ``synthetic``
with BatchNorm and dropout in the encoders, then the same run crashed halfway and resumed. Afterwards
every parameter, buffer, optimiser state and method state must be bitwise equal across the two ranks,
and the final metrics must equal those of the resumed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from method_cases import METHOD_CASES, TRAIN_OVERRIDES, synthetic_params
from owning_method import NAME as OWNING
from owning_method import OwningMethod

from midasbench.harness.config import load_config
from midasbench.harness.training.runtime import Runtime
from midasbench.harness.training.trainer import TrainingRun, dataset_path, train
from midasbench.methods import METHODS

EPOCHS = 3


class Crash(RuntimeError):
    pass


def _overrides(method: str, data_root: str, options: dict, ckpt: Path) -> list[str]:
    return [
        f"method.name={method}",
        f"method.params={json.dumps(synthetic_params(method)) if method in METHOD_CASES else '{}'}",
        f"data.root={data_root}",
        f"data.options={json.dumps(options)}",
        "model.default_encoder.params={hidden: [16], out_dim: 8, input_batchnorm: true, dropout: 0.2}",
        f"train.epochs={EPOCHS}",
        "train.batch_size=16",
        "train.progress=false",
        f"train.checkpoint_dir={ckpt}",
        "tracking.enabled=false",
        *TRAIN_OVERRIDES.get(method, []),
    ]


def _snapshot(run: TrainingRun) -> dict:
    """Everything that must agree across replicas at the end of training (before the test reload)."""
    return {
        "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizers": run.optimizers.state_dict(),
        "method": run.method.state_dict(),
    }


def _run_methods(
    rank: int, world_size: int, init_file: str, methods: list[str], data_root: str, out_root: str, opts: dict
) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=45),
    )
    torch.set_num_threads(1)
    _check_collectives(rank, world_size, Path(out_root))
    snapshots: dict[str, dict] = {}
    original = TrainingRun.test_on_best

    def capture(self: TrainingRun) -> dict:
        snapshots[self.cfg.method.name] = _snapshot(self)
        return original(self)

    TrainingRun.test_on_best = capture  # type: ignore[method-assign]
    try:
        with METHODS.temporarily(OWNING, OwningMethod):
            for method in methods:
                out = Path(out_root, method)
                full = train(load_config("synthetic", _overrides(method, data_root, opts, out / "full")))
                torch.save(snapshots[method], out / f"rank{rank}.pt")
                cfg = load_config("synthetic", _overrides(method, data_root, opts, out / "part"))

                def crash(epoch: int, metrics: dict, directory: Path) -> None:
                    if epoch == EPOCHS // 2:
                        raise Crash

                with contextlib.suppress(Crash):
                    train(cfg, callbacks=[crash])
                resumed = train(cfg)
                payload = {
                    name: {"test": r.test, "best_epoch": r.best_epoch, "history": r.history}
                    for name, r in (("full", full), ("resumed", resumed))
                }
                (out / f"rank{rank}.json").write_text(json.dumps(payload))
    finally:
        dist.destroy_process_group()


ROWS = [5, 3, 3, 9, 0]  # a repeat, and five rows over two ranks (one pad)


def _check_collectives(rank: int, world_size: int, out_root: Path) -> None:
    """The runtime's collectives and its sharded ``encode_rows`` on two real ranks."""

    def encode(model, split, rows, names):  # a stand-in encoder: the feature of row r is (r, 10 r)
        values = torch.tensor(rows, dtype=torch.float32)
        return {"a": torch.stack([values, 10 * values], 1)}, torch.tensor(rows)

    runtime = Runtime(rank=rank, world_size=world_size, train_split=object(), encode_fn=encode)
    model = types.SimpleNamespace(modalities=["a"])
    features, labels = runtime.encode_rows(model, np.array(ROWS))  # type: ignore[arg-type]
    mine = torch.tensor([float(rank + 1)])
    result = {
        "features": features["a"].tolist(),
        "labels": labels.tolist(),
        "sum": runtime.all_reduce_sum(mine).tolist(),
        "mean": runtime.all_reduce_mean(mine).tolist(),
        "broadcast": runtime.broadcast(mine, src=1).tolist(),
        "gather": runtime.all_gather(mine).tolist(),
        "object": runtime.broadcast_object({"rank": rank}),
    }
    (out_root / f"collectives{rank}.json").write_text(json.dumps(result))


def _assert_bitwise_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), (
            f"{where}: replicas differ (max |Δ| {(a.double() - b.double()).abs().max()})"
        )
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


ALL_METHODS = [*METHODS.names(), OWNING]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, data_root):
    from conftest import TINY_SYNTHETIC

    tiny_options = dict(TINY_SYNTHETIC)
    root = tmp_path_factory.mktemp("ddp")
    for method in ALL_METHODS:
        (root / method).mkdir()
    # the dataset is built once before the ranks start (as the sweep driver does)
    dataset_path(load_config("synthetic", _overrides("joint", str(data_root), tiny_options, root / "x")))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(
        _run_methods,
        args=(2, str(root / "init"), ALL_METHODS, str(data_root), str(root), tiny_options),
        nprocs=2,
        join=True,
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_METHODS)
def test_two_ranks_stay_bitwise_equal_and_resume_exactly(two_rank_runs, method):
    out = two_rank_runs / method
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    _assert_bitwise_equal(r0["model"], r1["model"], f"{method}: model")
    _assert_bitwise_equal(r0["optimizers"], r1["optimizers"], f"{method}: optimizers")
    _assert_bitwise_equal(r0["method"], r1["method"], f"{method}: method state")
    m0, m1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # every rank evaluates the same model on the same split: identical metrics
    _assert_bitwise_equal(m0["full"]["test"], m1["full"]["test"], f"{method}: test metrics across ranks")
    # resumed halfway = uninterrupted
    _assert_bitwise_equal(m0["resumed"], m0["full"], f"{method}: resumed vs uninterrupted")
    assert len(m0["full"]["history"]) == EPOCHS
    if method == OWNING:  # logged by rank 0 only: averaged over the rows that logged it
        assert all(h["train/rank0_only"] == 1.0 for h in m0["full"]["history"])
        assert all(h["train/loss_aux"] > 0 for h in m0["full"]["history"])


@pytest.mark.slow
def test_runtime_collectives_and_sharded_encoding_on_two_ranks(two_rank_runs):
    for rank in (0, 1):
        got = json.loads((two_rank_runs / f"collectives{rank}.json").read_text())
        # each rank encoded its strided share; gathered, the rows come back in the order asked, pad dropped
        assert got["features"] == [[float(r), 10.0 * r] for r in ROWS] and got["labels"] == ROWS
        assert got["sum"] == [3.0] and got["mean"] == [1.5] and got["broadcast"] == [2.0]
        assert got["gather"] == [1.0, 2.0] and got["object"] == {"rank": 0}
