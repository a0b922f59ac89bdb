"""``avdigits``: an offline audio-visual digits set in the style of AV-MNIST (datasets.md §7.A).

* ``visual``: the real handwritten digits bundled with scikit-learn (``load_digits``: 1,797 images of
  8×8 pixels, values 0..16), scaled to [0, 1] and stored as float32 ``(1, 8s, 8s)`` where ``s`` is
  ``image_scale`` (nearest-neighbour upsampling with ``np.kron``, so a ResNet can take them).
* ``audio``: the digit word ("zero" .. "nine") spoken by espeak-ng. **The speech is synthetic**: espeak-ng
  is a formant synthesiser, and none of these clips are human recordings. Per clip a seeded draw picks the
  voice variant, the rate (110-230 wpm), the pitch (10-90), the gain and the onset inside a fixed window,
  then white noise is added at ``audio_snr_db`` (relative to the power of the word itself). Stored as a
  float32 log-mel spectrogram ``(1, frames, num_mel_bins)`` at 16 kHz (``audio.log_mel_spectrogram``).

espeak-ng is GPL-3. It ships in the optional extra ``midasbench[speech]`` (``espeakng-loader``) and is
loaded at run time through ctypes in a helper process (``speech.py``), never linked; building this dataset
without it raises an error naming ``pip install 'midasbench[speech]'``.

Imbalance knobs: ``audio_snr_db`` weakens the audio; ``image_pca_removal`` projects the top principal
components out of the images until that fraction of their variance is gone (AV-MNIST removes 75 % this
way), and ``image_noise_std`` adds Gaussian pixel noise. The defaults make audio the dominant modality, as
in CREMA-D. There is no official split: use ``split=midas70``.

Each image is paired, by label, with ``samples_per_image`` clips of its digit, each synthesised afresh;
sample ``d0042-1`` is image 42 with its second clip. Every random draw of a sample comes from generators
seeded by ``(seed, image, clip, modality)``, so a subsample (``max_images``) holds exactly the same rows as
the full build, and a knob of one modality never changes the other. The PCA is always fitted on all 1,797
images.

The build is sharded (``DatasetBuilder.sources``): the PCA runs once, then each sample is a
``DigitClip`` item and ``decode_clips`` synthesises and featurises a shard of them, in parallel over the
cores and resumably (``sharded_build``). Shards are ``SHARD_SIZE`` (a multiple of the log-mel batch)
samples, so every batch holds the same clips as in a single-process build and the dataset is
bit-identical whatever the number of workers. BLAS threads keep the libraries' default (as before the
sharding), so the log-mel matmul, and with it the content hash, can differ in the last bits between
machines with different core counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field, field_validator

from .audio import add_white_noise, log_mel_spectrogram, resample
from .builders import BuilderOptions, DatasetBuilder, register_dataset
from .format import DatasetFormatError, SplitArrays
from .sharded_build import ShardedSource, track_items

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FEATURE_RATE = 16_000
RATE_WPM = (110, 230)
PITCH = (10, 90)
GAIN_DB = (-10.0, 0.0)
SILENCE_THRESHOLD = 1e-3  # |sample| below this, at the ends of a clip, counts as silence and is trimmed
_CHUNK = 64  # clips per log-mel batch: keeps the framed spectra (~13 MB) small
SHARD_SIZE = _CHUNK  # samples per decoded shard; a multiple of _CHUNK, so batches never depend on workers

DEFAULT_VOICES = [
    "en+m1", "en+m3", "en+m5", "en+m7", "en+f1", "en+f3", "en+f5", "en+croak",
    "en-us+m2", "en-us+m4", "en-us+f2", "en-us+f4",
    "en-gb-scotland+m6", "en-gb-x-rp+f2", "en-029+m3", "en+klatt4",
]  # fmt: skip

VoiceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\+[A-Za-z0-9_-]+)?$")]


class AVDigitsOptions(BuilderOptions):
    """Build settings of ``avdigits``; any change gives a separate cached directory."""

    seed: int = 0
    samples_per_image: int = Field(default=1, ge=1, le=50)
    """Clips per image. Above 1 the same image appears in several rows, and the midas70 split (which
    knows nothing of images) can put it in both train and test."""
    max_images: int | None = Field(default=None, ge=1, le=1797)
    """Use only the first N images (for tests; midas70 needs about 100 for 10 classes); None = all 1,797."""
    image_scale: int = Field(default=1, ge=1, le=8)
    image_pca_removal: float = Field(default=0.75, ge=0.0, lt=1.0)
    image_noise_std: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    audio_snr_db: float | None = Field(default=10.0, ge=-40.0, le=80.0, allow_inf_nan=False)
    """SNR of the added white noise in dB; None = clean."""
    clip_seconds: float = Field(default=1.0, ge=0.25, le=10.0)
    num_mel_bins: int = Field(default=40, ge=4, le=128)
    voices: list[VoiceName] = Field(default_factory=lambda: list(DEFAULT_VOICES), min_length=1)

    @field_validator("voices")
    @classmethod
    def _unique(cls, voices: list[str]) -> list[str]:
        if len(set(voices)) != len(voices):
            raise ValueError(f"voice names must be unique, got {voices}")
        return voices


@register_dataset("avdigits")
class AVDigitsBuilder(DatasetBuilder):
    version = "1"
    description = (
        "scikit-learn handwritten digits (8x8) paired with the digit word spoken by espeak-ng "
        "(synthetic speech, log-mel); audio-dominant by default."
    )
    Options = AVDigitsOptions

    def sources(self, options: AVDigitsOptions) -> ShardedSource:
        """One ``DigitClip`` per sample (image-major, then clip); the images are PCA-weakened here, once,
        on all 1,797 images, and each item carries its 8×8 pixels."""
        images, labels = load_digit_images()
        images = remove_principal_energy(images.reshape(len(images), -1), options.image_pca_removal)
        images = images.reshape(-1, 8, 8)
        count = len(images) if options.max_images is None else options.max_images
        items = [
            DigitClip(image=i, clip=j, label=int(labels[i]), pixels=images[i])
            for i in range(count)
            for j in range(options.samples_per_image)
        ]
        return ShardedSource(
            classes=list(DIGIT_WORDS),
            items=items,
            decode=decode_clips,
            official_split=None,
            modality_kinds={"audio": "spectrogram", "visual": "image"},
            shard_size=SHARD_SIZE,
            item_name=_clip_name,
        )


@dataclass(frozen=True, eq=False)
class DigitClip:
    """One sample to decode: clip ``clip`` of image ``image`` (digit ``label``), with the image's
    PCA-weakened pixels (float64 ``(8, 8)``)."""

    image: int
    clip: int
    label: int
    pixels: np.ndarray

    @property
    def sample_id(self) -> str:
        return f"d{self.image:04d}-{self.clip}"


def _clip_name(item: DigitClip) -> str:
    return f"sample {item.sample_id} (digit {DIGIT_WORDS[item.label]!r})"


def decode_clips(items: Sequence[DigitClip], options: AVDigitsOptions) -> SplitArrays:
    """A shard of samples: the image (noise at 8×8, then upsampling) and the synthesised, noised clip's
    log-mel of each, every draw from the generators seeded by ``(seed, image, clip, modality)``."""
    visual = np.stack([item.pixels for item in items])
    if options.image_noise_std > 0:  # at 8x8 resolution, so image_scale changes no information
        noise = np.stack(
            [np.random.default_rng([options.seed, c.image, c.clip, 1]).standard_normal((8, 8)) for c in items]
        )
        visual = visual + options.image_noise_std * noise
    if options.image_scale > 1:
        visual = np.kron(visual, np.ones((1, options.image_scale, options.image_scale)))
    sample_rate = 0
    clips = []
    for item in track_items(items):  # an error names the sample being synthesised
        rng = np.random.default_rng([options.seed, item.image, item.clip, 0])
        clip, sample_rate = synthesize_clip(item.label, rng, options)
        clips.append(clip)
    return SplitArrays(
        ids=np.array([item.sample_id for item in items]),
        labels=np.array([item.label for item in items], dtype=np.int64),
        modalities={
            "audio": clip_features(clips, sample_rate, options),
            "visual": visual[:, None].astype(np.float32),
        },
    )


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as float64 ``(1797, 8, 8)`` in [0, 1], and their int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images / 16.0, bunch.target.astype(np.int64)


def remove_principal_energy(x: np.ndarray, fraction: float) -> np.ndarray:
    """Project the top principal components out of the rows of ``x`` until ``fraction`` of the variance
    (the energy about the mean) is gone; the mean is kept.

    The PCA is fitted on ``x`` itself (numpy SVD). Whole components are removed from the top while they fit
    in the budget; the next one is shrunk by the factor that removes exactly the remainder, so the kept
    energy is ``1 - fraction`` of the original, not just close to it. This weakens a modality the way
    AV-MNIST does, by removing the directions that carry most of its variance.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    x = np.asarray(x, dtype=np.float64)
    if fraction == 0.0:
        return x.copy()
    mean = x.mean(axis=0)
    centred = x - mean
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    energy = singular**2
    budget = fraction * energy.sum()
    removed_before = np.concatenate([[0.0], np.cumsum(energy)])
    top = int(np.searchsorted(removed_before, budget, side="right")) - 1  # whole components that fit
    scale = np.ones(len(energy))
    scale[:top] = 0.0
    if top < len(energy):
        left = budget - removed_before[top]
        scale[top] = np.sqrt(max(0.0, 1.0 - left / energy[top]))  # kept energy: scale² · λ
    scores = centred @ components.T
    return mean + (scores * scale) @ components


