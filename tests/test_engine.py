import torch

from smalti.core.algorithm import Algorithm
from smalti.core.callback import Callback
from smalti.core.engine import Engine
from smalti.core.event import Event
from smalti.core.passes import order_for_event, reverse_after_events, sort_by_order
from smalti.core.state import DataShape, State
from smalti.core.time import Time
from smalti.loggers.logger import Logger, LoggerDestination


class Recorder(Algorithm):
    def __init__(self, label: str, trace: list, order: int = 0, events=None) -> None:
        self.label, self.trace, self.order = label, trace, order
        self.events = set(events or Event)

    @property
    def name(self) -> str:
        return self.label

    def match(self, event, state):
        return event in self.events

    def apply(self, event, state, logger):
        self.trace.append((event, self.label))


class RecordingCallback(Callback):
    def __init__(self, label, trace):
        self.label, self.trace = label, trace

    def batch_start(self, state, logger):
        self.trace.append((Event.BATCH_START, self.label))

    def after_forward(self, state, logger):
        self.trace.append((Event.AFTER_FORWARD, self.label))


class RecordingDestination(LoggerDestination):
    def __init__(self, trace):
        self.trace = trace

    def batch_start(self, state, logger):
        self.trace.append((Event.BATCH_START, "logger"))


def _state() -> State:
    model = torch.nn.Linear(1, 1)
    return State(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_duration=Time.parse("1ep"),
        data_shape=DataShape(batches_per_epoch=1, global_batch_size=1, tokens_per_sample=1),
        device=torch.device("cpu"),
    )


def test_after_events_are_reversed_and_others_are_not():
    trace: list = []
    algorithms = [Recorder("a", trace), Recorder("b", trace), Recorder("c", trace)]
    state = _state()
    engine = Engine(state, Logger(state), algorithms)
    engine.run(Event.BEFORE_FORWARD)
    engine.run(Event.AFTER_FORWARD)
    engine.run(Event.AFTER_DATALOADER)
    engine.run(Event.BATCH_END)
    labels = [label for _, label in trace]
    # AFTER_DATALOADER closes no BEFORE_* change: batch transforms run in their declared order there
    assert labels == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "a", "b", "c"]


def test_algorithms_then_callbacks_then_loggers():
    trace: list = []
    state = _state()
    logger = Logger(state, [RecordingDestination(trace)])
    engine = Engine(state, logger, [Recorder("algo", trace)], [RecordingCallback("cb1", trace), RecordingCallback("cb2", trace)])
    engine.run(Event.BATCH_START)
    assert [label for _, label in trace] == ["algo", "cb1", "cb2", "logger"]
    trace.clear()
    engine.run(Event.AFTER_FORWARD)  # callbacks keep their order on AFTER_* events
    assert [label for _, label in trace] == ["algo", "cb1", "cb2"]


def test_only_matching_algorithms_apply():
    trace: list = []
    state = _state()
    engine = Engine(state, Logger(state), [Recorder("x", trace, events=[Event.FIT_START])])
    for event in Event:
        engine.run(event)
    assert trace == [(Event.FIT_START, "x")]


def test_sort_by_order_pass_is_stable():
    trace: list = []
    late, first, mid_a, mid_b = (Recorder("late", trace, 100), Recorder("first", trace, -100),
                                 Recorder("mid_a", trace), Recorder("mid_b", trace))
    ordered = sort_by_order([late, mid_a, first, mid_b], Event.BATCH_END)
    assert [a.label for a in ordered] == ["first", "mid_a", "mid_b", "late"]
    assert [a.label for a in reverse_after_events(ordered, Event.AFTER_LOSS)] == ["late", "mid_b", "mid_a", "first"]
    assert [a.label for a in reverse_after_events(ordered, Event.BEFORE_LOSS)] == ["first", "mid_a", "mid_b", "late"]
    assert [a.label for a in order_for_event([late, first], Event.AFTER_BACKWARD)] == ["late", "first"]


def test_after_event_classification():
    after = {e for e in Event if e.is_after_event}
    assert after == {
        Event.AFTER_FORWARD, Event.AFTER_LOSS,
        Event.AFTER_BACKWARD, Event.AFTER_OPTIMIZER_STEP,
    }


def test_duplicate_algorithms_rejected():
    state = _state()
    try:
        Engine(state, Logger(state), [Recorder("same", []), Recorder("same", [])])
    except ValueError as error:
        assert "same" in str(error)
    else:
        raise AssertionError("duplicate algorithm accepted")


def test_logger_converts_tensors_once_and_stamps_time():
    received = []

    class Sink(LoggerDestination):
        def log_metrics(self, metrics, timestamp):
            received.append((dict(metrics), timestamp))

    state = _state()
    Logger(state, [Sink()]).log_metrics({"loss": torch.tensor(1.5)})
    assert received == [({"loss": 1.5}, state.timestamp)]
    assert isinstance(received[0][0]["loss"], float)
