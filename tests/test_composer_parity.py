"""Parity with Composer 0.32.1's functional forms, for the methods where an outside comparison found ours differed.

Composer cannot be a test dependency (it pins torch below 2.7.1), so each reference below is
Composer's formula written out by hand from its source, on the same inputs as ours. Where we
deviate on purpose, the test pins the deviation and docs/algorithms.md says why.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from smalti.algorithms.ema import EMA
from smalti.core.event import Event
from smalti.core.state import DataShape, State
from smalti.core.time import Time, Timestamp
from smalti.functional.ghost_batchnorm import GhostBatchNorm
from smalti.functional.occlusion import colout_batch
from smalti.functional.selective_backprop import select_by_loss, should_select


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


# ------------------------------------------------------------------------------------------------- EMA


def _composer_compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float) -> None:
    """composer.algorithms.ema.compute_ema: every parameter and buffer, ema * s + (1 - s) * x, copied in."""
    with torch.no_grad():
        for ema_tensor, tensor in zip([*ema_model.parameters(), *ema_model.buffers()],
                                      [*model.parameters(), *model.buffers()]):
            ema_tensor.copy_(ema_tensor * smoothing + (1.0 - smoothing) * tensor.detach())


def test_ema_averages_batchnorm_statistics_as_composer_does():
    import copy

    model = _cnn()
    reference = copy.deepcopy(model)
    state = State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), max_duration=Time.parse("10ba"),
                  data_shape=DataShape(10, 8, 1), device=torch.device("cpu"))
    ema = EMA(half_life="2ba")
    ema.apply(Event.FIT_START, state, None)
    smoothing = 0.5 ** (1 / 2)
    generator = torch.Generator().manual_seed(1)
    for step in range(5):  # training moves the weights and the running statistics
        x = torch.randn(8, 1, 8, 8, generator=generator) * (step + 1) + step
        model(x).square().mean().backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.timestamp = Timestamp(batch=step + 1)
        ema.apply(Event.BATCH_END, state, None)
        _composer_compute_ema(model, reference, smoothing)

    bn = model[1]
    assert not torch.allclose(ema.averages["1.running_mean"], bn.running_mean, atol=1e-3)  # the average lags
    for name, tensor in [*reference.named_parameters(), *reference.named_buffers()]:
        if tensor.is_floating_point():
            torch.testing.assert_close(ema.averages[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # The deliberate deviation: the integer counter is the live one, not Composer's truncated average.
    assert int(ema.averages["1.num_batches_tracked"]) == int(bn.num_batches_tracked) == 5
    assert int(reference[1].num_batches_tracked) < 5

    # Evaluation runs with the averaged statistics, and training gets its own back bitwise.
    live = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    ema.apply(Event.EVAL_START, state, None)
    assert torch.equal(bn.running_var, ema.averages["1.running_var"])
    x = torch.randn(4, 1, 8, 8, generator=generator)
    model.eval(), reference.eval()
    reference[1].num_batches_tracked.fill_(5)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    ema.apply(Event.EVAL_END, state, None)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(tensor, live[name]), name


# ------------------------------------------------------------------------------------- ghost batch norm


def _composer_ghost_batchnorm(bn: nn.BatchNorm2d, x: torch.Tensor, ghost_batch_size: int) -> torch.Tensor:
    """composer.algorithms.ghost_batchnorm._GhostBatchNorm.forward, in training."""
    chunks = int(math.ceil(x.shape[0] / ghost_batch_size))
    original = bn.momentum
    bn.momentum = float(bn.momentum) / chunks
    out = torch.cat([bn(chunk) for chunk in x.chunk(chunks, 0)], dim=0)
    bn.momentum = original
    return out


@pytest.mark.parametrize("batch, ghost", [(100, 32), (128, 32), (96, 32), (33, 32), (70, 16)])
def test_ghost_batchnorm_chunks_and_momentum_match_composer(batch, ghost):
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, 4, 4) * 2 + 1
    ours_bn, reference_bn = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    ours = GhostBatchNorm(ours_bn, ghost)
    for _ in range(3):
        out = ours(x)
        expected = _composer_ghost_batchnorm(reference_bn, x, ghost)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours_bn.running_mean, reference_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours_bn.running_var, reference_bn.running_var, rtol=0, atol=0)
    assert ours_bn.momentum == reference_bn.momentum == 0.1  # restored after every forward


def test_ghost_batchnorm_splits_100_rows_into_four_equal_ghost_batches():
    seen = []
    bn = nn.BatchNorm1d(2)
    bn.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[0], module.momentum)))
    GhostBatchNorm(bn, 32)(torch.randn(100, 2))
    assert seen == [(25, 0.025)] * 4


def test_ghost_batchnorm_deviation_a_batch_smaller_than_a_ghost_batch_is_normalised_whole():
    bn = nn.BatchNorm1d(2)
    x = torch.randn(5, 2)
    torch.testing.assert_close(GhostBatchNorm(bn, 32)(x), nn.BatchNorm1d(2)(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- selective backprop


def _composer_selection_probabilities(losses: np.ndarray, keep: float) -> np.ndarray:
    """composer.algorithms.selective_backprop.select_using_loss: the probability of drawing each sorted position."""
    n = losses.shape[0]
    percs = np.arange(0.5, n, 1) / n
    probs = percs ** ((1.0 / keep) - 1.0)
    return probs / np.sum(probs)


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_selective_backprop_draws_with_composer_probabilities(keep, monkeypatch):
    losses = torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0, 0.7, 3.0, 0.2])
    n = losses.numel()
    drawn = []
    real_multinomial = torch.multinomial

    def recording(weights, count, **kwargs):
        drawn.append((weights.clone(), count))
        return real_multinomial(weights, count, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    chosen = select_by_loss(losses, keep, torch.Generator().manual_seed(0))
    (weights, count), = drawn
    assert count == chosen.numel() == int(keep * n)
    probabilities = (weights / weights.sum()).numpy()
    by_sorted_position = probabilities[losses.argsort().numpy()]  # Composer draws sorted positions
    np.testing.assert_allclose(by_sorted_position, _composer_selection_probabilities(losses.numpy(), keep), rtol=1e-12)
    assert (chosen.diff() > 0).all()


def test_selective_backprop_keep_a_quarter_favours_the_hardest_examples_more_than_a_half():
    low, high = _composer_selection_probabilities(np.zeros(8), 0.25), _composer_selection_probabilities(np.zeros(8), 0.5)
    assert high[-1] / high[0] == pytest.approx(15.0) and low[-1] / low[0] == pytest.approx(15.0 ** 3)


def test_selective_backprop_interrupts_on_the_same_batches_as_composer():
    def composer(duration, batch_idx, start=0.5, end=0.9, interrupt=2):
        return (start <= duration < end) and (interrupt == 0 or (batch_idx + 1) % interrupt != 0)

    for batch in range(12):
        for duration in (0.3, 0.5, 0.7, 0.9):
            for interrupt in (0, 2, 3):
                assert should_select(batch, duration, 0.5, 0.9, interrupt) == composer(duration, batch, 0.5, 0.9, interrupt)


# ---------------------------------------------------------------------------------------------- ColOut


@pytest.mark.parametrize("size, p", [(32, 0.15), (32, 0.3), (28, 0.15), (20, 0.15), (10, 0.7), (8, 0.5)])
def test_colout_keeps_as_many_rows_and_columns_as_composer(size, p):
    images = torch.arange(2 * 3 * size * size, dtype=torch.float32).reshape(2, 3, size, size)
    out = colout_batch(images, p_row=p, p_col=p / 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, int((1 - p) * size), int((1 - p / 2) * size))  # Composer's batch_colout
    rows = out[0, 0, :, 0] // size  # each kept row appears whole and in order
    assert (rows.diff() > 0).all()


def test_colout_at_the_default_keeps_27_of_32():
    assert colout_batch(torch.zeros(1, 1, 32, 32), 0.15, 0.15).shape[-2:] == (27, 27)