def spoken_digit_features(
    labels: np.ndarray, rngs: list[np.random.Generator], options: AVDigitsOptions
) -> np.ndarray:
    """One clip per label (drawn with the matching generator), as float32 ``(n, 1, frames, mel)``.

    Clips are synthesised one by one, then resampled to 16 kHz and turned into log-mels in batches.
    """
    sample_rate = 0
    clips = []
    for label, rng in zip(labels, rngs, strict=True):
        clip, sample_rate = synthesize_clip(int(label), rng, options)
        clips.append(clip)
    return clip_features(clips, sample_rate, options)


def synthesize_clip(label: int, rng: np.random.Generator, options: AVDigitsOptions) -> tuple[np.ndarray, int]:
    """The digit word with the voice, rate, pitch, gain, onset and noise drawn from ``rng`` (in that
    order), as a float32 window of ``clip_seconds`` at the synthesiser's rate; and that rate."""
    from .speech import SpeechSynthesisError, synthesize

    voice = options.voices[int(rng.integers(len(options.voices)))]
    rate = int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1))
    pitch = int(rng.integers(PITCH[0], PITCH[1] + 1))
    try:
        wave, sample_rate = synthesize(DIGIT_WORDS[label], voice=voice, rate=rate, pitch=pitch)
    except SpeechSynthesisError as exc:
        raise DatasetFormatError(f"dataset 'avdigits': data.options.voices: {exc}") from exc
    window, word_power = place_in_window(wave, round(options.clip_seconds * sample_rate), rng)
    if options.audio_snr_db is not None:
        window = add_white_noise(window, options.audio_snr_db, rng, signal_power=word_power)
    return window, sample_rate


