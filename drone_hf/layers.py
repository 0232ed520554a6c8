"""The module kinds of a compressed model: a factored `nn.Linear` and a per-head narrowed query/key projection.

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

    @torch.no_grad()
    def balance_(self) -> DroneLinear:
        """Rescales each rank component in place so that its row of `down` and its column of `up` have the same
        norm; `up @ down` is unchanged (to rounding). DRONE's factors carry the input's scale in `up` and its inverse
        in `down` (entries up to ~100 against ~0.1 in a base-size FFN), so an optimiser step of about `lr` per entry
        (Adam) moves `down` a thousand times more, relative to its size, than `up`; balanced factors train like
        SVD's. Components with a zero factor are left alone."""
        down, up = self.down.weight, self.up.weight
        down_norms, up_norms = down.double().norm(dim=1), up.double().norm(dim=0)
        usable = (down_norms > 0) & (up_norms > 0)
        scale = torch.where(usable, (up_norms / down_norms.clamp_min(1e-300)).sqrt(), torch.ones_like(up_norms))
        down.copy_((down.double() * scale[:, None]).to(down.dtype))
        up.copy_((up.double() / scale[None, :]).to(up.dtype))
        return self

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


def balance_factor_pairs_(model: nn.Module) -> nn.Module:
    """[`DroneLinear.balance_`] on every factored linear of `model`, in place (the same function); the step both
    distillation paths take before their optimiser exists. Returns `model`."""
    for module in model.modules():
        if isinstance(module, DroneLinear):
            module.balance_()
    return model


class DroneQKLinear(nn.Module):
    r"""
    The query (or key) projection of a DRONE-factored attention block: `num_heads * rank` outputs, each head's `rank`
    coordinates zero-padded back to `head_size`.

    Per head, the logits `q_h · k_h` of two such projections equal those of the narrow `rank`-wide vectors, which are
    the DRONE optimum of the bilinear form `W_Q^h W_K^h^T` under the data (drone_hf's docs/methods.md §1a). Because the
    padded output has the dense projection's width, the family's own attention module (its scaling by the **original**
    `1/sqrt(d_h)`, position biases, masks and fused SDPA kernel) runs unchanged around it, for every family whose
    scores are per-head dot products of separate query and key projections. The saving is in the projection
    (`rank / head_size` of its multiply-adds).

    Persisted tensors: `weight` (`num_heads * rank x in`) and `bias` (`num_heads * rank`), the layout of format
    version 1's narrowed `query`/`key`.

    Args:
        in_features (`int`): Size of each input sample.
        num_heads (`int`): Number of attention heads.
        head_size (`int`): Dense per-head width `d_h`.
        rank (`int`): Per-head query/key width, `1 <= rank < head_size`.
        bias (`bool`, *optional*, defaults to `True`): Whether the projection has a bias.
        device, dtype: Of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_size: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < head_size:
            raise ValueError(
                f"`rank` must be an int in [1, {head_size - 1}] (the head size is {head_size}), got {rank!r}."
            )
        self.in_features, self.num_heads, self.head_size, self.rank = in_features, num_heads, head_size, rank
        self.out_features = num_heads * head_size
        self.weight = nn.Parameter(torch.empty(num_heads * rank, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_heads * rank, device=device, dtype=dtype)) if bias else None
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        narrow = nn.functional.linear(hidden_states, self.weight, self.bias)
        narrow = narrow.view(*narrow.shape[:-1], self.num_heads, self.rank)
        return nn.functional.pad(narrow, (0, self.head_size - self.rank)).flatten(-2)

    @classmethod
    def from_factors(cls, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, head_size: int):
        """Builds the projection from its narrow `weight` (`num_heads * rank x in`) and `bias`."""
        if weight.dim() != 2 or weight.shape[0] % num_heads:
            raise ValueError(
                f"`weight` must be (num_heads * rank, in) with num_heads={num_heads}, got {tuple(weight.shape)}."
            )
        layer = cls(
            weight.shape[1],
            num_heads,
            head_size,
            weight.shape[0] // num_heads,
            bias=bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        layer.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_heads={self.num_heads}, head_size={self.head_size}, rank={self.rank}"
        )


__all__ = ["DroneLinear", "DroneQKLinear"]
