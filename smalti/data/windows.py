"""Fixed-length token windows cut from documents, each window carrying its document's class."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from smalti.core.batch import Batch


class TokenWindows:
    """All windows of ``seq_len + 1`` tokens at stride ``seq_len`` inside each document.

    A window never crosses a document boundary, so every example belongs to
    exactly one provenance class. The inputs are the first ``seq_len`` tokens
    and the targets the last ``seq_len`` (next-token prediction).
    """

    def __init__(self, documents: Sequence[tuple[int, np.ndarray]], seq_len: int, class_names: Sequence[str]) -> None:
        if seq_len < 1:
            raise ValueError("seq_len must be at least 1")
        self.seq_len = seq_len
        self.class_names = list(class_names)
        tokens, starts, classes, offset = [], [], [], 0
        for class_index, doc in documents:
            count = max(0, (len(doc) - 1) // seq_len)
            starts.append(offset + seq_len * np.arange(count, dtype=np.int64))
            classes.append(np.full(count, class_index, dtype=np.int64))
            tokens.append(np.asarray(doc, dtype=np.int64))
            offset += len(doc)
        self.tokens = torch.from_numpy(np.concatenate(tokens) if tokens else np.zeros(0, np.int64))
        self.starts = torch.from_numpy(np.concatenate(starts) if starts else np.zeros(0, np.int64))
        self.classes = torch.from_numpy(np.concatenate(classes) if classes else np.zeros(0, np.int64))
        self._offsets = torch.arange(seq_len + 1)
        digest = hashlib.sha256()
        for array in (self.tokens, self.starts, self.classes):
            digest.update(array.numpy().tobytes())
        digest.update(str(seq_len).encode())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return int(self.starts.numel())

    def gather(self, indices: torch.Tensor) -> Batch:
        window = self.tokens[self.starts[indices, None] + self._offsets]
        return Batch(
            inputs=window[:, :-1],
            targets=window[:, 1:],
            sample_ids=indices,
            provenance=self.classes[indices].unsqueeze(1),
        )
