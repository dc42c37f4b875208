"""Tokenizers: characters (the bundled demo's), and any Hugging Face ``tokenizers`` tokenizer.

Both map text to ids and back and serialise themselves whole (``to_json``), so every run
directory (``vocab.json``) and checkpoint carries the exact tokenizer it trained with, and a
run can be sampled from without the corpus. ``load_tokenizer`` reads either back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from smalti.errors import DataError

# End-of-sequence tokens, in the order a tokenizer without a tokenizer_config.json is searched for one.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
TRAINED_EOS = "<|endoftext|>"  # what ``smalti tokenizer train`` adds


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str, where: str = "text") -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """Maps each character to its rank in the sorted vocabulary."""

    eos_id = None  # characters need no separator: documents are never packed together

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary has repeated characters")
        self.chars = "".join(sorted(chars))
        self._table = np.full(0x110000, -1, np.int32)  # every Unicode code point -> id or -1
        self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.chars.encode("utf-8")).hexdigest()

    def encode(self, text: str, where: str = "text") -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._table[codes].astype(np.int64)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            position = int(bad[0])
            raise ValueError(f"{where}: character {text[position]!r} at position {position} is not in the vocabulary")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        spec = json.loads(text)
        if spec.get("kind") != "char":
            raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r}")
        return cls(spec["chars"])


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (its ``tokenizer.json``), with the end-of-sequence token that
    separates packed documents. Byte-level BPE never meets a character it cannot encode."""

    def __init__(self, spec: str, eos_token: str | None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.spec = spec
        self._tokenizer = RustTokenizer.from_str(spec)
        self.eos_token = eos_token
        self.eos_id = self._tokenizer.token_to_id(eos_token) if eos_token is not None else None
        if eos_token is not None and self.eos_id is None:
            raise DataError(f"tokenizer: end-of-sequence token {eos_token!r} is not in its vocabulary")

    @classmethod
    def from_directory(cls, directory: str | Path) -> "HFTokenizer":
        """A tokenizer directory (``tokenizer.json``, and ``tokenizer_config.json`` naming the EOS token if any)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise DataError(
                f"{directory}: no tokenizer.json (a Hugging Face tokenizer directory; make one with "
                f"'smalti tokenizer train')"
            )
        spec = path.read_text(encoding="utf-8")
        eos = None
        config = directory / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos is None:
            vocabulary = json.loads(spec).get("added_tokens", [])
            names = {token.get("content") for token in vocabulary}
            eos = next((candidate for candidate in EOS_CANDIDATES if candidate in names), None)
        try:
            return cls(spec, eos)
        except Exception as error:  # the Rust library raises its own exception types
            if isinstance(error, DataError):
                raise
            raise DataError(f"{path}: not a tokenizer ({str(error).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.spec.encode("utf-8")).hexdigest()

    def encode(self, text: str, where: str = "text") -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": "hf", "eos_token": self.eos_token, "tokenizer": self.spec}, ensure_ascii=False)

    def save(self, directory: str | Path) -> None:
        """``tokenizer.json`` plus the files ``transformers.AutoTokenizer`` reads, so an exported model loads whole."""
        from transformers import PreTrainedTokenizerFast

        from smalti.io import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fast = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer, eos_token=self.eos_token)
        fast.save_pretrained(str(directory))
        atomic_write_text(directory / "tokenizer.json", self.spec)  # byte for byte: its sha256 is recorded


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE with Hugging Face ``tokenizers``; its one special token ends every packed document."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 260 (256 bytes and merges)")
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tokenizer.to_str(), TRAINED_EOS)


def load_tokenizer(text: str) -> CharTokenizer | HFTokenizer:
    """Either kind, from its ``to_json``."""
    spec = json.loads(text)
    if spec.get("kind") == "char":
        return CharTokenizer(spec["chars"])
    if spec.get("kind") == "hf":
        return HFTokenizer(spec["tokenizer"], spec.get("eos_token"))
    raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r}")
