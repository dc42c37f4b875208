"""What every causal language model in Smalti shares: the summed loss, its normaliser, sampling.

The trainer needs ``loss`` to return the *summed* cross-entropy and ``loss_units`` the number
of positions it sums over: it divides by the whole global batch's count, which is what makes
gradient accumulation exactly one big batch. The bundled GPT and Hugging Face models
(``smalti.models.hf``) both mix this in; a model brings ``forward`` (ids -> logits) and
``context_length``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from smalti.core.batch import IGNORE_INDEX


class CausalLMObjective:
    if TYPE_CHECKING:  # what the model mixing this in brings (read-only there); declared for the checker only

        @property
        def context_length(self) -> int: ...

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy; ``targets`` are ids [B, T] or a distribution [B, T, V]."""
        logits = logits.float()
        if targets.dim() == logits.dim():
            return -(targets * F.log_softmax(logits, dim=-1)).sum()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    @staticmethod
    def example_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each row [B] over its scored positions (selective backprop ranks by it)."""
        logits = logits.float()
        if targets.dim() == logits.dim():
            per_position = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
            valid = targets.sum(-1) > 0
        else:
            per_position = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            valid = targets != IGNORE_INDEX
        return per_position.sum(1) / valid.sum(1).clamp(min=1)

    @staticmethod
    def loss_units(targets: torch.Tensor) -> torch.Tensor:
        """How many target positions ``loss`` sums over (the normaliser for the mean)."""
        if targets.is_floating_point():  # a distribution per position; ignored rows are all zero
            return (targets.sum(-1) > 0).sum()
        return (targets != IGNORE_INDEX).sum()

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` [batch, length]."""
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        for _ in range(max_new_tokens):
            context = idx[:, -self.context_length :]
            logits = self(context)[:, -1, :].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
