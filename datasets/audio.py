"""Audio features with numpy/scipy only: resampling, additive noise, and a Kaldi-style log-mel filterbank.

torchaudio cannot be loaded in this environment (datasets.md §5), so the filterbank that OGM-GE/MIDAS take
from ``torchaudio.compliance.kaldi.fbank`` is reimplemented here with the settings of datasets.md §4:
25 ms frames every 10 ms with snipped edges (``1 + (N - win) // hop`` frames), per-frame DC removal,
pre-emphasis 0.97, a symmetric Hann window, the power spectrum of an FFT padded to the next power of two,
triangular filters on the HTK mel scale ``1127 ln(1 + f / 700)`` from 20 Hz to Nyquist, and the log with a
floor at float32 eps. No dithering and no energy column. Every function works on a batch ``(..., N)``.
"""

from __future__ import annotations

from math import gcd

import numpy as np
from scipy.signal import resample_poly

LOG_FLOOR = float(np.finfo(np.float32).eps)


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as in Kaldi: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of ``hz_to_mel``."""
    return 700.0 * np.expm1(np.asarray(mel, dtype=np.float64) / 1127.0)


def mel_edges(num_mel_bins: int, low_freq: float, high_freq: float) -> np.ndarray:
    """The ``num_mel_bins + 2`` filter edges in mel, equally spaced: filter ``m`` rises from edge ``m``,
    peaks at edge ``m + 1`` (its centre) and falls to zero at edge ``m + 2``."""
    if not 0 <= low_freq < high_freq:
        raise ValueError(f"need 0 <= low_freq < high_freq, got {low_freq} and {high_freq}")
    return np.linspace(hz_to_mel(low_freq), hz_to_mel(high_freq), num_mel_bins + 2)


def mel_filterbank(
    num_mel_bins: int,
    n_fft: int,
    sample_rate: float,
    low_freq: float = 20.0,
    high_freq: float | None = None,
) -> np.ndarray:
    """Triangular mel filters as a ``(num_mel_bins, n_fft // 2 + 1)`` matrix over the rfft bins.

    The triangles are linear in mel (not in Hz), with height 1 at their centre and zero outside their two
    neighbours' centres, as Kaldi builds them; ``high_freq`` defaults to the Nyquist frequency.
    """
    nyquist = sample_rate / 2
    high = nyquist if high_freq is None else high_freq
    if high > nyquist:
        raise ValueError(f"high_freq {high} is above the Nyquist frequency {nyquist}")
    edges = mel_edges(num_mel_bins, low_freq, high)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    mel = hz_to_mel(np.arange(n_fft // 2 + 1) * sample_rate / n_fft)[None, :]
    rising = (mel - left) / (centre - left)
    falling = (right - mel) / (right - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def frame_count(num_samples: int, sample_rate: float, frame_ms: float = 25.0, shift_ms: float = 10.0) -> int:
    """Frames that ``log_mel_spectrogram`` yields for ``num_samples`` samples (Kaldi ``snip_edges``)."""
    win, hop = _frame_sizes(sample_rate, frame_ms, shift_ms)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


def _frame_sizes(sample_rate: float, frame_ms: float, shift_ms: float) -> tuple[int, int]:
    return int(sample_rate * frame_ms / 1000), int(sample_rate * shift_ms / 1000)


def log_mel_spectrogram(
    wave: np.ndarray,
    sample_rate: float,
    num_mel_bins: int = 40,
    *,
    frame_ms: float = 25.0,
    shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    low_freq: float = 20.0,
    high_freq: float | None = None,
) -> np.ndarray:
    """Kaldi-style log-mel filterbank of ``wave`` (shape ``(..., N)``) → float32 ``(..., frames, mel)``.

    Frames are ``1 + (N - win) // hop`` windows of ``frame_ms`` every ``shift_ms`` (edges snipped, as
    Kaldi's default). Each frame has its mean removed, is pre-emphasised (``x[i] -= 0.97 x[i-1]``, with
    ``x[-1] := x[0]``), Hann-windowed and zero-padded to the next power of two; the power spectrum is
    pooled by ``mel_filterbank`` and the log is floored at float32 eps so silence stays finite.
    """
    wave = np.asarray(wave, dtype=np.float32)
    win, hop = _frame_sizes(sample_rate, frame_ms, shift_ms)
    if wave.shape[-1] < win:
        raise ValueError(f"{wave.shape[-1]} samples are fewer than one {frame_ms} ms frame ({win} samples)")
    n_frames = 1 + (wave.shape[-1] - win) // hop
    frames = np.lib.stride_tricks.sliding_window_view(wave, win, axis=-1)[
        ..., : (n_frames - 1) * hop + 1 : hop, :
    ]
    frames = frames.astype(np.float32)  # a copy: the view must not be written through
    if remove_dc_offset:
        frames -= frames.mean(axis=-1, keepdims=True)
    if preemphasis:
        previous = np.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
        frames -= preemphasis * previous
    frames *= np.hanning(win).astype(np.float32)  # symmetric Hann: 0.5 - 0.5 cos(2 pi i / (win - 1))
    n_fft = 1 << (win - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=-1)) ** 2
    banks = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq).astype(np.float32)
    return np.log(np.maximum(power @ banks.T, LOG_FLOOR)).astype(np.float32)


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling along the last axis (``scipy.signal.resample_poly``), e.g. 22,050 → 16,000 Hz."""
    if orig_rate == target_rate:
        return np.asarray(wave, dtype=np.float32)
    factor = gcd(int(orig_rate), int(target_rate))
    out = resample_poly(wave, int(target_rate) // factor, int(orig_rate) // factor, axis=-1)
    return out.astype(np.float32)


def add_white_noise(
    wave: np.ndarray, snr_db: float, rng: np.random.Generator, signal_power: float | None = None
) -> np.ndarray:
    """``wave`` plus Gaussian white noise at ``snr_db`` = 10 log10(signal power / noise power).

    ``signal_power`` defaults to the mean square of ``wave``; pass the power of the speech alone when
    ``wave`` also holds silence, so that the SNR does not depend on how long the word is.
    """
    wave = np.asarray(wave, dtype=np.float32)
    power = float(np.mean(wave.astype(np.float64) ** 2)) if signal_power is None else float(signal_power)
    noise_std = np.sqrt(power / 10.0 ** (snr_db / 10.0))
    return (wave + noise_std * rng.standard_normal(wave.shape)).astype(np.float32)
