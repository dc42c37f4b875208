"""Sophia (Liu et al., ICLR 2024) with its Gauss-Newton-Bartlett Hessian estimate, for routed training.

Every ``hessian_every`` steps the loop runs one more forward and backward pass over the step's examples,
with labels sampled from the model's own predictions (``sampled_labels``), and hands the gradient to
``update_hessian``: the diagonal estimate is ``B * g_hat * g_hat`` for a mean loss over B tokens, kept as an
exponential average. That pass goes through the step seam's ``extra_backward``: the same microbatches,
routed by the same plan, so a parameter a class may not update receives no gradient from the class's
examples in it either, and its Hessian estimate cannot learn from them (G1 covers all of the state).

The update is AdamW-like with a clipped, preconditioned momentum::

    m <- b1 m + (1 - b1) g
    p <- p (1 - lr wd)
    p <- p - lr sign(m) min(|m| / max(rho h, eps), 1)

Each element on its own: routing's proof (a parameter without a gradient is skipped) holds as for AdamW.
Written here from the paper's Algorithm 2: torch has no Sophia, and the packages that do implement the
Hutchinson variant (a Hessian-vector product with ``create_graph``) rather than the sampled-label one the
paper recommends for language models.
"""

from __future__ import annotations

from typing import Any

import torch

from smalti.core.batch import IGNORE_INDEX


class SophiaG(torch.optim.Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        hessian_every: int = 10,
        eps: float = 1e-15,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))
        self.hessian_every = hessian_every

    def hessian_due(self, batch: int) -> bool:
        """Whether the step at ``batch`` (0-based) refreshes the Hessian estimate (the first step always does)."""
        return batch % self.hessian_every == 0

    @torch.no_grad()
    def update_hessian(self, batch_tokens: float) -> None:
        """Fold the gradient now in ``.grad`` (of the mean sampled-label loss) into the estimate."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                state["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=(1 - beta2) * batch_tokens)

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, rho, decay, eps = group["lr"], group["rho"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p)
                state["step"] += 1
                exp_avg = state["exp_avg"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                p.mul_(1 - lr * decay)
                ratio = (exp_avg.abs() / (rho * state["hessian"]).clamp(min=eps)).clamp(max=1)
                p.addcmul_(exp_avg.sign(), ratio, value=-lr)


def sampled_labels(logits: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (Gumbel-max), where ``targets`` has a label.

    The noise is drawn for the whole ``logits`` shape before anything is compared, so a row's labels depend
    on its own logits and the generator alone: changing one example's content changes no other's labels."""
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
    gumbel = -torch.log(-torch.log(noise.clamp(min=1e-20, max=1.0 - 1e-7)))
    drawn = (logits.detach().float() + gumbel).argmax(dim=-1)
    if targets.is_floating_point():  # a distribution per position: rows with none are ignored
        return torch.where(targets.sum(-1) > 0, drawn, torch.full_like(drawn, IGNORE_INDEX))
    return torch.where(targets != IGNORE_INDEX, drawn, targets)
