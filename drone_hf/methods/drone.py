"""DRONE (Chen et al., NeurIPS 2021): the closed-form optimum of `||W X - M X||` at rank `k`, and its bias-corrected
form on centred statistics."""

from __future__ import annotations

import torch

from ..factorize import DroneDecomposition, activation_slope, centred_scatter
from ..factorize_attention import attention_spectrum, drone_attention_factorize
from .base import AttentionFactors, FactorizationMethod, LinearDecomposition


def _require(stats, name: str) -> torch.Tensor:
    if stats is None:
        raise ValueError(
            f"method={name!r} is data-aware and needs statistics; collect them with "
            "`collect_activation_stats`, or pass method='svd'."
        )
    return stats


class _DroneLinear(LinearDecomposition):
    def __init__(self, weight, bias, moment, mean=None, psd_scale=None, output_weight=None):
        self._decomposition = DroneDecomposition(weight, moment, psd_scale=psd_scale, output_weight=output_weight)
        self._weight, self._bias, self._mean = weight, bias, mean
        self.energy = self._decomposition.sigma**2

    def factors(self, rank):
        down, up = self._decomposition.factors(rank)
        bias = self._bias
        if self._mean is not None and bias is not None:  # fold the optimal shift (W - M) mu into the bias
            residual = self._weight.double() - up.double() @ down.double()
            bias = bias + (residual @ self._mean).to(bias)
        return down, up, bias


class DroneMethod(FactorizationMethod):
    """The paper's form: DRONE on the uncentred second moment `C = X Xᵀ` (equals truncated SVD when `C = I`)."""

    name = "drone"
    data_aware = True
    description = "DRONE, the paper's closed form on the uncentred second moment"

    def decompose(self, weight, bias, stats):
        return _DroneLinear(weight, bias, _require(stats, self.name).double()[:-1, :-1])

    def factor_attention(self, tensors: AttentionFactors, stats, num_heads, rank):
        return drone_attention_factorize(*tensors, _require(stats, self.name), num_heads, rank)

    def attention_energy(self, tensors, stats, num_heads):
        return (attention_spectrum(*tensors, _require(stats, self.name).double(), num_heads) ** 2).sum(0)


class DroneBiasCorrectedMethod(DroneMethod):
    """DRONE on the centred statistics with the optimal bias shift `(W - M) mu` folded into each factored layer's
    bias; never worse on the calibration data than the paper's form. Attention blocks are already exact in their
    biases (homogeneous coordinates), so they are factored as by `"drone"`."""

    name = "drone-bc"
    description = "DRONE on centred statistics, bias-corrected"

    def decompose(self, weight, bias, stats):
        stats = _require(stats, self.name)
        if bias is None:  # no bias to carry the shift: the paper's form is the optimum
            return super().decompose(weight, bias, stats)
        moment, mean = centred_scatter(stats)
        # Judge the centred scatter's rounding on the scale of the uncentred moment it was computed from.
        scale = float(stats.double()[:-1, :-1].diagonal().abs().max()) * moment.shape[0]
        return _DroneLinear(weight, bias, moment, mean, psd_scale=scale)


class DroneActivationMethod(DroneMethod):
    """DRONE with the outputs of a linear that feeds an elementwise activation (the FFN's first linear, into GELU)
    weighted by the activation's root mean square slope there ([`activation_slope`]): an error where the unit is off
    barely reaches the next layer, so the rank is spent where the unit is on. Every other linear, and the attention
    blocks, are factored as by `"drone"` (docs/methods.md §1d)."""

    name = "drone-act"
    description = "DRONE, the FFN's first linear weighted by the activation's slope"
    activation_aware = True

    def decompose(self, weight, bias, stats, activation=None):
        stats = _require(stats, self.name)
        if activation is None:
            return super().decompose(weight, bias, stats)
        slope = activation_slope(weight, bias, stats, activation)
        if float(slope.max()) <= 0:  # the activation is flat everywhere the data goes: nothing to weight by
            return super().decompose(weight, bias, stats)
        return _DroneLinear(weight, bias, stats.double()[:-1, :-1], output_weight=slope)


__all__ = ["DroneActivationMethod", "DroneBiasCorrectedMethod", "DroneMethod"]
