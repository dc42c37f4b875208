"""Factorize (low-rank factorization of linear and conv layers, as in Composer) as pure functions.

A layer with weight W (out x in·k·k) becomes two: first a layer to ``rank``
channels, then a 1x1 / linear map back, with the factors taken from the
truncated SVD of W. That is the best rank-``rank`` approximation of the
original map, so outputs are preserved exactly when ``rank`` reaches the
smaller dimension and as closely as any rank-``rank`` map can otherwise.
"""

from __future__ import annotations

from collections import Counter
from typing import cast

import torch
from torch import nn


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first [rank, in], second [out, rank]) with second @ first the best rank-``rank`` approximation."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root[None, :]).to(weight.dtype)


class FactorizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.first = nn.Linear(linear.in_features, rank, bias=False)
        self.second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        first, second = svd_factors(linear.weight, rank)
        with torch.no_grad():
            self.first.weight.copy_(first)
            self.second.weight.copy_(second)
            if linear.bias is not None:
                self.second.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class FactorizedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("grouped convolutions are not factorized")
        # nn.Conv2d stores kernel_size, stride, padding and dilation as tuple[int, ...]; a Conv2d's are pairs
        kernel, stride, dilation = (cast("tuple[int, int]", t) for t in (conv.kernel_size, conv.stride, conv.dilation))
        self.first = nn.Conv2d(
            conv.in_channels,
            rank,
            kernel,
            stride,
            cast("tuple[int, int] | str", conv.padding),
            dilation,
            bias=False,
            padding_mode=conv.padding_mode,
        )
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)
        first, second = svd_factors(conv.weight.flatten(1), rank)
        with torch.no_grad():
            self.first.weight.copy_(first.view_as(self.first.weight))
            self.second.weight.copy_(second.view_as(self.second.weight))
            if conv.bias is not None:
                assert self.second.bias is not None  # made with bias=True just above
                self.second.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def factorized_rank(in_size: int, out_size: int, latent: float) -> int:
    """``latent`` below 1 is a fraction of the smaller side, else an absolute rank."""
    smaller = min(in_size, out_size)
    return max(1, min(smaller, int(latent * smaller) if latent < 1 else int(latent)))


def saves_compute(in_size: int, out_size: int, rank: int) -> bool:
    return rank * (in_size + out_size) < in_size * out_size


def apply_factorization(
    model: nn.Module,
    factorize_linears: bool = True,
    factorize_convs: bool = True,
    min_features: int = 256,
    min_channels: int = 256,
    latent_features: float = 0.25,
    latent_channels: float = 0.25,
) -> int:
    """Factorize every big-enough layer whose factorization saves multiply-adds; returns how many.

    Tied weights (a GPT's output head shares the embedding) are left alone.
    """
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    shared = {key for key, count in owners.items() if count > 1}
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, (FactorizedLinear, FactorizedConv2d)):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and factorize_linears and id(child.weight) not in shared:
                if min(child.in_features, child.out_features) < min_features:
                    continue
                rank = factorized_rank(child.in_features, child.out_features, latent_features)
                if saves_compute(child.in_features, child.out_features, rank):
                    setattr(parent, name, FactorizedLinear(child, rank))
                    count += 1
            elif isinstance(child, nn.Conv2d) and factorize_convs and child.groups == 1:
                fan_in = child.in_channels * child.kernel_size[0] * child.kernel_size[1]
                if min(child.in_channels, child.out_channels) < min_channels:
                    continue
                rank = factorized_rank(child.in_channels, child.out_channels, latent_channels)
                if saves_compute(fan_in, child.out_channels, rank) and rank < child.out_channels:
                    setattr(parent, name, FactorizedConv2d(child, rank))
                    count += 1
    return count
