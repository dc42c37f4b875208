"""Each functional form against a value computed by hand."""

import math

import pytest
import torch

from smalti.core.batch import Batch
from smalti.functional import (
    compute_ema,
    ema_smoothing,
    set_batch_sequence_length,
    smooth_labels,
    warmup_sequence_length,
)
from smalti.models.gpt import GPT


def test_smooth_labels_by_hand():
    targets = torch.tensor([[2, 0], [1, -100]])
    smoothed = smooth_labels(targets, num_classes=4, smoothing=0.2)
    # (1 - 0.2) * one_hot + 0.2 / 4 = 0.85 at the target, 0.05 elsewhere
    assert torch.allclose(smoothed[0, 0], torch.tensor([0.05, 0.05, 0.85, 0.05]))
    assert torch.allclose(smoothed[0, 1], torch.tensor([0.85, 0.05, 0.05, 0.05]))
    assert torch.equal(smoothed[1, 1], torch.zeros(4))  # ignored position
    assert torch.allclose(smoothed[:1].sum(-1), torch.ones(1, 2))


def test_smoothed_loss_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5]]])
    targets = smooth_labels(torch.tensor([[1]]), 3, 0.3)
    log_probs = [x - math.log(sum(math.exp(v) for v in (1.0, 2.0, 0.5))) for x in (1.0, 2.0, 0.5)]
    expected = -(0.1 * log_probs[0] + 0.8 * log_probs[1] + 0.1 * log_probs[2])
    assert GPT.loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert GPT.loss_units(targets).item() == 1
    assert GPT.loss(logits, smooth_labels(torch.tensor([[1]]), 3, 0.0)).item() == pytest.approx(-log_probs[1], rel=1e-6)


def test_smooth_labels_rejects_bad_smoothing():
    with pytest.raises(ValueError):
        smooth_labels(torch.tensor([0]), 2, 1.0)


def test_ema_by_hand():
    assert ema_smoothing(1, 1) == 0.5
    assert ema_smoothing(2, 4) == pytest.approx(2 ** -0.5)
    average, current = torch.tensor([1.0, 10.0]), torch.tensor([3.0, 0.0])
    compute_ema([average], [current], smoothing=0.75)
    assert torch.allclose(average, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 10 + 0.25 * 0]))
    compute_ema([average], [current], smoothing=1.0)  # smoothing 1: the average never moves
    assert torch.allclose(average, torch.tensor([1.5, 7.5]))


def test_warmup_sequence_length_by_hand():
    assert warmup_sequence_length(0.0, 8, 64, 8) == 8
    assert warmup_sequence_length(0.5, 8, 64, 8) == 32  # 8 + 56 * 0.5 = 36 -> 32
    assert warmup_sequence_length(0.99, 8, 64, 8) == 56
    assert warmup_sequence_length(1.0, 8, 64, 8) == 64
    assert warmup_sequence_length(0.1, 5, 64, 8) == 8  # 5 + 5.9 = 10.9 -> 8
    with pytest.raises(ValueError):
        warmup_sequence_length(0.5, 0, 64)


def _batch():
    window = torch.arange(2 * 9).view(2, 9)
    return Batch(inputs=window[:, :-1], targets=window[:, 1:], sample_ids=torch.tensor([5, 7]), provenance=torch.tensor([[0], [1]]))


def test_set_batch_sequence_length_truncate():
    short = set_batch_sequence_length(_batch(), 3)
    assert short.inputs.tolist() == [[0, 1, 2], [9, 10, 11]]
    assert short.targets.tolist() == [[1, 2, 3], [10, 11, 12]]
    assert short.sample_ids.tolist() == [5, 7] and short.provenance.tolist() == [[0], [1]]


def test_set_batch_sequence_length_reshape_keeps_tokens_and_provenance():
    short = set_batch_sequence_length(_batch(), 4, truncate=False)
    assert short.inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [9, 10, 11, 12], [13, 14, 15, 16]]
    assert short.targets.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [10, 11, 12, 13], [14, 15, 16, 17]]
    assert short.sample_ids.tolist() == [5, 5, 7, 7] and short.provenance.tolist() == [[0], [0], [1], [1]]
    assert set_batch_sequence_length(_batch(), 8) is not None and set_batch_sequence_length(_batch(), 99).inputs.shape == (2, 8)
