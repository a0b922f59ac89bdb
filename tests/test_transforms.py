"""Per-modality transforms on the device (datasets/transforms.py): each transform's arithmetic on tiny
tensors with values worked out by hand, the draws' determinism per (seed, epoch, row), the pipelines'
shape checks, and the config path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midasbench.datasets.format import DatasetFormatError, ModalitySpec
from midasbench.datasets.transforms import (
    IMAGENET_MEAN,
    TRANSFORMS,
    ModalityPipelines,
    row_uniforms,
)
from midasbench.harness.config import build_config
from midasbench.harness.errors import ConfigError
from midasbench.harness.params import parse_params

MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The published splitmix64 step on Python integers: an implementation independent of numpy's."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def make(name: str, **params):
    entry = TRANSFORMS.get(name)
    return entry.factory(parse_params(entry.params, params, name))


def test_row_uniforms_are_the_documented_hash_of_seed_epoch_stream_row_and_draw():
    seed, epoch, stream, rows = 7, 3, 11, np.array([5, 0, 2**40])
    got = row_uniforms(seed, epoch, rows, stream, 2)
    for i, row in enumerate(rows.tolist()):
        key = splitmix64(splitmix64(seed ^ epoch) ^ stream)
        per_row = splitmix64(key ^ row)
        for j in range(2):
            assert got[i, j] == (splitmix64(per_row ^ (j + 1)) >> 40) / 2**24
    assert got.dtype == np.float32 and np.all((got >= 0) & (got < 1))


def test_a_rows_draws_do_not_depend_on_its_batch_and_change_with_the_epoch():
    alone = row_uniforms(0, 1, np.array([4]), 9, 3)
    in_batch = row_uniforms(0, 1, np.array([7, 4, 1]), 9, 3)
    np.testing.assert_array_equal(alone[0], in_batch[1])
    assert not np.array_equal(row_uniforms(0, 2, np.array([4]), 9, 3), alone)  # another epoch
    assert not np.array_equal(row_uniforms(1, 1, np.array([4]), 9, 3), alone)  # another seed
    assert not np.array_equal(row_uniforms(0, 1, np.array([4]), 10, 3), alone)  # another transform


def test_frames_keeps_one_frame_per_segment():
    # (B=1, C=1, T=6): frames valued 0..5; 3 segments [0,2) [2,4) [4,6)
    x = torch.arange(6.0).view(1, 1, 6)
    center = make("frames", num=3, axis=1, mode="center")
    assert center(x, None).flatten().tolist() == [1.0, 3.0, 5.0]  # start + width/2 = 0+1, 2+1, 4+1
    rand = make("frames", num=3, axis=1)
    assert rand.draws == 3
    assert rand(x, torch.zeros(1, 3)).flatten().tolist() == [0.0, 2.0, 4.0]  # offset 0
    assert rand(x, torch.full((1, 3), 0.99)).flatten().tolist() == [1.0, 3.0, 5.0]  # floor(0.99*2) = 1
    spec = center.output_spec(ModalitySpec(dtype="uint8", shape=(1, 6)), "here")
    assert spec.shape == (1, 3) and spec.dtype == "uint8"
    with pytest.raises(DatasetFormatError, match=r"here: frames\.num=3 but samples hold 2 frames"):
        center.output_spec(ModalitySpec(dtype="uint8", shape=(1, 2)), "here")


def test_hflip_mirrors_the_rows_whose_draw_is_below_p():
    x = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])
    out = make("hflip", p=0.5)(x, torch.tensor([[0.2], [0.7]]))
    assert out.tolist() == [[[3.0, 2.0, 1.0]], [[4.0, 5.0, 6.0]]]


def test_random_resized_crop_boxes_and_exact_pixels():
    crop = make("random_resized_crop", size=4, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    # area 0.25 * 8 * 8 = 16, ratio 1 -> a 4 x 4 box; x1 = 0.5 * (8 - 4) = 2, y1 = 0 * 4 = 0
    box = crop.boxes(torch.tensor([[0.3, 0.6, 0.5, 0.0]]), 8, 8)
    assert box.tolist() == [[2.0, 0.0, 6.0, 4.0]]
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    out = crop(image, torch.tensor([[0.3, 0.6, 0.5, 0.0]]))
    # a box of whole pixels at output size 4: each output pixel samples its own input pixel
    torch.testing.assert_close(out, image[..., 0:4, 2:6].float() / 255)
    whole = make("random_resized_crop", size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole(image, torch.rand(1, 4)), image.float() / 255)  # the full image
    spec = crop.output_spec(ModalitySpec(dtype="uint8", shape=(3, 5, 8, 8)), "v")
    assert spec.shape == (3, 5, 4, 4) and spec.dtype == "float32"


def test_random_resized_crop_gives_every_frame_of_a_clip_the_same_box():
    clip = torch.rand(2, 3, 4, 16, 16)  # (B, C, T, H, W)
    crop = make("random_resized_crop", size=8)
    u = torch.rand(2, 4)
    out = crop(clip, u)
    assert out.shape == (2, 3, 4, 8, 8)
    one_frame = crop(clip[:, :, 1], u)
    torch.testing.assert_close(out[:, :, 1], one_frame)


def test_box_larger_than_the_image_is_clipped_to_it():
    crop = make("random_resized_crop", size=4, scale=(1.0, 1.0), ratio=(4.0, 4.0))
    # area 64, ratio 4: w = sqrt(256) = 16 -> 8 (the width), h = sqrt(16) = 4
    assert crop.boxes(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), 8, 8).tolist() == [[0.0, 4.0, 8.0, 8.0]]


def test_center_crop_and_resize():
    x = torch.arange(36.0).view(1, 6, 6)
    out = make("center_crop", size=(2, 4))(x, None)
    assert out.tolist() == [[[13.0, 14.0, 15.0, 16.0], [19.0, 20.0, 21.0, 22.0]]]  # rows 2-3, cols 1-4
    flat = torch.full((1, 1, 4, 4), 3.0)
    assert torch.equal(make("resize", size=2)(flat, None), torch.full((1, 1, 2, 2), 3.0))
    with pytest.raises(DatasetFormatError, match="larger than"):
        make("center_crop", size=8).output_spec(ModalitySpec(dtype="float32", shape=(6, 6)), "m")


def test_spec_mask_sets_the_drawn_bands():
    mask = make("spec_mask", time_masks=1, time_width=2, freq_masks=1, freq_width=1, value=-1.0)
    x = torch.zeros(1, 5, 3)  # (B, frames, bins)
    # time: width floor(0.9 * 3) = 2, start floor(0.5 * (5 - 2 + 1)) = 2 -> frames 2, 3
    # freq: width floor(0.6 * 2) = 1, start floor(0.0 * 3) = 0 -> bin 0
    out = mask(x, torch.tensor([[0.9, 0.5, 0.6, 0.0]]))
    expected = torch.zeros(1, 5, 3)
    expected[:, 2:4, :] = -1.0
    expected[:, :, 0] = -1.0
    assert torch.equal(out, expected)


def test_normalize_per_channel_reads_uint8_as_fractions():
    norm = make("normalize", mean=[0.5, 0.0], std=[0.5, 2.0])
    x = torch.tensor([[[255, 0]], [[0, 255]]], dtype=torch.uint8).view(1, 2, 1, 2)  # (B, C=2, 1, 2)
    # channel 0: (1 - 0.5) / 0.5 = 1, (0 - 0.5) / 0.5 = -1; channel 1: 0 / 2 = 0, 1 / 2 = 0.5
    assert norm(x, None).flatten().tolist() == [1.0, -1.0, 0.0, 0.5]
    preset = parse_params(TRANSFORMS.get("normalize").params, {"preset": "imagenet"}, "n")
    assert preset.mean == list(IMAGENET_MEAN)
    with pytest.raises(DatasetFormatError, match="normalize has 3 means for 2 channels"):
        make("normalize", preset="imagenet").output_spec(ModalitySpec(dtype="uint8", shape=(2, 4, 4)), "v")


VIDEO = {
    "visual": ModalitySpec(dtype="uint8", shape=(3, 6, 12, 12)),
    "audio": ModalitySpec(dtype="float16", shape=(10, 4)),
}
CLIP_TRANSFORMS = {
    "visual": {
        "train": [
            {"name": "frames", "params": {"num": 2}},
            {"name": "random_resized_crop", "params": {"size": 8}},
            {"name": "hflip"},
        ],
        "eval": [
            {"name": "frames", "params": {"num": 2, "mode": "center"}},
            {"name": "resize", "params": {"size": 8}},
        ],
        "normalize": {"preset": "imagenet"},
    }
}


def test_pipelines_state_what_the_model_sees():
    pipes = ModalityPipelines(CLIP_TRANSFORMS, VIDEO)
    assert pipes.specs["visual"].shape == (3, 2, 8, 8) and pipes.specs["visual"].dtype == "float32"
    assert pipes.specs["audio"].dtype == "float32"  # half precision reaches the model as float32
    assert pipes.describe()["visual"]["train"] == ["frames", "random_resized_crop", "hflip", "normalize"]
    with pytest.raises(
        DatasetFormatError, match=r"train gives samples of \(3, 2, 8, 8\).*eval \(3, 6, 12, 12\)"
    ):
        ModalityPipelines({"visual": {**CLIP_TRANSFORMS["visual"], "eval": []}}, VIDEO)
    with pytest.raises(DatasetFormatError, match=r"\['text'\] are not modalities"):
        ModalityPipelines({"text": {}}, VIDEO)


def test_pipeline_output_is_a_function_of_seed_epoch_and_row():
    pipes = ModalityPipelines(CLIP_TRANSFORMS, VIDEO)
    clips = torch.randint(0, 255, (4, 3, 6, 12, 12), dtype=torch.uint8)
    rows = np.array([10, 11, 12, 13])

    def run(index, epoch):
        draws = {m: torch.from_numpy(u) for m, u in pipes.draws(rows[index], 0, epoch).items()}
        return pipes.apply({"visual": clips[index]}, draws, train=epoch is not None)["visual"]

    full = run(np.arange(4), 5)
    torch.testing.assert_close(run(np.array([2, 0]), 5), full[[2, 0]])  # other batch, same rows
    assert not torch.equal(run(np.arange(4), 6), full)  # another epoch, other crops
    assert torch.equal(run(np.arange(4), None), run(np.arange(4), None))  # eval: fixed


def test_config_validates_transforms_and_records_their_defaults():
    cfg = build_config(
        {"data": {"transforms": {"a": {"train": [{"name": "hflip"}], "normalize": {"preset": "imagenet"}}}}}
    )
    assert cfg.data.transforms["a"].train[0].params == {"p": 0.5}
    assert cfg.data.transforms["a"].normalize["mean"] == list(IMAGENET_MEAN)
    assert cfg.fingerprint() != build_config({}).fingerprint()
    with pytest.raises(ConfigError, match=r"data.transforms.a.train\[0\].name: unknown transform 'hflp'"):
        build_config({"data": {"transforms": {"a": {"train": [{"name": "hflp"}]}}}})
    with pytest.raises(ConfigError, match=r"data.transforms.a.eval\[0\].params.p"):
        build_config({"data": {"transforms": {"a": {"eval": [{"name": "hflip", "params": {"p": 2}}]}}}})


def test_list_transforms_names_every_registered_one(capsys):
    from midasbench.harness.cli import EXIT_OK, main

    assert main(["list", "transforms"]) == EXIT_OK
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(TRANSFORMS.names()) and "random_resized_crop" in listed


@pytest.fixture(scope="module")
def spectrogram_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A tiny two-modality dataset with a (frames, bins) fp16 spectrogram and uint8 (1, 6, 6) images."""
    from midasbench.datasets.format import SplitArrays, write_dataset

    rng = np.random.default_rng(0)

    def split(n: int, prefix: str) -> SplitArrays:
        labels = np.arange(n) % 3
        spec = (rng.normal(size=(n, 8, 4)) + labels[:, None, None]).astype(np.float16)
        image = rng.integers(0, 256, size=(n, 1, 6, 6)).astype(np.uint8)
        image[:, :, :, :3] = (labels * 80)[:, None, None, None]
        return SplitArrays([f"{prefix}{i}" for i in range(n)], labels, {"audio": spec, "image": image})

    path = tmp_path_factory.mktemp("tf") / "specs"
    write_dataset(
        path,
        name="specs",
        version="1",
        classes=["a", "b", "c"],
        splits={"train": split(60, "t"), "val": split(15, "v"), "test": split(15, "s")},
        split_protocol="official",
        split_seed=None,
    )
    return path


