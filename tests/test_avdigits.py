"""avdigits: the numpy log-mel, the espeak-ng speech helper, the PCA weakening and the built dataset."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from midasbench.datasets import ArrowDataset, avdigits, speech
from midasbench.datasets.audio import (
    LOG_FLOOR,
    add_white_noise,
    frame_count,
    hz_to_mel,
    log_mel_spectrogram,
    mel_edges,
    mel_filterbank,
    mel_to_hz,
    resample,
)
from midasbench.datasets.builders import build_dataset
from midasbench.datasets.format import DatasetFormatError

# ----------------------------------------------------------------------------------------- mel filterbank


def test_htk_mel_scale_known_values():
    assert hz_to_mel(0.0) == 0.0
    assert hz_to_mel(700.0) == pytest.approx(1127.0 * np.log(2.0))
    freqs = np.array([20.0, 440.0, 1000.0, 8000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs)), freqs)


def test_filterbank_shape_range_and_monotone_centres():
    banks = mel_filterbank(40, 512, 16000)
    assert banks.shape == (40, 257)
    assert banks.min() >= 0.0 and banks.max() <= 1.0
    assert (banks.max(axis=1) > 0).all()  # no empty filter at this resolution
    centres_mel = mel_edges(40, 20.0, 8000.0)[1:-1]
    steps = np.diff(centres_mel)
    assert (steps > 0).all()
    np.testing.assert_allclose(steps, steps[0])  # equally spaced on the mel scale
    assert mel_to_hz(centres_mel[0]) > 20.0 and mel_to_hz(centres_mel[-1]) < 8000.0
    # the first filter starts at 20 Hz and the last one ends at Nyquist: zero weight at DC and Nyquist
    assert banks[:, 0].sum() == 0.0 and banks[:, -1].sum() == pytest.approx(0.0, abs=1e-12)


def test_triangles_peak_at_one_at_their_centres():
    n_fft, rate = 1 << 15, 16000  # fine bins, so that one falls close to every centre
    banks = mel_filterbank(40, n_fft, rate)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    centres_hz = mel_to_hz(mel_edges(40, 20.0, rate / 2)[1:-1])
    assert np.all(banks.max(axis=1) > 0.99)
    assert np.all(np.abs(freqs[banks.argmax(axis=1)] - centres_hz) <= rate / n_fft)


def test_neighbouring_triangles_sum_to_one_between_the_outer_centres():
    """Adjacent triangles share their edges, so their weights add up to 1 inside the covered band."""
    banks = mel_filterbank(40, 512, 16000)
    mel = hz_to_mel(np.arange(257) * 16000 / 512)
    centres = mel_edges(40, 20.0, 8000.0)[1:-1]
    inside = (mel >= centres[0]) & (mel <= centres[-1])
    np.testing.assert_allclose(banks[:, inside].sum(axis=0), 1.0, atol=1e-9)


@pytest.mark.parametrize("tone_hz", [250.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_peaks_in_the_nearest_mel_bin(tone_hz):
    rate = 16000
    t = np.arange(rate) / rate
    features = log_mel_spectrogram(0.5 * np.sin(2 * np.pi * tone_hz * t), rate, 40)
    centres = mel_edges(40, 20.0, rate / 2)[1:-1]
    expected = int(np.argmin(np.abs(centres - hz_to_mel(tone_hz))))
    assert int(features.mean(axis=0).argmax()) == expected


# ----------------------------------------------------------------------------------------- framing


@pytest.mark.parametrize(("rate", "num_samples"), [(16000, 400), (16000, 401), (16000, 559), (16000, 560),
                                                   (16000, 16000), (22050, 22050), (22050, 771)])  # fmt: skip
def test_frame_count_is_kaldi_snip_edges(rate, num_samples):
    win, hop = int(0.025 * rate), int(0.010 * rate)
    wave = np.random.default_rng(0).standard_normal(num_samples)
    features = log_mel_spectrogram(wave, rate, 23)
    assert features.shape == (1 + (num_samples - win) // hop, 23)
    assert features.dtype == np.float32
    assert frame_count(num_samples, rate) == features.shape[0]


def test_batches_silence_and_short_input():
    batch = np.random.default_rng(1).standard_normal((3, 2, 1600))
    out = log_mel_spectrogram(batch, 16000, 40)
    assert out.shape == (3, 2, 8, 40)
    np.testing.assert_allclose(out[1, 0], log_mel_spectrogram(batch[1, 0], 16000, 40), rtol=1e-5, atol=1e-5)
    silent = log_mel_spectrogram(np.zeros(1600), 16000, 40)
    np.testing.assert_array_equal(silent, np.float32(np.log(LOG_FLOOR)))  # finite floor, no -inf
    with pytest.raises(ValueError, match="fewer than one"):
        log_mel_spectrogram(np.zeros(399), 16000, 40)


def test_resample_keeps_duration_and_pitch():
    t = np.arange(22050) / 22050
    out = resample(np.sin(2 * np.pi * 440.0 * t), 22050, 16000)
    assert out.shape == (16000,) and out.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(out))
    assert int(spectrum.argmax()) == 440  # 1 Hz bins for one second


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 10.0, 25.0])
def test_white_noise_hits_the_requested_snr(snr_db):
    rng = np.random.default_rng(3)
    clean = (0.3 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)).astype(np.float32)
    noise = add_white_noise(clean, snr_db, rng) - clean
    measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert abs(measured - snr_db) < 0.5
    # against an explicit reference power (the word alone, not the padded window)
    noise = add_white_noise(np.zeros(16000, np.float32), snr_db, rng, signal_power=0.04)
    assert abs(10 * np.log10(0.04 / np.mean(noise.astype(np.float64) ** 2)) - snr_db) < 0.5


# ----------------------------------------------------------------------------------------- PCA weakening


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.75, 0.95])
def test_pca_removal_removes_the_requested_energy(fraction):
    images, _ = avdigits.load_digit_images()
    x = images.reshape(len(images), -1)
    out = avdigits.remove_principal_energy(x, fraction)
    mean = x.mean(axis=0)
    np.testing.assert_allclose(out.mean(axis=0), mean, atol=1e-10)  # the mean image is kept
    kept = np.sum((out - mean) ** 2) / np.sum((x - mean) ** 2)
    assert kept == pytest.approx(1.0 - fraction, abs=1e-6)


def test_pca_removal_takes_the_top_components_first():
    images, _ = avdigits.load_digit_images()
    x = images.reshape(len(images), -1)
    centred = x - x.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    first_share = singular[0] ** 2 / np.sum(singular**2)
    out = avdigits.remove_principal_energy(x, min(0.99, 1.5 * first_share)) - x.mean(axis=0)
    assert np.abs(out @ components[0]).max() < 1e-8  # the first component is gone entirely
    np.testing.assert_allclose(out @ components[-1], centred @ components[-1], atol=1e-8)  # the last is kept
    with pytest.raises(ValueError):
        avdigits.remove_principal_energy(x, 1.0)


# ----------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"image_pca_removal": 1.0}, "image_pca_removal"),
        ({"audio_snr_db": float("inf")}, "audio_snr_db"),
        ({"image_noise_std": -0.1}, "image_noise_std"),
        ({"voices": ["en+m1", "en+m1"]}, "voices"),
        ({"voices": ["en m1"]}, "voices"),
        ({"samples_per_image": 0}, "samples_per_image"),
        ({"colour": True}, "colour"),
    ],
)
def test_invalid_options_name_the_field(options, field):
    with pytest.raises(DatasetFormatError, match=field):
        avdigits.AVDigitsBuilder.parse_options(options)


def test_missing_speech_extra_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(speech, "_CLIENT", None)
    monkeypatch.setattr(speech, "speech_available", lambda: False)
    with pytest.raises(speech.SpeechUnavailableError, match=re.escape("pip install 'midasbench[speech]'")):
        speech.synthesize("one")


# ----------------------------------------------------------------------------------------- espeak-ng


def test_speech_is_audible_at_the_library_rate():
    pytest.importorskip("espeakng_loader")
    wave, rate = speech.synthesize("seven", voice="en+m3", rate=150, pitch=50)
    assert rate == 22050
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.2 < len(wave) / rate < 1.5  # one word
    assert np.abs(wave).max() <= 1.0 and np.sqrt(np.mean(wave**2)) > 0.01


def test_speech_is_deterministic_whatever_came_before():
    """espeak-ng keeps hidden state between calls; the helper must hide it (see speech.py)."""
    pytest.importorskip("espeakng_loader")
    first, _ = speech.synthesize("four", voice="en+f2", rate=180, pitch=40)
    for word, voice in [("nine", "en+m1"), ("zero", "en-us+m2"), ("two", "en+klatt4")]:
        speech.synthesize(word, voice=voice, rate=120, pitch=80)
    again, _ = speech.synthesize("four", voice="en+f2", rate=180, pitch=40)
    np.testing.assert_array_equal(first, again)
    other, _ = speech.synthesize("five", voice="en+f2", rate=180, pitch=40)
    assert len(other) != len(first) or not np.array_equal(other, first)
    faster, _ = speech.synthesize("four", voice="en+f2", rate=230, pitch=40)
    assert len(faster) < len(first)


def test_speech_rejects_unknown_voices_and_bad_settings():
    pytest.importorskip("espeakng_loader")
    with pytest.raises(speech.SpeechSynthesisError, match="no-such-voice"):
        speech.synthesize("one", voice="no-such-voice")
    with pytest.raises(ValueError, match="rate"):
        speech.synthesize("one", rate=20)
    speech.synthesize("one")  # the helper survives a refused request


# ----------------------------------------------------------------------------------------- the dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Defaults on the first 500 images, and the first 100 images of the same build."""
    pytest.importorskip("espeakng_loader")
    root = tmp_path_factory.mktemp("avdigits")
    big = build_dataset("avdigits", root=root, split="midas70", options={"max_images": 500})
    small = build_dataset("avdigits", root=root, split="midas70", options={"max_images": 100})
    return big, small


