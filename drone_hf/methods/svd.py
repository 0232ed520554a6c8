"""Plain truncated SVD of the weight: the data-free baseline every result is shown beside."""

from __future__ import annotations

import torch

from ..factorize import svd_factorize, svd_spectrum
from ..factorize_attention import attention_spectrum, svd_attention_factorize
from .base import AttentionFactors, FactorizationMethod, LinearDecomposition


class _SvdLinear(LinearDecomposition):
    def __init__(self, weight, bias):
        self._weight, self._bias = weight, bias
        self.energy = svd_spectrum(weight) ** 2

    def factors(self, rank):
        return (*svd_factorize(self._weight, rank), self._bias)


class SvdMethod(FactorizationMethod):
    """Truncated SVD of each weight (and of each head's `W_Q W_Kᵀ`); needs no data."""

    name = "svd"
    data_aware = False
    description = "truncated SVD of the weights (data-free)"

    def decompose(self, weight, bias, stats):
        return _SvdLinear(weight, bias)

    def factor_attention(self, tensors: AttentionFactors, stats, num_heads, rank):
        return svd_attention_factorize(*tensors, num_heads, rank)

    def attention_energy(self, tensors, stats, num_heads):
        identity = torch.eye(tensors[0].shape[1] + 1, dtype=torch.float64)
        return (attention_spectrum(*tensors, identity, num_heads) ** 2).sum(0)


__all__ = ["SvdMethod"]
