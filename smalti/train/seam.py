"""The step seam: where anything that governs an optimizer step enters it, so that the loop reads the same
whatever governance is on.

The loop calls a seam in this order, every step (``TrainingLoop._train_batch``)::

    start_step(loaded, batch, step)                  # the examples the step trains on
    microbatches(parts, step)                        # how the step's microbatches are cut
    for each microbatch:
        begin_microbatch(microbatch, step)           # before the forward pass
        backward(scaled_loss, microbatch)            # instead of ``loss.backward()``
        end_microbatch()                             # always, also after an error
    end_backward()                                   # every microbatch's gradient is in
    extra_backward(loss_of, microbatch, step)        # per microbatch, where the optimizer asks for a second pass
    before_unscale(inverse_scale)                    # gradients final, still loss-scaled, not clipped
    clip(max_norm, step)                             # instead of ``clip_grad_norm_``
    after_step(state, loss_sum, loss_units, skipped) # the optimizer stepped

and, around the run: ``check`` (refuse what it cannot honour, before anything is written), ``open`` (once the
run directory is locked), ``start`` (fresh or resumed), ``checkpoint_record`` and ``after_checkpoint``,
``attach_logger``, ``close``.

``StepSeam`` itself is plain training. ``smalti.governance.step`` has the routed and the ledgered seams; a new
optimizer or architecture that must see gradients per microbatch implements this class the same way (see
docs/architecture.md, "Adding a step behaviour").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from smalti import distributed
from smalti.core.algorithm import Algorithm
from smalti.core.batch import Batch
from smalti.core.logger import Logger
from smalti.core.state import State
from smalti.distributed import DistInfo
from smalti.errors import RecipeError
from smalti.io import Closing

if TYPE_CHECKING:
    from smalti.config import Recipe
    from smalti.data.lm import LanguageModelData


@dataclass
class SeamContext:
    """What a seam may be built from: the loop's parts, set up before the run directory is touched."""

    recipe: "Recipe"
    run_dir: Path
    model: torch.nn.Module
    data: "LanguageModelData"
    algorithms: Sequence[Algorithm]
    state: State
    dist: DistInfo = field(default_factory=DistInfo)
    starts_fresh: bool = True  # no checkpoint of this run directory to resume from


SeamFactory = Callable[[SeamContext], "StepSeam"]


class StepSeam(Closing):
    """Plain training: every hook is what the loop would do without governance."""

    routes = False  # the seam chooses per microbatch which parameters learn (and so reduces gradients itself)
    policy_fingerprint: str | None = None  # what a checkpoint records and a resume must find again

    def __init__(self, dist: DistInfo = DistInfo()) -> None:
        self.dist = dist
        self.model: torch.nn.Module | None = None

    @property
    def algorithm_view(self) -> Any:
        """What algorithms reach through ``State.governance`` (None: no governance to reach)."""
        return None

    # ---------------------------------------------------------------- the run

    def check(self, algorithms: Sequence[Algorithm], precision: str) -> None:
        """Refuse, naming the algorithm, a combination this step cannot honour."""
        if precision == "amp_fp16":
            scaled = [a.name for a in algorithms if a.needs_unscaled_gradients]
            if scaled:
                raise RecipeError(
                    f"algorithm {scaled[0]} reads gradients, which amp_fp16 keeps loss-scaled "
                    "until the step; use amp_bf16 or fp32"
                )

    def open(self, model: torch.nn.Module) -> None:
        """The run directory is this process's now: create what the seam writes there."""
        self.model = model

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        """Whole weights a fresh run starts from (a fine-tune's admitted parent), taken once."""
        return None

    def start(self, payload: dict[str, Any] | None, where: str, same_run: bool) -> None:
        """Begin fresh (``payload`` None) or from a checkpoint's payload (``same_run``: of this run directory)."""

    def resumable_changes(self, payload: dict[str, Any]) -> tuple[str, ...]:
        """Recipe keys (beyond ``config.RESUMABLE_CHANGES``) this run may change from the checkpoint's."""
        return ()

    def attach_logger(self, logger: Logger, log_every: int) -> None:
        """Hand the seam's own signals to trackers that show them, every ``log_every`` batches."""

    def checkpoint_record(self, final: bool, whole_weights: Callable[[], dict[str, torch.Tensor]]) -> Any:
        """What a checkpoint keeps of the seam (every rank calls it: it may be a collective)."""
        return None

    def after_checkpoint(self, record: Any) -> None:
        """A checkpoint holding ``record`` is written (main rank)."""

    def close(self) -> None:
        """Release what the seam opened."""

    # ---------------------------------------------------------------- one step

    def start_step(self, loaded: Batch, batch: Batch, step: int) -> None:
        """``loaded``: what the loader gave; ``batch``: what remains after algorithms ran."""

    def microbatches(self, parts: list[Batch], step: int) -> list[Batch]:
        return parts

    def begin_microbatch(self, microbatch: Batch, step: int) -> None:
        pass

    def backward(self, loss: torch.Tensor, microbatch: Batch) -> None:
        loss.backward()

    def end_microbatch(self) -> None:
        pass

    def extra_backward(self, loss_of: Callable[[], torch.Tensor], microbatch: Batch, step: int) -> None:
        """A backward pass an optimizer asks for beyond the step's gradient (Sophia's sampled labels):
        ``loss_of`` runs the forward pass; the gradient lands in ``.grad`` as the step's would, and nothing
        records it."""
        loss_of().backward()

    def end_backward(self) -> None:
        pass

    def before_unscale(self, inverse_scale: float) -> None:
        pass

    def clip(self, max_norm: float, step: int) -> None:
        assert self.model is not None
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def after_step(self, state: State, loss_sum: torch.Tensor, loss_units: torch.Tensor, skipped: bool) -> None:
        pass

    def global_mean_loss(self, loss_sum: torch.Tensor, loss_units: torch.Tensor) -> torch.Tensor:
        """The step's mean loss over every rank (a collective)."""
        return distributed.all_reduce_sum(loss_sum.clone(), self.dist) / loss_units