def _pooled(directory: Path) -> dict[str, np.ndarray]:
    dataset = ArrowDataset(directory)
    parts = [dataset.split(name) for name in ("train", "val", "test")]
    out = {"ids": np.concatenate([p.ids for p in parts]), "labels": np.concatenate([p.labels for p in parts])}
    for name in dataset.manifest.modalities:
        out[name] = np.concatenate([p.columns[name].to_numpy() for p in parts])
    return out


def test_built_dataset_modalities_shapes_and_labels(built):
    dataset = ArrowDataset(built[0])
    manifest = dataset.manifest
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert manifest.classes == words
    assert manifest.split_protocol == "midas70"
    assert {k: (v.kind, v.dtype, v.shape) for k, v in manifest.modalities.items()} == {
        "audio": ("spectrogram", "float32", (1, 98, 40)),
        "visual": ("image", "float32", (1, 8, 8)),
    }
    assert sum(info.rows for info in manifest.splits.values()) == 500
    dataset.verify()
    rows = _pooled(built[0])
    assert set(np.unique(rows["labels"])) == set(range(10))
    assert all(re.fullmatch(r"d\d{4}-0", sample_id) for sample_id in rows["ids"])
    assert np.isfinite(rows["audio"]).all() and rows["audio"].std() > 1.0
    assert rows["visual"].min() > -1.0 and rows["visual"].max() < 2.0  # [0, 1] with a quarter of the variance


