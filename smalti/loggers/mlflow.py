"""MLflow tracking into a SQLite store inside the run directory (optional extra ``mlflow``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from smalti.core.state import State
from smalti.core.time import Timestamp
from smalti.errors import RecipeError
from smalti.loggers.logger import Logger, LoggerDestination

FLUSH_EVERY = 50  # batches; one MLflow call per 50 batches keeps its cost off the loop


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class MLflowLogger(LoggerDestination):
    """Logs metrics (step = batch) and the recipe as parameters to ``RUN_DIR/mlflow.db``.

    The MLflow run id is checkpointed, so a resumed run continues the same
    MLflow run. Browse with ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``.
    """

    def __init__(self, run_dir: Path, experiment: str = "smalti") -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RecipeError("logging.mlflow needs MLflow: pip install 'smalti[mlflow]'") from None
        self.run_dir = Path(run_dir)
        self._client = MlflowClient(tracking_uri=f"sqlite:///{self.run_dir.resolve() / 'mlflow.db'}")
        self._experiment = experiment
        self._run_id: str | None = None
        self._pending: list[Any] = []
        self._params: dict[str, str] = {}

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        self._params.update(_flatten(params))

    def fit_start(self, state: State, logger: Logger) -> None:
        if self._run_id is not None:
            return
        experiment = self._client.get_experiment_by_name(self._experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self._client.create_experiment(
                self._experiment, artifact_location=(self.run_dir.resolve() / "mlartifacts").as_uri()
            )
        )
        self._run_id = self._client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in sorted(self._params.items())]
        for start in range(0, len(params), 100):
            self._client.log_batch(self._run_id, params=params[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, v, now, timestamp.batch) for k, v in metrics.items())

    def _flush(self) -> None:
        if self._pending and self._run_id is not None:
            for start in range(0, len(self._pending), 1000):
                self._client.log_batch(self._run_id, metrics=self._pending[start : start + 1000])
            self._pending = []

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch % FLUSH_EVERY == 0:
            self._flush()

    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {"run_id": self._run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run_id = state.get("run_id")

    def fit_end(self, state: State, logger: Logger) -> None:
        self._flush()
        if self._run_id is not None:
            self._client.set_terminated(self._run_id)

    def close(self) -> None:
        self._flush()
