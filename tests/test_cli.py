"""The command line: exit codes scripts can trust and messages that name the problem."""

import json
import subprocess
import sys

import pytest
import torch

from midasbench.harness.cli import EXIT_OK, EXIT_USAGE, main


def run_cli(*args: str) -> int:
    return main(list(args))


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("--help")
    assert info.value.code == 0
    assert "train" in capsys.readouterr().out
    assert run_cli("list", "methods") == EXIT_OK
    out = capsys.readouterr().out
    from midasbench.methods import METHODS

    for name, cls in METHODS.items():  # every method with its fidelity and its parameters' defaults
        assert f"{name}" in out and f"[{cls.fidelity}]" in out
    assert "[inferred] MIDAS with the official code's α rule" in out and "lam=1.0, eta=0.05" in out
    # a module docstring's first sentence, wrapped lines joined, its ``name``: label dropped
    assert "[official-code] on-the-fly gradient modulation + Gaussian enhancement (Peng, Wei" in out
    assert "(Peng, Wei, Deng, Wang, Hu, CVPR 2022).\n" in out
    assert all(len(line) <= 140 for line in out.splitlines())
    for what, expected in [
        ("datasets", "synthetic"),
        ("encoders", "resnet18"),
        ("fusions", "concat"),
        ("presets", "cremad"),
    ]:
        assert run_cli("list", what) == EXIT_OK
        assert expected in capsys.readouterr().out


def test_bad_config_exits_2_naming_the_key(capsys):
    assert run_cli("train", "synthetic", "train.epochz=3") == EXIT_USAGE
    assert "train.epochz: unknown key" in capsys.readouterr().err
    assert run_cli("train", "no-such-preset") == EXIT_USAGE
    assert "unknown preset" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        run_cli("list", "things")
    assert info.value.code == 2


def test_print_config_shows_the_resolved_config(capsys):
    assert run_cli("train", "synthetic", "train.epochs=2", "--print-config") == EXIT_OK
    out = capsys.readouterr().out
    assert "epochs: 2" in out and "unimodal_weight: 0.0" in out


def test_data_build_info_and_train(tmp_path, capsys, monkeypatch, tiny_options):
    monkeypatch.chdir(tmp_path)
    options = json.dumps(tiny_options)
    assert (
        run_cli(
            "data",
            "build",
            "synthetic",
            "train_size=120",
            "--root",
            str(tmp_path / "d"),
            "--split",
            "official",
        )
        == EXIT_OK
    )
    out = capsys.readouterr().out
    assert "rows     train 120" in out
    path = out.splitlines()[0]
    assert run_cli("data", "info", path, "--verify") == EXIT_OK
    assert "content hash verified" in capsys.readouterr().out
    assert run_cli("data", "info", str(tmp_path)) == EXIT_USAGE
    assert "not a complete midasbench dataset" in capsys.readouterr().err
    code = run_cli(
        "train",
        "synthetic",
        f"data.root={tmp_path / 'd'}",
        f"data.options={options}",
        "train.epochs=2",
        "model.default_encoder.params={hidden: [8], out_dim: 8}",
    )
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "test acc" in out and "MLflow run" in out
    assert (tmp_path / "mlflow.db").is_file()  # the default store, in the working directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to fail")
def test_a_failing_run_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_cli(
        "train",
        "synthetic",
        f"data.root={tmp_path}",
        "data.options={train_size: 50}",
        "train.epochs=1",
        "train.device=cuda",
        "tracking.enabled=false",
    )
    assert code == 1
    assert "run failed: RuntimeError: train.device=cuda but no CUDA device" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "midasbench.harness.cli", "list", "presets"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "synthetic" in out
    # one line a preset: its description's first sentence, whole, or shortened at a word with " …"
    lines = dict(line.split(maxsplit=1) for line in out.strip().splitlines())
    assert lines["avdigits"].startswith("Offline audio-visual digits") and lines["avdigits"].endswith(" …")
    assert all(text.endswith((".", " …", ")")) for text in lines.values()), lines


