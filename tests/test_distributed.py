"""The trainer under torch.distributed (as inside a Ray Train worker): two CPU ranks over gloo."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from midasbench.harness.config import load_config
from midasbench.harness.training.trainer import dataset_path, train


def _worker(rank: int, world_size: int, init_file: str, overrides: list[str], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        result = train(load_config("synthetic", overrides))
        state = (
            torch.load(Path(result.checkpoint_dir) / "best.pt", weights_only=False)["model"]
            if rank == 0
            else None
        )
        flat = torch.cat([p.detach().reshape(-1) for p in state.values()]) if state else None
        payload = {"history": result.history, "test": result.test, "best_epoch": result.best_epoch}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(payload))
        if flat is not None:
            torch.save(flat, Path(out_dir, "best_params.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["joint", "midas"])
def test_two_ranks_train_one_model_and_agree(tmp_path, data_root, tiny_options, method):
    overrides = [
        f"method.name={method}",
        f"data.root={data_root}",
        f"data.options={json.dumps(tiny_options)}",
        "model.default_encoder.params={hidden: [16], out_dim: 8}",
        "train.epochs=2",
        "method.params={warmup_epochs: 1}" if method == "midas" else "method.params={}",
        "train.batch_size=16",
        "train.progress=false",
        f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        "tracking.enabled=false",
    ]
    # build the dataset once before the ranks start (as the sweep driver will)
    dataset_path(load_config("synthetic", overrides))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), overrides, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # gradients are averaged, so both ranks hold the same model and report the same metrics
    # gradients are averaged and MIDAS's α is shared from rank 0, so both ranks hold the same model and
    # report the same validation/test metrics and α (MIDAS's training-confidence logs are per-rank means)
    shared = ("val/", "train/loss", "method/alpha_", "lr", "best/")

    def comparable(result):
        history = [{k: v for k, v in h.items() if k.startswith(shared)} for h in result["history"]]
        return history, result["test"], result["best_epoch"]

    assert comparable(r0) == comparable(r1)
    assert (tmp_path / "best_params.pt").is_file()
    # each rank saw half of the 240 training rows per epoch: 8 batches of 16 → 120 rows
    assert len(r0["history"]) == 2
