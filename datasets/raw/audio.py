"""WAV → the Kaldi log-mel filterbank the MIDAS and OGM-GE code feed their audio ResNet-18 (spec §4).

The filterbank is ``datasets/audio.py``'s ``log_mel_spectrogram`` with the options
``torchaudio.compliance.kaldi.fbank`` is called with in the field: 128 mel bins, 25 ms Hann (symmetric)
windows every 10 ms, edges snipped, DC removed, pre-emphasis 0.97, power spectrum of an FFT rounded up
to a power of two, HTK mel scale from 20 Hz to Nyquist, log floored at float eps, no dither, no energy.
Why not ``kaldi-native-fbank``, the maintained port: it refuses the field's own setting — 128 bins at
16 kHz (CREMA-D's rate) leave the lowest triangles without an FFT bin, which Kaldi rejects while
torchaudio, and so the MIDAS code, computes them (as log-floor rows). The tests hold our filterbank to
``kaldi-native-fbank`` where it accepts the settings (agreement within 3e-4 in log units at 22.05 and
44.1 kHz) and to a tone's known peak bin.

The waveform is read with ``soundfile`` as floats in [-1, 1] (as ``torchaudio.load`` gives them),
averaged over channels, its mean removed (as the KS preprocessing does). ``fbank_clip``
then pads with zeros or cuts to 1024 frames and applies the AudioSet normalisation
``(x + 4.503877) / (2 · 5.141276)``; the result is stored as float16 ``(frames, bins)``.

"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..audio import log_mel_spectrogram
from .layout import RawDataError

AUDIOSET_MEAN = -4.503877
AUDIOSET_STD = 5.141276
CLIP_FRAMES = 1024
MEL_BINS = 128


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate; channels are averaged."""
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        raise RawDataError(f"{path}: not a readable audio file ({exc})") from exc
    if samples.size == 0:
        raise RawDataError(f"{path}: holds no audio samples")
    return samples.mean(axis=1), int(rate)


def kaldi_fbank(wave: np.ndarray, sample_rate: int, num_mel_bins: int = MEL_BINS) -> np.ndarray:
    """float32 ``(frames, num_mel_bins)`` log-mel filterbank with the field's Kaldi options (module
    docstring); ``1 + (N - win) // hop`` frames, none if the wave is shorter than one window."""
    win = int(sample_rate * 0.025)
    if len(wave) < win:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    return log_mel_spectrogram(wave, sample_rate, num_mel_bins)


def fixed_frames(features: np.ndarray, frames: int = CLIP_FRAMES) -> np.ndarray:
    """Zero-pad or cut ``(n, bins)`` to ``(frames, bins)`` (the field pads the raw log-mels with zeros
    before normalising)."""
    out = np.zeros((frames, features.shape[1]), dtype=np.float32)
    out[: min(frames, len(features))] = features[:frames]
    return out


def audioset_normalize(features: np.ndarray) -> np.ndarray:
    return (features - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)


def fbank_clip(path: Path, frames: int = CLIP_FRAMES, num_mel_bins: int = MEL_BINS) -> np.ndarray:
    """A WAV as the stored float16 ``(frames, num_mel_bins)`` clip: mean removed, filterbank, padded or
    cut, AudioSet-normalised."""
    wave, rate = read_audio(path)
    wave = wave - wave.mean()
    features = kaldi_fbank(wave, rate, num_mel_bins)
    if len(features) == 0:
        raise RawDataError(f"{path}: shorter than one 25 ms frame ({len(wave)} samples at {rate} Hz)")
    return audioset_normalize(fixed_frames(features, frames)).astype(np.float16)
