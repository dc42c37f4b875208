"""The learning-rate schedule at named times, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from smalti.config import SchedulerConfig
from smalti.core.state import DataShape, State
from smalti.core.time import Time, Timestamp
from smalti.loggers.jsonl import read_metrics
from smalti.optim import LRSchedule
from smalti.trainer import Trainer

from conftest import tiny_recipe
from helpers import recipe

# Base lr 2.0, warmup 10 batches, 110 in all: the decay spans batches 10..110, final fraction 0.1.
HAND = {
    "cosine": {0: 0.2, 4: 1.0, 9: 2.0, 10: 2.0, 35: 2 * (0.1 + 0.45 * (1 + math.sqrt(0.5))), 60: 1.1,
               85: 2 * (0.1 + 0.45 * (1 - math.sqrt(0.5))), 110: 0.2, 200: 0.2},
    "linear": {0: 0.2, 4: 1.0, 9: 2.0, 10: 2.0, 35: 1.55, 60: 1.1, 85: 0.65, 110: 0.2, 200: 0.2},
    "constant": {0: 0.2, 4: 1.0, 9: 2.0, 10: 2.0, 35: 2.0, 60: 2.0, 85: 2.0, 110: 2.0},
}


def _state(batch: int) -> State:
    parameter = torch.nn.Parameter(torch.zeros(1))
    return State(model=torch.nn.Linear(1, 1), optimizer=torch.optim.SGD([parameter], lr=0.0),
                 max_duration=Time.parse("110ba"), data_shape=DataShape(55, 4, 1), device=torch.device("cpu"),
                 timestamp=Timestamp(batch=batch))


@pytest.mark.parametrize("name", sorted(HAND))
def test_schedule_values_at_named_times(name):
    schedule = LRSchedule(SchedulerConfig(name=name, warmup="10ba", final_lr_fraction=0.1), base_lr=2.0)
    for batch, expected in HAND[name].items():
        state = _state(batch)
        assert schedule.apply(state) == pytest.approx(expected, abs=1e-12), (name, batch)
        assert state.optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)


def test_warmup_in_other_units_is_the_same_schedule():
    by_batches = LRSchedule(SchedulerConfig(warmup="10ba"), base_lr=1.0)
    by_samples = LRSchedule(SchedulerConfig(warmup="40sp"), base_lr=1.0)  # 4 samples a batch
    by_fraction = LRSchedule(SchedulerConfig(warmup="0.0909090909090909dur"), base_lr=1.0)
    for batch in (0, 5, 9, 10, 50, 109):
        expected = by_batches.factor(_state(batch))
        assert by_samples.factor(_state(batch)) == pytest.approx(expected)
        assert by_fraction.factor(_state(batch)) == pytest.approx(expected)


def test_the_trainer_trains_each_batch_at_the_scheduled_rate(tmp_path, tiny_corpus):
    """Batch b (from 0) runs at the rate of timestamp b; the log line after it (ba = b + 1) shows that rate."""
    config = tiny_recipe(tiny_corpus, train={"max_duration": "12ba"}, optimizer={"lr": 0.5},
                         scheduler={"name": "linear", "warmup": "2ba", "final_lr_fraction": 0.0},
                         logging={"console": False, "interval": "1ba"})
    Trainer(recipe(config), tmp_path / "run").fit()
    logged = {r["ba"]: r["train/lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/lr" in r}
    # warmup: 0.25, 0.5; then 0.5 * (1 - (b - 2) / 10) for b = 2..11
    expected = {1: 0.25, 2: 0.5, **{b + 1: 0.5 * (1 - (b - 2) / 10) for b in range(2, 12)}}
    assert logged.keys() == expected.keys()
    for ba, lr in expected.items():
        assert logged[ba] == pytest.approx(lr, abs=1e-12), ba