def test_data_import_from_a_folder(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "mine"
    folder.mkdir()
    labels = ["cat", "dog"] * 10
    (folder / "labels.csv").write_text("id,label\n" + "".join(f"s{i},{y}\n" for i, y in enumerate(labels)))
    np.save(folder / "audio.npy", np.arange(20 * 3, dtype=np.float32).reshape(20, 3))
    code = run_cli("data", "import", str(folder), "--name", "mine", "--root", str(tmp_path / "root"))
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "modality audio: float32[3]" in out and "rows     train 14, val 2, test 4" in out
    (folder / "labels.csv").write_text("id,label\ns0,cat\ns0,dog\n")
    assert (
        run_cli("data", "import", str(folder), "--name", "mine2", "--root", str(tmp_path / "root"))
        == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert "labels.csv" in err and "s0" in err


def test_a_run_asking_for_another_split_than_the_imported_one_is_refused(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "mine"
    folder.mkdir()
    splits = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
    rows = "".join(f"s{i},{i % 2},{s}\n" for i, s in enumerate(splits))
    (folder / "labels.csv").write_text("id,label,split\n" + rows)
    np.save(folder / "audio.npy", np.arange(20 * 3, dtype=np.float32).reshape(20, 3))
    np.save(folder / "video.npy", np.arange(20 * 2, dtype=np.float32).reshape(20, 2))
    root = str(tmp_path / "root")
    imported = run_cli("data", "import", str(folder), "--name", "mine", "--root", root, "--split", "official")
    assert imported == EXIT_OK
    capsys.readouterr()
    common = ("train", "synthetic", "data.name=mine", f"data.root={root}", "data.options={}")
    common += ("train.epochs=1", "tracking.enabled=false", f"train.checkpoint_dir={tmp_path / 'c'}")
    # the synthetic preset asks for its own split (official); midas70 is refused, naming both and the fix
    code = run_cli(*common, "data.split=midas70")
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds split official, but the config asks for midas70 (split_seed 2)" in err
    assert "set data.split=official" in err
    assert run_cli(*common, "data.split=official") == EXIT_OK


def test_data_extract_writes_the_features_and_says_how_to_train_on_them(tmp_path, capsys):
    code = run_cli(
        "data",
        "extract",
        "synthetic",
        f"data.root={tmp_path}",
        "data.options={train_size: 50}",
        "model.default_encoder.params={hidden: [], out_dim: 4}",
        "--name",
        "feat",
        "--root",
        str(tmp_path),
    )
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "modality strong: float32[4] (features)" in out
    assert "data.name=feat 'model.default_encoder={name: identity}'" in out


def test_data_import_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "mine"
    folder.mkdir()
    labels = ["cat", "dog"] * 10
    (folder / "labels.csv").write_text("id,label\n" + "".join(f"s{i},{y}\n" for i, y in enumerate(labels)))
    (folder / "names.txt").write_text("dog\ncat\n")
    np.save(folder / "video.npy", np.zeros((20, 2, 3)))
    np.save(folder / "audio.npy", np.zeros((20, 4), dtype=np.float32))
    root = tmp_path / "root"
    args = ("data", "import", str(folder), "--name", "mine", "--root", str(root))
    assert run_cli(*args, "--classes-file", str(folder / "names.txt"), "--dry-run") == EXIT_OK
    out = capsys.readouterr().out
    assert "would import 20 samples" in out and "split midas70, split_seed 2" in out
    # modalities in file-name order, with their positions, stored dtypes and sources
    assert "modality 0 audio: float32[4] from audio.npy (npy, stored from float32)" in out
    assert "modality 1 video: float32[2, 3] from video.npy (npy, stored from float64)" in out
    assert "rows     train 14, val 2, test 4" in out
    assert "class 0 'dog': train 7, val 1, test 2" in out  # the classes file's order
    assert not root.exists()


def test_a_closed_pipe_is_not_a_failure():
    # `midasbench list methods | head -1`: the reader leaves before the output ends
    child = subprocess.Popen(
        [sys.executable, "-m", "midasbench.harness.cli", "list", "methods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.read(10)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait() == 0 and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_data_import_standardize_flag_reaches_the_manifest(tmp_path, capsys):
    import numpy as np

    from midasbench.datasets import ArrowDataset

    folder = tmp_path / "mine"
    folder.mkdir()
    labels = ["cat", "dog"] * 10
    (folder / "labels.csv").write_text("id,label\n" + "".join(f"s{i},{y}\n" for i, y in enumerate(labels)))
    np.save(folder / "audio.npy", np.arange(20 * 3, dtype=np.float32).reshape(20, 3) * 1000)
    out = tmp_path / "out"
    assert (
        run_cli("data", "import", str(folder), "--name", "m", "--out", str(out), "--standardize") == EXIT_OK
    )
    assert set(ArrowDataset(out).manifest.build_options["standardize"]) == {"audio"}
