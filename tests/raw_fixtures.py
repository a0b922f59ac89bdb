"""Writers of tiny raw files in the real datasets' on-disk formats (WAV, JPG, MP4, a tokenizer), for the
fixture trees of the dataset tests: every file a builder reads in production, made here in seconds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_wav(
    path: Path, seconds: float = 0.5, rate: int = 16000, freq: float = 440.0, seed: int = 0
) -> None:
    """A mono 16-bit WAV: a tone at ``freq`` plus a little seeded noise."""
    import soundfile

    t = np.arange(int(rate * seconds)) / rate
    noise = 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(
        path, (0.4 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), rate, subtype="PCM_16"
    )


def write_jpg(path: Path, color: Sequence[int] = (128, 64, 32), size: tuple[int, int] = (40, 30)) -> None:
    """A flat RGB JPEG of ``size`` = (width, height)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(int(c) for c in color)).save(path, quality=95)


def write_gray_jpg(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    """A flat grayscale JPEG (an optical-flow component)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, int(value)).save(path, quality=95)


def write_mp4(path: Path, frames: int = 10, size: int = 32, fps: int = 5, level: int = 20) -> None:
    """An MPEG-4 video whose frame ``k`` is a flat grey of ``level · k`` (PyAV)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for k in range(frames):
            image = np.full((size, size, 3), min(255, level * k), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(folder: Path, words: Sequence[str]):
    """A lower-casing WordPiece tokenizer over ``words`` (ids 5, 6, ... in order; [PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3), saved to ``folder`` so ``AutoTokenizer.from_pretrained(folder)`` loads it offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def short_run(checkpoints: Path) -> list[str]:
    """Overrides that make a preset's run a one-epoch CPU smoke run on a fixture dataset."""
    return [
        "train.epochs=1",
        "train.batch_size=4",
        "train.device=cpu",
        "train.num_threads=1",
        "tracking.enabled=false",
        "train.progress=false",
        f"train.checkpoint_dir={checkpoints}",
    ]
