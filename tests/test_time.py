import pytest
import torch

from smalti.core.state import DataShape, State
from smalti.core.time import Time, Timestamp, TimeUnit


@pytest.mark.parametrize(
    "text, value, unit",
    [
        ("2ep", 2, TimeUnit.EPOCH),
        ("500ba", 500, TimeUnit.BATCH),
        ("12000sp", 12000, TimeUnit.SAMPLE),
        ("1e6tok", 1_000_000, TimeUnit.TOKEN),
        ("0.25dur", 0.25, TimeUnit.DURATION),
        (" 3 ba ", 3, TimeUnit.BATCH),
    ],
)
def test_parse(text, value, unit):
    time = Time.parse(text)
    assert time.value == value and time.unit is unit
    assert isinstance(time.value, float if unit is TimeUnit.DURATION else int)


@pytest.mark.parametrize("text", ["", "ba", "12", "1.5ba", "-3ba", "3 epochs", "2 ep s", "0x10ba"])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        Time.parse(text)


def test_arithmetic_and_comparison():
    assert Time.parse("3ba") + Time.parse("4ba") == Time.parse("7ba")
    assert Time.parse("10sp") - Time.parse("4sp") == Time.parse("6sp")
    assert Time.parse("10ba") * 0.5 == Time.parse("5ba")
    assert 2 * Time.parse("0.25dur") == Time.parse("0.5dur")
    assert Time.parse("10ba") / Time.parse("4ba") == 2.5
    assert Time.parse("3ep") > Time.parse("2ep") and Time.parse("2ep") <= Time.parse("2ep")
    assert str(Time.parse("1e6tok")) == "1000000tok" and str(Time.parse("0.5dur")) == "0.5dur"
    with pytest.raises(ValueError, match="different units"):
        Time.parse("3ba") + Time.parse("3ep")
    with pytest.raises(ValueError, match="different units"):
        Time.parse("3ba") < Time.parse("3sp")


def test_timestamp_progression():
    ts = Timestamp()
    ts = ts.after_batch(samples=8, tokens=128).after_batch(samples=8, tokens=100)
    assert (ts.batch, ts.sample, ts.token, ts.batch_in_epoch, ts.token_in_epoch) == (2, 16, 228, 2, 228)
    ts = ts.after_epoch()
    assert (ts.epoch, ts.batch, ts.batch_in_epoch, ts.sample_in_epoch) == (1, 2, 0, 0)
    assert Timestamp.from_state_dict(ts.state_dict()) == ts
    assert ts.get(TimeUnit.TOKEN) == 228
    with pytest.raises(ValueError):
        ts.get(TimeUnit.DURATION)


def _state(max_duration: str) -> State:
    model = torch.nn.Linear(1, 1)
    return State(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_duration=Time.parse(max_duration),
        data_shape=DataShape(batches_per_epoch=10, global_batch_size=4, tokens_per_sample=16),
        device=torch.device("cpu"),
    )


def test_state_unit_conversions():
    state = _state("2ep")
    assert state.batches_in(Time.parse("1ep")) == 10
    assert state.batches_in(Time.parse("8sp")) == 2
    assert state.batches_in(Time.parse("128tok")) == 2
    assert state.batches_in(Time.parse("0.5dur")) == 10
    assert state.fraction_of_training(Time.parse("5ba")) == 0.25
    assert state.fraction_of_training(Time.parse("1ep")) == 0.5
    state.timestamp = Timestamp(epoch=1, batch=15, batch_in_epoch=5)
    assert state.elapsed_fraction == 0.75
    assert state.reached(Time.parse("0.75dur")) and not state.reached(Time.parse("0.8dur"))
    assert not state.is_done
    state.timestamp = Timestamp(epoch=2, batch=20)
    assert state.is_done


def test_due_intervals():
    state = _state("100ba")
    state.timestamp = Timestamp(batch=20)
    assert state.due_at_batch_end(Time.parse("10ba"))
    assert not state.due_at_batch_end(Time.parse("15ba"))
    assert state.due_at_batch_end(Time.parse("40sp"))  # 10 batches
    assert state.due_at_batch_end(Time.parse("0.1dur"))  # 10 batches
    assert not state.due_at_batch_end(Time.parse("1ep"))
    state.timestamp = Timestamp(epoch=2)
    assert state.due_at_epoch_end(Time.parse("1ep")) and not state.due_at_epoch_end(Time.parse("3ep"))


def test_max_duration_cannot_be_dur():
    with pytest.raises(ValueError, match="max_duration"):
        _state("0.5dur")


def test_a_duration_fraction_survives_the_round_trip_through_its_string():
    """Recipes store times as strings: a fraction must not be rounded on the way (it moved warmup ends)."""
    for value in (0.0909090909090909, 1 / 3, 0.5, 0.1, 1.0):
        assert Time.parse(str(Time.parse(f"{value!r}dur"))).value == value
    assert str(Time.parse("0.5dur")) == "0.5dur" and str(Time.parse("1dur")) == "1dur"
