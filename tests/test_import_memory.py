"""An import's memory stays bounded as the dataset grows (issue 9, item 1): rows stream from the input
files to the output in record batches, nothing holds a whole modality or a whole split.

Measured as the peak of the process's anonymous resident memory (``tests/memory_probe.py``): the pages
of memory-mapped inputs and outputs are the kernel's page cache, reclaimable, and not what runs a
machine out of memory. A 64 MiB record batch in flight is the expected peak; the data is ~550 MB.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from memory_probe import PRELUDE

SCRIPT = PRELUDE + textwrap.dedent(
    """
    import sys
    from midasbench.datasets.importer import import_folder

    measure(lambda: import_folder(sys.argv[1], name="big", out=sys.argv[2], split=sys.argv[3]))
    """
)


def write_input(folder, rows: int, width: int, dtype) -> int:
    folder.mkdir()
    labels = ["id,label,split"] + [f"s{i},{i % 4},{('train', 'val', 'test')[i % 3]}" for i in range(rows)]
    (folder / "labels.csv").write_text("\n".join(labels) + "\n")
    values = np.lib.format.open_memmap(folder / "frames.npy", mode="w+", dtype=dtype, shape=(rows, width))
    for start in range(0, rows, 4096):
        ids = np.arange(start, min(start + 4096, rows))
        values[start : start + 4096] = (ids[:, None] % 251).astype(dtype)
    values.flush()
    del values
    return rows * width * np.dtype(dtype).itemsize


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "split"), [("uint8", "midas70"), ("float64", "official")])
def test_peak_memory_of_an_import_stays_bounded_as_the_dataset_grows(tmp_path, dtype, split):
    # uint8 is kept as is; float64 is cast to float32 batch by batch (never the whole array)
    size = write_input(tmp_path / "in", rows=48_000, width=12_000 if dtype == "uint8" else 1_500, dtype=dtype)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "in"), str(tmp_path / "out"), split],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    growth = int(done.stdout.strip().splitlines()[-1])
    print(f"{dtype}: {size / 2**20:.0f} MB imported, anonymous memory peak +{growth} MB")
    assert growth < 160, f"importing {size / 2**20:.0f} MB grew anonymous memory by {growth} MB"
    from midasbench.datasets.format import ArrowDataset

    data = ArrowDataset(tmp_path / "out")
    train = data.split("train")
    row = int(np.flatnonzero(train.ids == "s123")[0]) if "s123" in set(train.ids) else 0
    expected = int(train.ids[row][1:]) % 251
    assert np.all(train.columns["frames"].gather(np.array([row])) == expected)
