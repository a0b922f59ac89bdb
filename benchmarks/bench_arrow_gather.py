"""Random mini-batch gather: the Arrow reader (``format.py``) against a numpy memmap of the same arrays.

Training reads random mini-batches, so the canonical format is only worth it if a batch gather from the
memory-mapped Arrow file is about as fast as from a plain ``.npy`` memmap. The project goal is at least
0.8x the numpy rows/s in every layout (the default, record batches of at most 64 MiB, and a copy in small
record batches); the script exits with status 1 when a case falls below that.

Both sides open their file once and are timed per batch on a warm page cache (one untimed pass first,
then the best of ``--repeats`` passes): (a) ``TensorColumn.gather(idx)`` + ``as_torch``, (b)
``np.load(path, mmap_mode="r")[idx]`` + ``torch.from_numpy``. Indices are drawn without replacement
within a batch, either sorted (as a sampler may do) or not. A second Arrow copy written in small
record batches (``--small-chunk-rows``) checks that gathers across many chunks cost what one chunk
does (``TensorColumn`` indexes a byte-strided view of the whole file).

    .venv/bin/python benchmarks/bench_arrow_gather.py [--rows 50000] [--repeats 3] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from midasbench.datasets.format import ArrowDataset, SplitArrays, TensorColumn, as_torch, write_dataset

GOAL = 0.8
MODALITIES: dict[str, tuple[int, ...]] = {"feat": (512,), "image": (1, 32, 32)}


@dataclass
class Result:
    modality: str
    reader: str
    batch: int
    order: str
    numpy_s: float
    arrow_s: float
    rows: int
    row_bytes: int

    @property
    def ratio(self) -> float:
        return self.numpy_s / self.arrow_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows in the train split (default 50000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per case; best is kept")
    parser.add_argument(
        "--tmp", type=Path, default=None, help="where to write the data (default: a temp dir)"
    )
    parser.add_argument(
        "--pass-rows",
        type=int,
        default=102_400,
        help="rows gathered per timed pass, in batches of 64 or 256 (default 102400)",
    )
    parser.add_argument(
        "--small-chunk-rows",
        type=int,
        default=8192,
        help="record-batch rows of the multi-chunk Arrow copy; 0 skips it (default 8192)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    return parser.parse_args(argv)


def write_data(base: Path, rows: int, small_chunk_rows: int) -> dict[str, Path]:
    """Write the Arrow dataset(s) and one ``.npy`` per modality holding the same train rows."""
    rng = np.random.default_rng(0)
    arrays = {name: rng.random((rows, *shape), dtype=np.float32) for name, shape in MODALITIES.items()}
    train = SplitArrays(ids=np.arange(rows).astype(str), labels=np.arange(rows) % 2, modalities=arrays)
    tiny = train.take(np.arange(min(rows, 8)))  # write_dataset needs val and test; they are not read
    paths: dict[str, Path] = {}
    variants: dict[str, dict[str, int]] = {"arrow": {}}  # write_dataset's own record-batch size
    if small_chunk_rows > 0:
        variants["arrow-small"] = {"chunk_rows": small_chunk_rows}
    for label, options in variants.items():
        write_dataset(
            base / label,
            name="bench",
            version="1",
            classes=["a", "b"],
            splits={"train": train, "val": tiny, "test": tiny},
            split_protocol="official",
            split_seed=None,
            **options,
        )
        paths[label] = base / label
    for name, arr in arrays.items():
        np.save(base / f"{name}.npy", arr)
        paths[name] = base / f"{name}.npy"
    return paths


def batches(rows: int, batch: int, count: int, sort: bool, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = rng.choice(rows, size=batch, replace=False)
        out.append(np.sort(idx) if sort else idx)
    return out


Gather = Callable[[np.ndarray], torch.Tensor]


def best_times(readers: list[Gather], index: list[np.ndarray], repeats: int) -> list[float]:
    """Best wall time per reader of ``repeats`` passes over all batches, after one untimed pass each.

    The readers take turns pass by pass, so that a slow or noisy moment of the machine hits both alike.
    """
    for fn in readers:
        for idx in index:
            fn(idx)
    best = [float("inf")] * len(readers)
    for _ in range(repeats):
        for i, fn in enumerate(readers):
            gc.collect()
            start = time.perf_counter()
            for idx in index:
                fn(idx)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def run(args: argparse.Namespace) -> list[Result]:
    if args.tmp is not None:
        args.tmp.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-arrow-", dir=args.tmp))
    try:
        start = time.perf_counter()
        paths = write_data(base, args.rows, args.small_chunk_rows)
        print(f"wrote {args.rows} rows to {base} in {time.perf_counter() - start:.1f}s")
        splits = [ArrowDataset(paths[label]).split("train") for label in paths if label.startswith("arrow")]
        results = []
        for name, shape in MODALITIES.items():
            memmap = np.load(paths[name], mmap_mode="r")
            np.asarray(memmap).sum()  # fault the file into the page cache once
            row_bytes = int(np.prod(shape)) * 4

            def numpy_gather(idx: np.ndarray, memmap: np.ndarray = memmap) -> torch.Tensor:
                return torch.from_numpy(memmap[idx])

            for split in splits:
                column = split.columns[name]
                column.to_numpy().sum()
                label = f"arrow, {len(column.chunks)} chunk{'s' if len(column.chunks) > 1 else ''}"
                check = np.random.default_rng(1).choice(args.rows, size=64, replace=False)
                if not np.array_equal(column.gather(check), memmap[check]):
                    raise SystemExit(f"{split.path}: gather returned other values than {paths[name]}")

                def arrow_gather(idx: np.ndarray, column: TensorColumn = column) -> torch.Tensor:
                    return as_torch(column.gather(idx))

                for batch in (64, 256):
                    for order in ("sorted", "unsorted"):
                        index = batches(
                            args.rows, batch, args.pass_rows // batch, order == "sorted", seed=batch
                        )
                        numpy_s, arrow_s = best_times([numpy_gather, arrow_gather], index, args.repeats)
                        results.append(
                            Result(name, label, batch, order, numpy_s, arrow_s, batch * len(index), row_bytes)
                        )
        return results
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def print_table(results: list[Result], rows: int) -> None:
    header = [
        "modality",
        "reader",
        "batch",
        "order",
        "arrow rows/s",
        "arrow MB/s",
        "numpy rows/s",
        "numpy MB/s",
    ]
    header.append("arrow/numpy")
    lines = []
    for r in results:
        arrow_rows, numpy_rows = r.rows / r.arrow_s, r.rows / r.numpy_s
        lines.append(
            [
                r.modality,
                r.reader,
                str(r.batch),
                r.order,
                f"{arrow_rows:,.0f}",
                f"{arrow_rows * r.row_bytes / 1e6:,.0f}",
                f"{numpy_rows:,.0f}",
                f"{numpy_rows * r.row_bytes / 1e6:,.0f}",
                f"{r.ratio:.2f}" + ("" if r.ratio >= GOAL else " !"),
            ]
        )
    title = f"random gather, {rows} rows, float32; goal arrow/numpy >= {GOAL}"
    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < 4 else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = run(args)
    print_table(results, args.rows)
    slow = [r for r in results if r.ratio < GOAL]
    if slow:
        cases = "; ".join(f"{r.modality} {r.reader} batch {r.batch} {r.order}: {r.ratio:.2f}" for r in slow)
        print(f"FAIL: arrow/numpy below {GOAL} in {len(slow)} case(s): {cases}", file=sys.stderr)
        return 1
    print(f"OK: every layout is at or above {GOAL}x the numpy memmap in every case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
