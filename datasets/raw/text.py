"""Text → token ids and lengths from a Hugging Face tokenizer, and the tokenizer's identity.

Token ids are stored as a variable-length int32 modality: padded to ``max_length`` with the tokenizer's
pad token, each row's length kept (``format.ModalitySpec.variable_length``), so batches are trimmed to
their longest text and the encoder's attention mask comes from the lengths. A sentence pair (Twitter2015's
tweet and target) is encoded as the tokenizer encodes pairs (``[CLS] a [SEP] b [SEP]``); its segment ids
are stored as a second int32 modality ``<name>_segments`` when ``pairs`` are given.

``TokenizerIdentity`` (name, vocabulary hash, pad id, max length) goes into the manifest; a run whose
text encoder uses another tokenizer is refused (``check_tokenizer``): ids from one vocabulary are noise
to a model trained on another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .layout import RawDataError

TOKENIZER_KEY = "tokenizer"  # build_options key of the identity


@dataclass(frozen=True)
class TokenizerIdentity:
    name: str
    vocab_sha256: str
    pad_token_id: int
    max_length: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_tokenizer(name: str) -> Any:
    """``AutoTokenizer.from_pretrained(name)`` (a hub name or a local folder), with a message that says
    what to do offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise RawDataError(
            f"tokenizer {name!r} could not be loaded ({exc}); on a machine without internet, download it "
            "once elsewhere (e.g. `huggingface-cli download NAME`) and pass its local folder instead"
        ) from exc


def vocab_sha256(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token → id, sorted): equal for equal vocabularies, whatever the files."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def identity(tokenizer: Any, name: str, max_length: int) -> TokenizerIdentity:
    pad = tokenizer.pad_token_id
    if pad is None:
        raise RawDataError(f"tokenizer {name!r} has no pad token; choose one that has (BERT, ELECTRA, ...)")
    return TokenizerIdentity(name, vocab_sha256(tokenizer), int(pad), int(max_length))


def encode(
    tokenizer: Any, texts: Sequence[str], max_length: int, pairs: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Token ids int32 ``(n, max_length)`` padded with the pad id, lengths int64 ``(n,)`` (at least 1:
    an empty text still has its special tokens), and segment ids ``(n, max_length)`` for pairs."""
    out = tokenizer(
        list(texts),
        list(pairs) if pairs is not None else None,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_attention_mask=True,
        return_token_type_ids=pairs is not None,
    )
    ids = np.asarray(out["input_ids"], dtype=np.int32)
    lengths = np.asarray(out["attention_mask"], dtype=np.int64).sum(axis=1)
    segments = np.asarray(out["token_type_ids"], dtype=np.int32) if pairs is not None else None
    return ids, np.maximum(lengths, 1), segments


def check_tokenizer(
    stored: dict[str, Any] | None, encoder_tokenizer: Any, encoder_name: str, where: str
) -> None:
    """Refuse an encoder whose tokenizer's vocabulary differs from the one the dataset was tokenized
    with (``stored``: the manifest's identity; None: the dataset records none)."""
    if stored is None:
        return
    got = vocab_sha256(encoder_tokenizer)
    if got != stored["vocab_sha256"]:
        raise RawDataError(
            f"{where}: the dataset's text was tokenized with {stored['name']!r} (vocabulary sha256 "
            f"{stored['vocab_sha256'][:12]}), but encoder {encoder_name!r} uses another vocabulary "
            f"({got[:12]}); use the same model, or rebuild the dataset with its tokenizer"
        )
