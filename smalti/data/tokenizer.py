"""Character-level tokenizer: the vocabulary is the set of characters in the corpus."""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import numpy as np


class CharTokenizer:
    """Maps each character to its rank in the sorted vocabulary.

    Saved into every run directory (``vocab.json``) and checkpoint, so a run
    can be sampled from without the corpus.
    """

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
            raise ValueError(
                f"{where}: character {text[position]!r} at position {position} is not in the vocabulary"
            )
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