def clip_features(clips: Sequence[np.ndarray], sample_rate: int, options: AVDigitsOptions) -> np.ndarray:
    """Clips resampled to 16 kHz and turned into float32 log-mels ``(n, 1, frames, mel)``, ``_CHUNK`` at a
    time (the batches keep the framed spectra small)."""
    features = []
    for start in range(0, len(clips), _CHUNK):
        batch = resample(np.stack(clips[start : start + _CHUNK]), sample_rate, FEATURE_RATE)
        features.append(log_mel_spectrogram(batch, FEATURE_RATE, options.num_mel_bins)[:, None])
    return np.concatenate(features)


def place_in_window(wave: np.ndarray, length: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Trim the silent ends, apply a random gain and put the word at a random onset in a silent window of
    ``length`` samples (cutting its tail if it is longer). Returns the window and the word's mean power,
    the reference for the SNR, so that the noise level does not depend on the word's length."""
    loud = np.nonzero(np.abs(wave) > SILENCE_THRESHOLD)[0]
    word = wave[loud[0] : loud[-1] + 1] if len(loud) else wave
    word = word[:length] * np.float32(10.0 ** (rng.uniform(*GAIN_DB) / 20.0))
    onset = int(rng.integers(0, length - len(word) + 1))
    window = np.zeros(length, dtype=np.float32)
    window[onset : onset + len(word)] = word
    return window, float(np.mean(word.astype(np.float64) ** 2)) if len(word) else 0.0
