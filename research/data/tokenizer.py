"""Tokenizers: raw UTF-8 bytes, or a Hugging Face `tokenizer.json`.

Each has a stable `name` that identifies its exact vocabulary, so the token cache can be keyed
by it. Documents are separated by `eos_id`, which the pipeline appends after every document;
`data.document_start` says what a document starts after (see `start_tokens`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from research.config import ConfigError

EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")  # Llama 2, GPT-2, Llama 3, Gemma


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    name: str

    def encode(self, text: str) -> np.ndarray:
        """int32 token ids, without eos."""
        ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text; a Hugging Face tokenizer spreads them over all cores."""
        ...

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of `ids`; eos and ids outside the vocabulary (model padding) are skipped."""
        ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, eos 256: no training, no files, lossless."""

    vocab_size: int = 257
    eos_id: int = 256
    name: str = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "replace"), np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]  # memory-bound: one core keeps up

    def decode(self, ids: np.ndarray | list[int]) -> str:
        ids = np.asarray(ids)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", "replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer; its name is the sha256 of the tokenizer.json."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _HF

        try:
            self._tok = _HF.from_file(str(path))
        except Exception as exc:  # the library raises bare Exceptions for malformed files
            raise ConfigError(f"data.tokenizer: cannot load {path} ({exc})") from None
        eos = next((t for t in EOS_TOKENS if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ConfigError(f"data.tokenizer: {path} has no end-of-text token; add one "
                              f"of {', '.join(EOS_TOKENS)} to its vocabulary")
        self.path = path
        self.eos_id: int = self._tok.token_to_id(eos)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.name = f"hf:{hashlib.sha256(path.read_bytes()).hexdigest()}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)  # Rust threads
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        ids = np.asarray(ids)
        ids = ids[(ids >= 0) & (ids < self.vocab_size) & (ids != self.eos_id)]
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)


def bos_tokens(document_start: str | int) -> list[int]:
    """The token written before each document (a token id in data.document_start: an imported
    tokenizer's BOS); none for 'eos' and 'none'."""
    return [document_start] if isinstance(document_start, int) else []


def start_tokens(document_start: str | int, tokenizer: Tokenizer) -> list[int]:
    """What a document starts after in training, so a prompt starts the same way: the eos that
    ends the document before ('eos', this framework's convention), the BOS (a token id), or
    nothing ('none')."""
    return [tokenizer.eos_id] if document_start == "eos" else bos_tokens(document_start)


def load_tokenizer(spec: str) -> Tokenizer:
    """data.tokenizer: 'byte', or a path to a Hugging Face tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {spec!r} is neither 'byte' nor an existing "
                          "tokenizer.json file")
    return HFTokenizer(path)
