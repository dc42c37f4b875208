import pytest

from smalti.trainer import Trainer

from conftest import tiny_recipe
from helpers import CrashAt, recipe

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra")


def _history(run_dir):
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smalti")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def test_mlflow_logs_metrics_params_and_continues_the_same_run_after_resume(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, logging={"console": False, "mlflow": True}, train={"max_duration": "16ba"})
    run_dir = tmp_path / "run"
    with pytest.raises(CrashAt.Crash):
        Trainer(recipe(config), run_dir, callbacks=[CrashAt(10)]).fit()
    Trainer(recipe(config), run_dir).fit()
    client, runs = _history(run_dir)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["optimizer.lr"] == "0.003"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps == list(range(1, 17))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [8, 16]
    assert run.info.status == "FINISHED"