def test_subsample_rows_match_the_larger_build(built):
    big, small = _pooled(built[0]), _pooled(built[1])
    order_big, order_small = np.argsort(big["ids"]), np.argsort(small["ids"])
    shared = np.isin(big["ids"][order_big], small["ids"])
    assert shared.sum() == 100
    for key in ("labels", "audio", "visual"):
        np.testing.assert_array_equal(big[key][order_big][shared], small[key][order_small])


def test_official_split_does_not_exist(tmp_path):
    pytest.importorskip("espeakng_loader")
    with pytest.raises(DatasetFormatError, match="midas70"):
        build_dataset("avdigits", root=tmp_path, split="official", options={"max_images": 100})


def test_options_change_shapes(tmp_path):
    pytest.importorskip("espeakng_loader")
    options = {
        "max_images": 100, "samples_per_image": 2, "image_scale": 3, "num_mel_bins": 24,
        "clip_seconds": 0.8, "audio_snr_db": None, "image_noise_std": 0.3, "voices": ["en+m3", "en-us+f2"],
    }  # fmt: skip
    rows = _pooled(build_dataset("avdigits", root=tmp_path, options=options))
    assert len(rows["ids"]) == 200 and {i[-2:] for i in rows["ids"]} == {"-0", "-1"}
    assert rows["audio"].shape[1:] == (1, 78, 24)  # 0.8 s at 16 kHz: 1 + (12800 - 400) // 160
    assert rows["visual"].shape[1:] == (1, 24, 24)
    image = rows["visual"][0, 0]
    np.testing.assert_array_equal(image, np.kron(image[::3, ::3], np.ones((3, 3))))  # nearest upsampling
    # clean audio: the silence around the word sits on the log floor
    assert (rows["audio"] == np.float32(np.log(LOG_FLOOR))).mean() > 0.05


def test_audio_dominates_pca_degraded_images(built):
    """The default build is audio-dominant: a linear probe reads the digit better from the speech."""
    from sklearn.linear_model import LogisticRegression

    dataset = ArrowDataset(built[0])
    train = [dataset.split("train"), dataset.split("val")]
    test = dataset.split("test")
    accuracy = {}
    for modality in ("audio", "visual"):
        x_train = np.concatenate([s.columns[modality].to_numpy().reshape(len(s), -1) for s in train])
        y_train = np.concatenate([s.labels for s in train])
        probe = LogisticRegression(max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs may stop at max_iter on the unscaled log-mels
            probe.fit(x_train, y_train)
        x_test = test.columns[modality].to_numpy().reshape(len(test), -1)
        accuracy[modality] = probe.score(x_test, test.labels)
    assert accuracy["audio"] > 0.6
    assert accuracy["audio"] > accuracy["visual"] + 0.1, accuracy
