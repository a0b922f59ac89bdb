"""Raw-file decoders of the real datasets (datasets/raw): the filterbank against independent references,
WAV/JPG/MP4/frame-folder reading on files the tests write, tokenization with a tiny local tokenizer,
and every error naming its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from raw_fixtures import tiny_tokenizer, write_jpg, write_mp4

from midasbench.datasets.raw.audio import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    fbank_clip,
    kaldi_fbank,
    read_audio,
)
from midasbench.datasets.raw.image import read_image
from midasbench.datasets.raw.layout import RawDataError, require
from midasbench.datasets.raw.video import read_flow_folders, read_frame_folder, read_video_file, spread

soundfile = pytest.importorskip("soundfile")


def tone(rate: int, freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def knf_fbank(wave: np.ndarray, rate: int, bins: int) -> np.ndarray:
    """kaldi-native-fbank with the field's options: the maintained implementation, as a reference."""
    knf = pytest.importorskip("kaldi_native_fbank")
    options = knf.FbankOptions()
    frame = options.frame_opts
    frame.samp_freq, frame.dither, frame.window_type, frame.snip_edges = float(rate), 0.0, "hanning", True
    options.mel_opts.num_bins, options.mel_opts.low_freq, options.mel_opts.high_freq = bins, 20.0, 0.0
    options.mel_opts.use_slaney_mel_scale, options.mel_opts.norm = False, "none"
    options.use_energy, options.htk_compat = False, True
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(float(rate), wave.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize(("rate", "bins"), [(22050, 128), (44100, 128), (16000, 64)])
def test_our_filterbank_agrees_with_kaldi_native_fbank(rate: int, bins: int):
    wave = tone(rate, 1000.0) + 0.01 * np.random.default_rng(0).standard_normal(rate).astype(np.float32)
    ours, theirs = kaldi_fbank(wave, rate, bins), knf_fbank(wave, rate, bins)
    assert ours.shape == theirs.shape == (1 + (rate - int(0.025 * rate)) // int(0.010 * rate), bins)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)  # float32 sums in another order
    assert np.median(np.abs(ours - theirs)) < 1e-5


def test_a_tone_peaks_in_the_mel_bin_holding_its_frequency():
    rate, freq, bins = 16000, 1000.0, 128
    peak = int(np.median(kaldi_fbank(tone(rate, freq), rate, bins).argmax(axis=1)))
    # HTK mel: m(f) = 1127 ln(1 + f/700); bins are spaced evenly from m(20) to m(8000) with 2 edges
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    centres = np.linspace(mel(20), mel(rate / 2), bins + 2)[1:-1]
    assert abs(peak - int(np.argmin(np.abs(centres - mel(freq))))) <= 1


def test_a_wav_becomes_the_stored_normalised_clip(tmp_path: Path):
    path = tmp_path / "clip.wav"
    stereo = np.stack([tone(16000, 440.0, 0.5), tone(16000, 440.0, 0.5)], axis=1)
    soundfile.write(path, stereo, 16000, subtype="PCM_16")
    wave, rate = read_audio(path)
    assert rate == 16000 and wave.shape == (8000,) and np.abs(wave).max() <= 1.0
    clip = fbank_clip(path)
    assert clip.shape == (1024, 128) and clip.dtype == np.float16
    frames = 1 + (8000 - 400) // 160  # 48 frames of signal, then zero padding
    padding = (0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)  # a padded (zero) log-mel after normalisation
    np.testing.assert_allclose(clip[frames:].astype(np.float32), padding, atol=1e-3)
    expected = (kaldi_fbank(wave - wave.mean(), 16000) - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)
    np.testing.assert_allclose(clip[:frames].astype(np.float32), expected, atol=2e-3)


def test_unreadable_and_too_short_audio_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....not a wav")
    with pytest.raises(RawDataError, match=r"bad\.wav: not a readable audio file"):
        read_audio(bad)
    short = tmp_path / "short.wav"
    soundfile.write(short, np.zeros(100, dtype=np.float32), 16000)
    with pytest.raises(RawDataError, match=r"short\.wav: shorter than one 25 ms frame"):
        fbank_clip(short)


def test_images_are_stored_as_rgb_uint8_at_the_stored_size(tmp_path: Path):
    write_jpg(tmp_path / "a.jpg", (200, 10, 10))
    pixels = read_image(tmp_path / "a.jpg", (16, 24))
    assert pixels.shape == (3, 16, 24) and pixels.dtype == np.uint8
    assert abs(int(pixels[0].mean()) - 200) <= 3 and int(pixels[2].mean()) <= 15
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(RawDataError, match=r"broken\.jpg: not a readable image"):
        read_image(tmp_path / "broken.jpg", (16, 16))


def test_frames_are_spread_over_segment_centres_and_read_in_sorted_order(tmp_path: Path):
    assert spread(10, 3) == [1, 5, 8]  # floor((k + 0.5) * 10 / 3) = 1, 5, 8
    assert spread(2, 3) == [0, 1, 1]  # fewer frames than asked: repeats
    folder = tmp_path / "clip"
    folder.mkdir()
    for k in (3, 1, 2, 0):  # written out of order: listing order must not matter
        write_jpg(folder / f"frame_{k:05d}.jpg", (60 * k, 0, 0))
    frames = read_frame_folder(folder, 2, (8, 8))  # spread(4, 2) = [1, 3]
    assert frames.shape == (3, 2, 8, 8)
    assert [round(float(frames[0, t].mean()) / 60) for t in range(2)] == [1, 3]
    with pytest.raises(RawDataError, match="holds no frames"):
        read_frame_folder(tmp_path, 2, (8, 8))


def test_flow_u_and_v_become_two_channels(tmp_path: Path):
    from PIL import Image

    for axis, value in (("u", 50), ("v", 150)):
        (tmp_path / axis).mkdir()
        for k in range(4):
            Image.new("L", (10, 10), value).save(tmp_path / axis / f"frame{k:06d}.jpg")
    flow = read_flow_folders(tmp_path / "u", tmp_path / "v", 3, (6, 6))
    assert flow.shape == (2, 3, 6, 6) and flow.dtype == np.uint8
    assert abs(float(flow[0].mean()) - 50) < 3 and abs(float(flow[1].mean()) - 150) < 3


def test_a_video_file_is_decoded_with_pyav(tmp_path: Path):
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    write_mp4(path, frames=10, size=32)
    frames = read_video_file(path, 3, (16, 16))  # spread(10, 3) = [1, 5, 8]
    assert frames.shape == (3, 3, 16, 16)
    assert [round(float(frames[:, t].mean()) / 20) for t in range(3)] == [1, 5, 8]
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(RawDataError, match=r"bad\.mp4: not a readable video"):
        read_video_file(tmp_path / "bad.mp4", 3, (16, 16))


def test_require_names_the_missing_file_and_the_layout(tmp_path: Path):
    with pytest.raises(RawDataError, match=r"AudioWAV/x\.wav: not found; expected layout:\nroot/AudioWAV"):
        require(tmp_path / "AudioWAV" / "x.wav", "root/AudioWAV/<clip>.wav")


def test_tokenization_stores_ids_lengths_and_pair_segments(tmp_path: Path):
    from midasbench.datasets.raw.text import encode, identity, load_tokenizer

    tiny_tokenizer(tmp_path / "tok", ["good", "food", "bad", "day"])
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    ids, lengths, segments = encode(tokenizer, ["good food", "bad"], max_length=6)
    # [CLS]=2 good=5 food=6 [SEP]=3, then [PAD]=0; [CLS] bad=7 [SEP]
    assert ids.tolist() == [[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]] and lengths.tolist() == [4, 3]
    assert segments is None
    ids, lengths, segments = encode(tokenizer, ["good"], max_length=6, pairs=["day"])
    assert ids.tolist() == [[2, 5, 3, 8, 3, 0]] and segments.tolist() == [[0, 0, 0, 1, 1, 0]]
    ident = identity(tokenizer, "tiny", 6)
    assert ident.pad_token_id == 0 and len(ident.vocab_sha256) == 64


def test_a_different_vocabulary_is_refused(tmp_path: Path):
    from midasbench.datasets.raw.text import check_tokenizer, identity

    stored = identity(tiny_tokenizer(tmp_path / "a", ["good", "food"]), "a", 8).as_dict()
    check_tokenizer(
        stored, tiny_tokenizer(tmp_path / "same", ["good", "food"]), "same", "model.encoders.text"
    )
    with pytest.raises(RawDataError, match=r"tokenized with 'a'.*another vocabulary"):
        check_tokenizer(stored, tiny_tokenizer(tmp_path / "b", ["bad", "day"]), "b", "model.encoders.text")


def test_an_unloadable_tokenizer_says_what_to_do_offline(tmp_path: Path):
    from midasbench.datasets.raw.text import load_tokenizer

    with pytest.raises(RawDataError, match="pass its local folder instead"):
        load_tokenizer(str(tmp_path / "nothing-here"))


def test_frame_folders_read_in_natural_order(tmp_path: Path):
    from midasbench.datasets.raw.video import frame_files

    for name in ("frame_000010.jpg", "frame_00002.jpg", "frame_00001.jpg"):
        write_jpg(tmp_path / name, (10, 10, 10))
    assert [p.name for p in frame_files(tmp_path)] == [
        "frame_00001.jpg",
        "frame_00002.jpg",
        "frame_000010.jpg",
    ]
