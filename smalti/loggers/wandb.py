"""Weights & Biases, through the ``wandb`` library (optional extra ``wandb``).

``logging.wandb: {project: ..., mode: offline}`` writes the run under ``RUN_DIR/wandb`` with no network
(``wandb sync`` uploads it later); ``mode: online`` streams it, which is the user's choice and never a test's.

Why records wait for a checkpoint: W&B keeps a run's history append-only, and a resumed run continues the same
run id. A process killed after logging steps its last checkpoint does not cover would, once resumed, log those
steps again. So rows are held in memory and handed to W&B when a checkpoint covering them is on disk (and at the
end): W&B then shows every step exactly once, a checkpoint interval behind the run. W&B writes what it is handed
to its run file within 0.1 s; a process killed inside that window leaves those steps out of the W&B view (never
twice; metrics.jsonl and the ledger have them). A tracker that cannot be reached warns once and is switched off
(``smalti.loggers.tracker``).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Literal, Mapping

from smalti.core.state import State
from smalti.errors import RecipeError
from smalti.loggers.tracker import TrackerDestination


class WandbLogger(TrackerDestination):
    tracker = "Weights & Biases"

    def __init__(
        self,
        run_dir: Path,
        project: str,
        mode: Literal["offline", "online"] = "offline",
        entity: str | None = None,
        name: str | None = None,
        init_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RecipeError("logging.wandb needs Weights & Biases: pip install 'smalti[wandb]'") from None
        self.run_dir = Path(run_dir)
        self.project, self.mode, self.entity = project, mode, entity
        self.name = name or self.run_dir.name
        self.init_timeout = init_timeout
        self.run_id: str | None = None
        self._run: Any = None
        self._params: dict[str, Any] = {}
        self._rows: dict[int, dict[str, float]] = {}  # step -> row, waiting for a checkpoint
        self._done = -1  # the last step handed to W&B

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        self._params = dict(params)

    def _start(self, state: State) -> None:
        import wandb

        if self.run_id is None:  # W&B run ids are lowercase letters and digits; this one is checkpointed
            self.run_id = secrets.token_hex(6)
        # W&B writes its run file every x_transaction_log_flush_interval seconds (15 by default): 0.1 keeps what it
        # was handed at a checkpoint from dying with a killed process.
        settings = wandb.Settings(
            init_timeout=self.init_timeout,
            x_disable_stats=True,
            console="off",
            disable_git=True,
            save_code=False,
            silent=True,
            x_transaction_log_flush_interval=0.1,
        )
        self._done = self._committed()
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name,
            id=self.run_id,
            resume="allow",
            mode=self.mode,
            dir=str(self.run_dir),
            config=self._params,
            settings=settings,
            reinit="create_new",
        )

    @property
    def _committed_file(self) -> Path:
        return self.run_dir / "wandb" / "smalti-committed.json"

    def _committed(self) -> int:
        """The last step handed to W&B, as recorded after each hand-over: a run resumed from an older checkpoint
        (the newest was damaged) does not log the steps in between twice."""
        try:
            recorded = json.loads(self._committed_file.read_text())
        except (OSError, ValueError):
            return -1
        return int(recorded["step"]) if recorded.get("run_id") == self.run_id else -1

    def _write(self, metrics: dict[str, float], step: int) -> None:
        if self._resumed_at is not None and step <= max(self._resumed_at, self._done):
            return  # W&B has it already
        self._rows.setdefault(step, {}).update(metrics)

    def _commit(self, step: int) -> None:
        if self._run is None:
            return
        ready = sorted(s for s in self._rows if s <= step)
        for row_step in ready:
            self._run.log(self._rows.pop(row_step), step=row_step, commit=True)  # the row is whole: write it now
        if ready:
            from smalti.io import atomic_write_text

            self._done = ready[-1]
            self._committed_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._committed_file, json.dumps({"run_id": self.run_id, "step": self._done}))

    def _state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def _load(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def _close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()