AUGMENTED = {
    "audio": {
        "train": [
            {
                "name": "spec_mask",
                "params": {"time_masks": 1, "time_width": 2, "freq_masks": 1, "freq_width": 1},
            }
        ]
    },
    "image": {
        "train": [
            {"name": "random_resized_crop", "params": {"size": 4, "scale": [0.5, 1.0]}},
            {"name": "hflip"},
        ],
        "eval": [{"name": "resize", "params": {"size": 4}}],
        "normalize": {"mean": [0.5], "std": [0.25]},
    },
}


def test_a_resumed_run_with_augmentation_equals_an_uninterrupted_one(spectrogram_dataset, tmp_path):
    import json

    from crash_support import Crash, crash_after

    from midasbench.harness.config import load_config
    from midasbench.harness.training.trainer import train

    def config(folder: str, transforms: dict = AUGMENTED):
        return load_config(
            "synthetic",
            [
                f"data.path={spectrogram_dataset}",
                "data.split=official",
                f"data.transforms={json.dumps(transforms)}",
                "model.default_encoder.params={hidden: [16], out_dim: 8}",
                "train.epochs=3",
                "train.batch_size=16",
                "train.progress=false",
                "train.num_threads=1",
                f"train.checkpoint_dir={tmp_path / folder}",
                "tracking.enabled=false",
            ],
        )

    whole = train(config("whole"))
    with pytest.raises(Crash):
        train(config("resumed"), callbacks=[crash_after(0)])
    resumed = train(config("resumed"))
    assert resumed.history == whole.history and resumed.test == whole.test
    plain = train(
        config("plain").model_copy(
            update={"data": config("plain").data.model_copy(update={"transforms": {}})}
        )
    )
    assert plain.history[0]["train/loss"] != whole.history[0]["train/loss"]  # the augmentation is applied


def test_random_rotation_turns_about_the_centre_counter_clockwise():
    rotate = make("random_rotation", degrees=180.0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.allclose(rotate(x, torch.tensor([[0.5]])), x, atol=1e-5)  # (2 * 0.5 - 1) * 180 = 0 degrees
    quarter = rotate(x, torch.tensor([[0.75]]))  # +90 degrees: the right column becomes the top row
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    half = rotate(x, torch.tensor([[0.0]]))  # -180 degrees
    assert torch.allclose(half, x.flip(-1).flip(-2), atol=1e-4)
    filled = make("random_rotation", degrees=45.0, fill=-1.0)(torch.zeros(1, 1, 8, 8), torch.tensor([[1.0]]))
    assert filled[0, 0, 0, 0] == -1.0 and filled[0, 0, 4, 4] == 0.0  # corners come from outside
    clip = torch.rand(2, 3, 5, 6, 6)  # every frame and channel of a row turns by the same angle
    out = rotate(clip, torch.tensor([[0.6], [0.3]]))
    torch.testing.assert_close(out[:, :, 2], rotate(clip[:, :, 2], torch.tensor([[0.6], [0.3]])))
