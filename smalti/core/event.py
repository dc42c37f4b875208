"""The events of the training loop, in the order the trainer fires them."""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """Every point in the loop where algorithms, callbacks and loggers may act.

    The loop, as ``smalti/train/loop.py`` runs it (``[...]``: the step seam's hooks, ``smalti/train/seam.py``)::

        INIT                                  # model built, before any surgery is frozen
        FIT_START
        while not done:
            EPOCH_START
            for batch in train data:
                BATCH_START                   # learning rate set for this batch
                AFTER_DATALOADER              # batch on the device; batch transforms go here
                for microbatch in batch:      # gradient accumulation
                    BEFORE_FORWARD
                    outputs = model(inputs)
                    AFTER_FORWARD
                    BEFORE_LOSS
                    loss = model.loss(outputs, targets)
                    AFTER_LOSS
                    BEFORE_BACKWARD
                    backward()                # [the seam's backward: routed, per signature]
                    AFTER_BACKWARD
                BEFORE_OPTIMIZER_STEP         # gradients complete; clipping happens here
                optimizer.step()
                AFTER_OPTIMIZER_STEP          # [ledger entry written here]
                BATCH_END                     # timestamp already counts this batch
                if eval due:        EVAL_START, evaluate, EVAL_END
                if checkpoint due:  BATCH_CHECKPOINT (after the checkpoint is written)
                if done: break
            EPOCH_END
            if checkpoint due:      EPOCH_CHECKPOINT
        FIT_END

    Evaluation runs before the checkpoint of the same batch, so a checkpoint
    carries that batch's evaluation and a resumed run never loses or repeats it.

    Algorithms run in their (pass-sorted) order on every event except the
    ``AFTER_*`` ones (``AFTER_DATALOADER`` aside), where they run in reverse, so that an algorithm that
    changed something on ``BEFORE_X`` can undo it on ``AFTER_X`` with every
    later change already undone. Callbacks run after algorithms, loggers last.
    """

    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_DATALOADER = "after_dataloader"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_LOSS = "before_loss"
    AFTER_LOSS = "after_loss"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"
    BATCH_END = "batch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    BATCH_CHECKPOINT = "batch_checkpoint"
    EPOCH_END = "epoch_end"
    EPOCH_CHECKPOINT = "epoch_checkpoint"
    FIT_END = "fit_end"

    @property
    def is_after_event(self) -> bool:
        """``AFTER_*`` events run algorithms last-in, first-out, except ``AFTER_DATALOADER``: it closes no
        ``BEFORE_*`` change, it is where batch transforms happen, in their declared order."""
        return self.value.startswith("after_") and self is not Event.AFTER_DATALOADER
