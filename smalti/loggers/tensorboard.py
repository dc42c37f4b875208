"""TensorBoard event files in ``RUN_DIR/tensorboard`` (optional extra ``tensorboard``).

Written live with ``torch.utils.tensorboard``. A resumed run opens the same folder with ``purge_step`` at the
step after its checkpoint: TensorBoard's reader then drops what the killed process wrote past that point, so the
curve has each step once (the replay writes those steps again, with the same values). A fresh run writes a
session start too (at step 0): the reader behind ``tensorboard --load_fast=false`` purges only at a *second*
start, so without the first one a resumed run's replayed steps showed twice there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from smalti.core.state import State
from smalti.errors import RecipeError
from smalti.loggers.tracker import TrackerDestination


class TensorBoardLogger(TrackerDestination):
    tracker = "TensorBoard"

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
        except ImportError:
            raise RecipeError("logging.tensorboard needs TensorBoard: pip install 'smalti[tensorboard]'") from None
        self.directory = Path(run_dir) / "tensorboard"
        self._writer: Any = None
        self._params: dict[str, Any] = {}

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        self._params = dict(params)

    def _start(self, state: State) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = 0 if self._resumed_at is None else self._resumed_at + 1
        self._writer = SummaryWriter(log_dir=str(self.directory), purge_step=purge, flush_secs=30)
        if self._resumed_at is None and self._params:
            import yaml

            self._writer.add_text("recipe", "```\n" + yaml.safe_dump(self._params, sort_keys=False) + "```", 0)

    def _write(self, metrics: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)

    def _commit(self, step: int) -> None:
        if self._writer is not None:
            self._writer.flush()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
