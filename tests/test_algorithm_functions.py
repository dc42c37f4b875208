"""The functional form of each algorithm against a hand computation, and each model surgery against the
promise it makes (outputs preserved where the method says so, idempotent, fixed order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smalti.core.batch import Batch, union_provenance
from smalti.functional.alibi import apply_alibi
from smalti.functional.augment import (autocontrast, equalize, posterize, randaugment_batch, augmix_batch, rotate,
                                        solarize, translate_x)
from smalti.functional.blurpool import BlurConv2d, apply_blurpool, blur_2d
from smalti.functional.channels_last import apply_channels_last
from smalti.functional.factorize import FactorizedConv2d, FactorizedLinear, apply_factorization
from smalti.functional.gated_linear_units import GatedMLP, apply_gated_linear_units
from smalti.functional.ghost_batchnorm import GhostBatchNorm, apply_ghost_batchnorm
from smalti.functional.gradient_clipping import adaptive_clip_, apply_gradient_clipping
from smalti.functional.gyro_dropout import GyroDropoutLayer, apply_gyro_dropout
from smalti.functional.low_precision_norm import apply_low_precision_groupnorm, apply_low_precision_layernorm
from smalti.functional.mixing import cutmix_batch, cutmix_box, mixup_batch
from smalti.functional.noop_model import apply_noop_model
from smalti.functional.occlusion import colout_batch, cutout_batch
from smalti.functional.progressive_resizing import resize_batch, resizing_scale, scaled_size
from smalti.functional.sam import sharpness_aware_perturbation
from smalti.functional.selective_backprop import select_by_loss, should_select
from smalti.functional.squeeze_excite import SqueezeExciteConv2d, apply_squeeze_excite
from smalti.functional.stochastic_depth import StochasticBlock, apply_stochastic_depth, drop_residual
from smalti.functional.weight_averaging import update_running_average
from smalti.functional.weight_standardization import apply_weight_standardization, standardize_weight
from smalti.models.gpt import GPT, GPTConfig
from smalti.models.resnet import ResNet, ResNetConfig


def resnet(**overrides) -> ResNet:
    torch.manual_seed(0)
    return ResNet(ResNetConfig(num_classes=10, **{"widths": (8, 16), **overrides}))


def gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=16, **overrides))


def images(n=4, c=1, size=8, seed=1) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def image_batch(labels, size=8) -> Batch:
    labels = torch.tensor(labels)
    return Batch(inputs=images(len(labels), size=size), targets=labels, sample_ids=torch.arange(len(labels)),
                 provenance=labels.unsqueeze(1))


# ---------------------------------------------------------------- blurpool


def test_blur_by_hand():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 16.0
    expected = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])
    out = blur_2d(x)
    assert torch.equal(out[0, 0, 1:4, 1:4], expected) and out.sum() == 16.0
    assert blur_2d(x, stride=2).shape == (1, 1, 3, 3)


def test_blurpool_wraps_strided_convs_only_and_is_idempotent():
    model = resnet()
    strided = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert apply_blurpool(model, min_channels=1) == len(strided) == 2  # stage 2's conv1 and its shortcut
    assert apply_blurpool(model, min_channels=1) == 0
    block = model.stages[1][0]
    assert isinstance(block.conv1, BlurConv2d)
    x = torch.rand(2, 8, 8, 8)
    assert torch.allclose(block.conv1(x), block.conv1.conv(blur_2d(x)))


# ---------------------------------------------------------------- squeeze-excite


def test_squeeze_excite_by_hand_and_idempotent():
    model = resnet()
    count = apply_squeeze_excite(model, min_channels=16, latent_channels=4)
    assert count == 2 and apply_squeeze_excite(model, min_channels=16, latent_channels=4) == 0
    layer = model.stages[1][0].conv2
    assert isinstance(layer, SqueezeExciteConv2d)
    x = torch.rand(2, 16, 4, 4)
    y = layer.conv(x)
    gate = torch.sigmoid(layer.se.excite(torch.relu(layer.se.squeeze(y.mean(dim=(2, 3))))))
    assert torch.allclose(layer(x), y * gate[:, :, None, None])


# ---------------------------------------------------------------- ghost batch norm


def test_ghost_batchnorm_normalises_each_ghost_batch_and_is_plain_in_eval():
    bn = nn.BatchNorm2d(3)
    ghost = GhostBatchNorm(nn.BatchNorm2d(3), ghost_batch_size=2)
    x = torch.randn(6, 3, 4, 4)
    out = ghost(x)
    for chunk, got in zip(x.split(2), out.split(2)):
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        assert torch.allclose(got, (chunk - mean) / torch.sqrt(var + 1e-5), atol=1e-5)
    ghost.eval(), bn.eval()
    bn.load_state_dict(ghost.batchnorm.state_dict())
    assert torch.equal(ghost(x), bn(x))
    model = resnet()
    assert apply_ghost_batchnorm(model, 4) == 6 and apply_ghost_batchnorm(model, 4) == 0


# ---------------------------------------------------------------- weight standardization


def test_weight_standardization_by_hand():
    weight = torch.randn(4, 3, 3, 3)
    flat = weight.numpy().reshape(4, -1)
    expected = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
    assert np.allclose(standardize_weight(weight).numpy().reshape(4, -1), expected, atol=1e-5)
    model = resnet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert apply_weight_standardization(model, n_last_layers_ignore=1) == len(convs) - 1
    assert apply_weight_standardization(model, n_last_layers_ignore=1) == 0
    conv = model.stem.conv
    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(x, standardize_weight(conv.parametrizations.weight.original), padding=1),
                          atol=1e-6)


# ---------------------------------------------------------------- stochastic depth


def test_drop_residual_by_hand():
    torch.manual_seed(0)
    r = torch.ones(1000, 3)
    out = drop_residual(r, 0.25, "sample", training=True)
    kept = out[:, 0]
    assert torch.allclose(kept[kept > 0], torch.tensor(1.0 / 0.75)) and abs((kept > 0).float().mean() - 0.75) < 0.05
    assert torch.equal(drop_residual(r, 0.25, "sample", training=False), r)
    assert torch.allclose(drop_residual(r, 0.25, "block", training=False), r * 0.75)
    block = drop_residual(r, 0.25, "block", training=True)
    assert torch.equal(block, r) or torch.equal(block, torch.zeros_like(r))


def test_stochastic_depth_rates_grow_linearly_and_eval_is_unchanged():
    model, reference = resnet(), resnet()
    assert apply_stochastic_depth(model, drop_rate=0.3) == 2
    rates = [m.drop_rate for m in model.modules() if isinstance(m, StochasticBlock)]
    assert rates == pytest.approx([0.15, 0.3])
    model.eval(), reference.eval()
    x = images(2)
    assert torch.equal(model(x), reference(x))  # sample mode: evaluation uses every branch as is
    text = gpt()
    assert apply_stochastic_depth(text, 0.2) == 2 and apply_stochastic_depth(text, 0.2) == 0


# ---------------------------------------------------------------- factorize


def test_factorize_at_full_rank_preserves_outputs_and_at_low_rank_is_the_truncated_svd():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    full = FactorizedLinear(linear, rank=10)
    x = torch.randn(5, 12)
    assert torch.allclose(full(x), linear(x), atol=1e-5)
    low = FactorizedLinear(linear, rank=3)
    product = low.second.weight @ low.first.weight
    s = torch.linalg.svdvals(linear.weight.detach().double())
    error = float(torch.linalg.norm(product.detach().double() - linear.weight.detach().double()))
    assert error == pytest.approx(float(s[3:].norm()), rel=1e-5)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    factorized = FactorizedConv2d(conv, rank=6)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(factorized(x), conv(x), atol=1e-5)


def test_apply_factorization_skips_small_and_tied_layers():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(4, 4))
    assert apply_factorization(model, min_features=32, latent_features=0.25) == 1
    assert isinstance(model[0], FactorizedLinear) and isinstance(model[1], nn.Linear)
    assert apply_factorization(model, min_features=32, latent_features=0.25) == 0
    text = gpt()
    assert apply_factorization(text, min_features=8, latent_features=0.25) > 0
    assert text.head.weight is text.tok_emb.weight  # the tied head is left alone


# ---------------------------------------------------------------- gated linear units, alibi


def test_gated_linear_units_by_hand_with_equal_parameter_count():
    model = gpt()
    before = sum(p.numel() for p in model.parameters())
    assert apply_gated_linear_units(model) == 2
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GatedMLP)
    x = torch.randn(3, 16)
    assert torch.allclose(mlp(x), mlp.proj(F.gelu(mlp.gate(x)) * mlp.up(x)))
    after = sum(p.numel() for p in model.parameters())
    assert abs(after - before) / before < 0.02


def test_alibi_surgery_equals_a_gpt_built_with_alibi():
    model = gpt()
    assert apply_alibi(model) == 2 and apply_alibi(model) == 0
    assert model.pos_emb is None and "pos_emb.weight" not in dict(model.named_parameters())
    reference = gpt(alibi=True)
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(11, (2, 8))
    assert torch.equal(model(idx), reference(idx))


# ---------------------------------------------------------------- low precision norms, channels last, no-op


def test_low_precision_norms_are_the_original_on_cpu():
    model = nn.Sequential(nn.LayerNorm(8), nn.GroupNorm(2, 8))
    reference = nn.Sequential(nn.LayerNorm(8), nn.GroupNorm(2, 8))
    reference.load_state_dict(model.state_dict())
    assert apply_low_precision_layernorm(model) == 1 and apply_low_precision_groupnorm(model) == 1
    assert apply_low_precision_layernorm(model) == 0
    x = torch.randn(2, 8)
    assert torch.equal(model[0](x), reference[0](x))
    y = torch.randn(2, 8, 3, 3)
    assert torch.equal(model[1](y), reference[1](y))
    assert list(model.state_dict()) == list(reference.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_low_precision_layernorm_runs_in_bf16_under_autocast():
    norm = nn.LayerNorm(8).cuda()
    apply_low_precision_layernorm(norm)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert norm(torch.randn(2, 8, device="cuda")).dtype == torch.bfloat16


def test_channels_last_preserves_outputs():
    model, reference = resnet(), resnet()
    model = apply_channels_last(model)
    assert model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    model.eval(), reference.eval()
    x = images(3)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_noop_model_outputs_zeros_of_the_right_shape_and_keeps_the_loss():
    vision = apply_noop_model(resnet())
    assert apply_noop_model(vision) is vision
    out = vision(images(3))
    assert out.shape == (3, 10) and not out.any()
    assert float(vision.loss(out, torch.tensor([0, 1, 2]))) == pytest.approx(3 * math.log(10))
    assert int(vision.accuracy_counts(out, torch.tensor([0, 1, 2]))) == 1  # argmax of zeros: class 0
    text = apply_noop_model(gpt())
    assert text(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 11) and not hasattr(text, "accuracy_counts")


# ---------------------------------------------------------------- gyro dropout


def test_gyro_dropout_trains_tau_masks_on_slices_and_rotates():
    torch.manual_seed(0)
    layer = GyroDropoutLayer(p=0.5, sigma=6, tau=2, rotate_every=2)
    x = torch.ones(4, 10)
    first = layer(x)
    assert layer.masks.shape == (6, 10) and set(layer.masks.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(first[0], layer.masks[0]) and torch.equal(first[1], layer.masks[0])
    assert torch.equal(first[2], layer.masks[1]) and torch.equal(first[3], layer.masks[1])
    assert torch.equal(layer(x)[0], layer.masks[0])  # step 2: same group
    assert torch.equal(layer(x)[0], layer.masks[2])  # step 3: the next two masks
    layer.eval()
    assert torch.equal(layer(x), x)
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2), nn.Dropout(0.0))
    assert apply_gyro_dropout(model, sigma=4, tau=2) == 1


def test_gyro_dropout_masks_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    layer = GyroDropoutLayer(p=0.5, sigma=4, tau=2)
    layer(torch.ones(2, 5))
    fresh = GyroDropoutLayer(p=0.5, sigma=4, tau=2)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.masks, layer.masks) and int(fresh.steps) == 1


# ---------------------------------------------------------------- mixup, cutmix


def test_union_provenance_by_hand():
    a = torch.tensor([[0], [1], [2]])
    b = torch.tensor([[2], [1], [0]])
    union = union_provenance(a, b)
    assert [sorted(c for c in row if c >= 0) for row in union.tolist()] == [[0, 2], [1], [0, 2]]


def test_mixup_by_hand():
    batch = image_batch([0, 1, 2])
    permutation = torch.tensor([2, 0, 1])
    mixed = mixup_batch(batch, num_classes=3, weight=0.7, permutation=permutation)
    assert torch.allclose(mixed.inputs, 0.7 * batch.inputs + 0.3 * batch.inputs[permutation])
    assert torch.allclose(mixed.targets, torch.tensor([[0.7, 0, 0.3], [0.3, 0.7, 0], [0, 0.3, 0.7]]))
    assert [sorted(c for c in row if c >= 0) for row in mixed.provenance.tolist()] == [[0, 2], [0, 1], [1, 2]]
    assert torch.equal(mixed.sample_ids, batch.sample_ids)


def test_cutmix_by_hand():
    assert cutmix_box(8, 8, 0.75, (4, 4)) == (2, 6, 2, 6)  # side sqrt(0.25) * 8 = 4
    batch = image_batch([0, 1], size=8)
    permutation = torch.tensor([1, 0])
    mixed = cutmix_batch(batch, 2, 0.75, permutation, (4, 4))
    assert torch.equal(mixed.inputs[0, :, 2:6, 2:6], batch.inputs[1, :, 2:6, 2:6])
    assert torch.equal(mixed.inputs[0, :, :2], batch.inputs[0, :, :2])
    assert torch.allclose(mixed.targets, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    clipped = cutmix_batch(batch, 2, 0.75, permutation, (0, 0))  # box clipped to 2x2: kept 60/64
    assert torch.allclose(clipped.targets[0], torch.tensor([60 / 64, 4 / 64]))


def test_mixing_refuses_token_batches():
    tokens = Batch(inputs=torch.zeros(2, 4, dtype=torch.long), targets=torch.zeros(2, 4, dtype=torch.long),
                   sample_ids=torch.arange(2), provenance=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image batches"):
        mixup_batch(tokens, 3, 0.5, torch.tensor([1, 0]))


# ---------------------------------------------------------------- cutout, colout


def test_cutout_zeroes_one_square_of_the_given_side():
    x = torch.ones(50, 1, 16, 16)
    out = cutout_batch(x, num_holes=1, length=0.25, generator=torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 16 and (zeros <= 16).all() and (zeros > 0).all()  # 4x4, fewer where clipped
    for image in out[:, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4


def test_colout_drops_the_same_rows_and_columns_for_the_batch():
    x = torch.arange(2 * 10 * 10, dtype=torch.float).view(2, 1, 10, 10)
    out = colout_batch(x, p_row=0.3, p_col=0.2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 7, 8)
    rows = (out[0, 0, :, 0] // 10).long()
    cols = (out[0, 0, 0] % 10).long()
    assert torch.equal(out[0, 0], x[0, 0][rows][:, cols]) and torch.equal(out[1, 0], x[1, 0][rows][:, cols])
    assert (rows.diff() > 0).all() and (cols.diff() > 0).all()


# ---------------------------------------------------------------- augmentation ops


def test_image_ops_by_hand():
    x = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])
    level = torch.tensor([0.5])
    assert torch.allclose(solarize(x, level), torch.tensor([[[[0.2, 0.4], [0.4, 0.2]]]]))
    assert torch.allclose(autocontrast(x, level), torch.tensor([[[[0.0, 1 / 3], [2 / 3, 1.0]]]]))
    # posterize at level 0.5 keeps 2 bits: 8-bit values 51, 102, 153, 204 -> 0, 64, 128, 192
    assert torch.allclose(posterize(x, level), torch.tensor([[[[0.0, 64], [128, 192]]]]) / 255)
    # four distinct values: equalization spreads them evenly over [0, 1]
    assert torch.allclose(equalize(x, level), torch.tensor([[[[0.0, 1 / 3], [2 / 3, 1.0]]]]), atol=1 / 255)
    y = images(2, size=6)
    assert torch.allclose(rotate(y, torch.zeros(2)), y, atol=1e-6)
    shifted = translate_x(torch.eye(6).view(1, 1, 6, 6), torch.tensor([0.5]))  # a sixth of the width: 1 px
    assert torch.allclose(shifted[0, 0, :, :-1], torch.eye(6)[:, 1:], atol=1e-6)


def test_randaugment_and_augmix_stay_images_and_change_them():
    x = images(8, size=12)
    generator = torch.Generator().manual_seed(0)
    out = randaugment_batch(x, depth=2, severity=9, generator=generator)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    mixed = augmix_batch(x, severity=3, width=3, generator=generator)
    assert mixed.shape == x.shape and mixed.min() >= 0 and mixed.max() <= 1 and not torch.allclose(mixed, x)
    with pytest.raises(ValueError, match="augmentation_set"):
        randaugment_batch(x, augmentation_set="most")


# ---------------------------------------------------------------- progressive resizing


def test_progressive_resizing_schedule_by_hand():
    assert resizing_scale(0.1, 0.5, 0.4, 0.2) == 0.5
    assert resizing_scale(0.6, 0.5, 0.4, 0.2) == pytest.approx(0.75)
    assert resizing_scale(0.85, 0.5, 0.4, 0.2) == 1.0
    assert scaled_size(32, 0.6, 4) == 16 and scaled_size(32, 1.0, 4) == 32 and scaled_size(8, 0.1, 4) == 4
    x = images(2, size=32)
    assert resize_batch(x, 0.5).shape == (2, 1, 16, 16)
    crop = resize_batch(x, 0.5, mode="crop", generator=torch.Generator().manual_seed(0))
    assert crop.shape == (2, 1, 16, 16)
    found = [(i, j) for i in range(17) for j in range(17) if torch.equal(x[:, :, i:i + 16, j:j + 16], crop)]
    assert len(found) == 1


# ---------------------------------------------------------------- selective backprop


def test_selective_backprop_schedule_and_selection():
    assert not should_select(4, 0.3, start=0.5, end=0.9, interrupt=2)
    assert should_select(4, 0.6, 0.5, 0.9, 2) and not should_select(5, 0.6, 0.5, 0.9, 2)  # every 2nd batch: all rows
    assert not should_select(5, 0.95, 0.5, 0.9, 2)
    losses = torch.tensor([0.1, 5.0, 0.2, 3.0])
    assert torch.equal(select_by_loss(losses, 1.0), torch.arange(4))
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(400):
        chosen = select_by_loss(losses, 0.5, generator)
        assert chosen.numel() == 2 and (chosen.diff() > 0).all()
        counts[chosen] += 1
    # keep-probability follows the loss percentile: 5.0 > 3.0 > 0.2 > 0.1
    assert counts[1] > counts[3] > counts[2] > counts[0]


# ---------------------------------------------------------------- gradient clipping, SAM, SWA


def test_adaptive_clipping_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    w.grad = torch.tensor([[0.3, 0.4], [0.0, 0.001]])
    adaptive_clip_([w], clipping_threshold=0.01)
    # row 0: ||w|| = 5, max grad norm 0.05 < 0.5 -> scaled by 0.1; row 1: 0.001 <= 0.01 -> kept
    assert torch.allclose(w.grad, torch.tensor([[0.03, 0.04], [0.0, 0.001]]))
    v = nn.Parameter(torch.zeros(3))
    v.grad = torch.tensor([-2.0, 0.5, 3.0])
    apply_gradient_clipping([v], "value", 1.0)
    assert torch.equal(v.grad, torch.tensor([-1.0, 0.5, 1.0]))
    v.grad = torch.tensor([3.0, 4.0, 0.0])
    apply_gradient_clipping([v], "norm", 1.0)
    assert torch.allclose(v.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)


def test_sam_perturbation_by_hand():
    p = nn.Parameter(torch.tensor([1.0, 1.0]))
    q = nn.Parameter(torch.tensor([0.0]))
    p.grad, q.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    steps = sharpness_aware_perturbation([p, q], rho=0.5)
    assert torch.allclose(steps[0], torch.tensor([0.3, 0.0])) and torch.allclose(steps[1], torch.tensor([0.4]))
    assert torch.allclose(p.detach(), torch.tensor([1.3, 1.0])) and torch.allclose(q.detach(), torch.tensor([0.4]))


def test_running_average_is_the_mean_of_the_states():
    model = nn.Linear(2, 2)
    states, average, count = [], {}, 0
    for seed in range(3):
        torch.manual_seed(seed)
        nn.init.normal_(model.weight)
        states.append(model.weight.detach().clone())
        count = update_running_average(average, model, count)
    assert count == 3 and torch.allclose(average["weight"], torch.stack(states).mean(0), atol=1e-6)


def test_label_smoothing_composes_with_mixed_targets():
    from smalti.functional.label_smoothing import smooth_labels

    mixed = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(smooth_labels(mixed, 3, 0.3), torch.tensor([[0.59, 0.31, 0.1], [0.0, 0.0, 0.0]]))
