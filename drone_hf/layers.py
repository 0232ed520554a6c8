"""Factored replacement for `nn.Linear`.

This file is copied next to the weights for the Hub remote-code path, so it imports nothing from drone_hf.
"""

from __future__ import annotations

import torch
from torch import nn


class DroneLinear(nn.Module):
    r"""
    A rank-`k` factored linear layer, `y = up(down(x)) = U (V x) + b`, replacing an `nn.Linear(in, out)`.

    It costs `rank * (in_features + out_features)` multiply-adds per token instead of `in_features * out_features`.
    Persisted tensors (see the README's "Checkpoint format"): `down.weight` (`rank x in`), `up.weight`
    (`out x rank`) and `up.bias` (`out`, only if the original layer had a bias).

    Args:
        in_features (`int`): Size of each input sample.
        out_features (`int`): Size of each output sample.
        rank (`int`): Inner dimension of the factorisation.
        bias (`bool`, *optional*, defaults to `True`): Whether `up` carries the original layer's bias.
        device, dtype: Passed to the two inner `nn.Linear` modules.

    Example:

    ```py
    >>> import torch
    >>> from drone_hf import DroneLinear
    >>> dense = torch.nn.Linear(16, 12)
    >>> layer = DroneLinear.from_linear(dense, rank=12)  # full rank: same function
    >>> torch.allclose(layer(torch.ones(2, 16)), dense(torch.ones(2, 16)), atol=1e-5)
    True
    ```
    """

    drone_layer_names = ("down", "up")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"`rank` must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} "
                f"layer, got {rank}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(hidden_states))

    @classmethod
    def from_factors(cls, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None) -> DroneLinear:
        """Builds the layer from `down` (`rank x in`), `up` (`out x rank`) and an optional `bias` (`out`)."""
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(
                f"`down` must be (rank, in) and `up` (out, rank) with the same rank, got {tuple(down.shape)} and "
                f"{tuple(up.shape)}."
            )
        if bias is not None and bias.shape != (up.shape[0],):
            raise ValueError(f"`bias` must have shape ({up.shape[0]},), got {tuple(bias.shape)}.")
        layer = cls(down.shape[1], up.shape[0], down.shape[0], bias=bias is not None, device="meta", dtype=up.dtype)
        layer.down.weight = nn.Parameter(down.detach().clone())
        layer.up.weight = nn.Parameter(up.detach().clone())
        if bias is not None:
            layer.up.bias = nn.Parameter(bias.detach().clone())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> DroneLinear:
        """Factors `linear` by plain truncated SVD (the data-free baseline) with a balanced split of the spectrum."""
        weight = linear.weight.detach().double()
        left, sigma, right_t = torch.linalg.svd(weight, full_matrices=False)
        root = sigma[:rank].sqrt()
        down = (root[:, None] * right_t[:rank]).to(linear.weight.dtype)
        up = (left[:, :rank] * root[None, :]).to(linear.weight.dtype)
        return cls.from_factors(down, up, None if linear.bias is None else linear.bias.detach())

    def to_dense(self) -> nn.Linear:
        """Returns the equivalent `nn.Linear` with weight `up.weight @ down.weight`."""
        weight = self.up.weight @ self.down.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach().clone())
        if self.up.bias is not None:
            linear.bias = nn.Parameter(self.up.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


__all__ = ["DroneLinear"]
