# Copyright 2025 The drone_hf Authors. Licensed under the Apache License, Version 2.0.
"""DRONE for the attention score product (docs/methods.md §1a): pure tensor math, no `nn.Module` walking.

Per head `h` the logit between tokens `x_q`, `x_k` is `x̃_qᵀ G̃ x̃_k` with homogeneous coordinates `x̃ = [x; 1]`,
`W̃ = [W, b]` (`d_h × (d+1)`) and `G̃ = W̃_Qᵀ W̃_K`. Working on `x̃` handles the biases exactly: the `b_Qᵀ W_K x_k`
term varies across keys and does not cancel in the softmax. Given `C̃ = X̃ X̃ᵀ = U S² Uᵀ`, the optimum of
`||X̃ᵀ (G̃ − M) X̃||_F` over rank-`k` `M` is `M* = U S⁻¹ [S Uᵀ G̃ U S]_k S⁻¹ Uᵀ`, stored as new query/key projections
`Ã_Q = U S⁻¹ P Σ^{1/2}` and `Ã_K = U S⁻¹ R Σ^{1/2}` with `[·]_k = P Σ Rᵀ`, so that `q'·k' = x̃_qᵀ M* x̃_k`. The
attention module keeps dividing by the original `√d_h`, so nothing here is rescaled by `√k`.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor


__all__ = [
    "attention_logit_error",
    "attention_spectrum",
    "drone_attention_factorize",
    "svd_attention_factorize",
]


def _check_qk(q_weight, q_bias, k_weight, k_bias, num_heads, prefix: str = "") -> tuple[Tensor, Tensor, int]:
    """Validates one query/key pair and returns per-head homogeneous weights `W̃` of shape `(H, d_h, d+1)`."""
    for name, w in ((f"{prefix}q_weight", q_weight), (f"{prefix}k_weight", k_weight)):
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"`{name}` must be a 2-D floating tensor (out_features, in_features); got {got}.")
    if q_weight.shape != k_weight.shape:
        raise ValueError(
            f"`{prefix}q_weight` and `{prefix}k_weight` must have the same shape; got {tuple(q_weight.shape)} and "
            f"{tuple(k_weight.shape)}."
        )
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"`num_heads` must be a positive int; got {num_heads!r}.")
    out_features = q_weight.shape[0]
    if out_features % num_heads != 0:
        raise ValueError(
            f"`{prefix}q_weight` has out_features={out_features}, which is not divisible by `num_heads`={num_heads}."
        )
    tilde = []
    for name, w, b in ((f"{prefix}q", q_weight, q_bias), (f"{prefix}k", k_weight, k_bias)):
        if b is None:  # an nn.Linear without bias is the b = 0 case of the homogeneous form
            b = w.new_zeros(out_features)
        if not isinstance(b, Tensor) or tuple(b.shape) != (out_features,):
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"`{name}_bias` must be None or a tensor of shape ({out_features},); got {got}.")
        b = b.detach().to(device=w.device, dtype=torch.float64)
        w_tilde = torch.cat([w.detach().to(torch.float64), b[:, None]], dim=1)
        if not torch.isfinite(w_tilde).all():
            raise ValueError(f"`{name}_weight` / `{name}_bias` contain NaN or Inf values.")
        tilde.append(w_tilde.reshape(num_heads, out_features // num_heads, -1))
    return tilde[0], tilde[1], out_features // num_heads


def _whitening(stats, in_features: int, rtol: float, device) -> tuple[Tensor, Tensor]:
    """Returns `U S` and `U S⁻¹` (each `(d+1) × r`) from `C̃ = U S² Uᵀ`, keeping eigenvalues above `rtol · λ_max`."""
    if not isinstance(stats, Tensor) or not stats.is_floating_point():
        raise ValueError(f"`stats` must be a floating tensor; got {type(stats).__name__}.")
    expected = (in_features + 1, in_features + 1)
    if tuple(stats.shape) != expected:
        raise ValueError(
            f"`stats` has shape {tuple(stats.shape)} but the weights need {expected} (in_features + 1 for the "
            "homogeneous coordinate); were the stats computed on another model or another layer?"
        )
    if not torch.isfinite(stats).all():
        raise ValueError("`stats` contains NaN or Inf values; recollect the calibration statistics.")
    if not isinstance(rtol, (int, float)) or not 0.0 < rtol < 1.0:
        raise ValueError(f"`rtol` must be a float in (0, 1); got {rtol!r}.")
    c = stats.detach().to(device=device, dtype=torch.float64)
    # Accumulated sums are symmetric only up to rounding; eigh reads one triangle, so symmetrise explicitly.
    eigvals, eigvecs = torch.linalg.eigh((c + c.T) / 2)
    lam_max = eigvals[-1].item()
    if lam_max <= 0.0:
        raise ValueError("`stats` has no positive eigenvalue: it was accumulated over zero calibration tokens.")
    # Rounding makes a PSD sum slightly indefinite (~1e-16 relative); anything far below zero is not X̃X̃ᵀ at all.
    if eigvals[0].item() < -1e-6 * lam_max:
        raise ValueError(
            f"`stats` is not positive semi-definite (eigenvalue {eigvals[0].item():.3g} vs max {lam_max:.3g}); "
            "expected a sum of x̃ x̃ᵀ."
        )
    # Thresholding is the pseudo-inverse: directions the data never visits are dropped rather than divided by ~0.
    keep = eigvals > rtol * lam_max
    s = eigvals[keep].sqrt()
    u = eigvecs[:, keep]
    return u * s, u / s


def _core_svd(wq_t: Tensor, wk_t: Tensor, us: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD `P Σ Rᵀ` of `S Uᵀ G̃ U S = Aᵀ B` per head, with `A = W̃_Q U S`, `B = W̃_K U S` (each `H × d_h × r`).

    `Aᵀ B` is `r × r` but has rank ≤ `d_h`; QR of `Aᵀ` and `Bᵀ` reduces the SVD to a `min(r, d_h)` square core,
    which is both cheaper (769 → 64 on BERT-base) and avoids computing a spectrum of exact zeros.
    """
    q_a, r_a = torch.linalg.qr((wq_t @ us).transpose(-1, -2))
    q_b, r_b = torch.linalg.qr((wk_t @ us).transpose(-1, -2))
    p, sigma, rh = torch.linalg.svd(r_a @ r_b.transpose(-1, -2))
    return q_a @ p, sigma, q_b @ rh.transpose(-1, -2)


def _check_rank(rank, head_dim: int) -> int:
    try:
        value = operator.index(rank) if not isinstance(rank, bool) else None
    except TypeError:
        value = None
    if value is None or not 0 < value <= head_dim:
        raise ValueError(f"`rank` must be an int with 0 < rank <= head_dim={head_dim}; got {rank!r}.")
    return value


def _to_projections(us_inv: Tensor, p: Tensor, sigma: Tensor, r: Tensor, rank: int, dtype) -> tuple[Tensor, ...]:
    """Builds `Ã = U S⁻¹ P_k Σ_k^{1/2}` for query and key and splits each into an nn.Linear weight and bias."""
    num_heads, kept = sigma.shape
    k = min(rank, kept)
    # Balanced split of Σ keeps the query and key factors on the same scale (both ~ √σ), which matters in fp16.
    root = sigma[:, :k].sqrt()[:, None, :]
    out = []
    for factor in (p, r):
        a = us_inv @ (factor[:, :, :k] * root)  # (H, d+1, k)
        if k < rank:  # calibration span narrower than the requested width: the extra q/k dims are exactly zero
            a = torch.cat([a, a.new_zeros(num_heads, a.shape[1], rank - k)], dim=-1)
        weight = a[:, :-1, :].transpose(-1, -2).reshape(num_heads * rank, -1)
        bias = a[:, -1, :].reshape(num_heads * rank)
        out += [weight.to(dtype).contiguous(), bias.to(dtype).contiguous()]
    return tuple(out)


def drone_attention_factorize(
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    stats: Tensor,
    num_heads: int,
    rank: int,
    *,
    rtol: float = 1e-10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Data-aware (DRONE) low-rank factorisation of every head's query-key bilinear form.

    Args:
        q_weight (`torch.Tensor`): `query` weight, shape `(num_heads * d_h, d)`.
        q_bias (`torch.Tensor` or `None`): `query` bias, shape `(num_heads * d_h,)`; `None` means zero.
        k_weight (`torch.Tensor`): `key` weight, same shape as `q_weight`.
        k_bias (`torch.Tensor` or `None`): `key` bias, shape `(num_heads * d_h,)`; `None` means zero.
        stats (`torch.Tensor`): `(d+1, d+1)` sum of `x̃ x̃ᵀ` over calibration tokens, `x̃ = [x; 1]` (float64).
        num_heads (`int`): number of attention heads.
        rank (`int`): new per-head query/key width `k`, `0 < k <= d_h`.
        rtol (`float`, *optional*, defaults to `1e-10`): eigenvalues of `stats` below `rtol · λ_max` are dropped.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]`: `(q_weight', q_bias', k_weight', k_bias')`
        of shapes `(num_heads * rank, d)` and `(num_heads * rank,)` in `q_weight`'s dtype; head `h` occupies rows
        `h * rank:(h + 1) * rank`. The biases are always tensors (the optimum generally has one). Keep the
        attention scale at the original `1 / √d_h`.

    Raises:
        ValueError: on inconsistent shapes, a `rank` outside `(0, d_h]`, `stats` of the wrong shape (another
            model), NaN/Inf, or non-PSD `stats`.

    Example:

    ```py
    >>> import torch
    >>> from drone_hf.factorize_attention import drone_attention_factorize
    >>> x = torch.randn(50, 8, dtype=torch.float64)
    >>> xt = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    >>> wq, wk, bq, bk = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8), torch.randn(8)
    >>> qw, qb, kw, kb = drone_attention_factorize(wq, bq, wk, bk, xt.T @ xt, num_heads=2, rank=3)
    >>> tuple(qw.shape), tuple(qb.shape), qw.dtype
    ((6, 8), (6,), torch.float32)

    ```
    """
    wq_t, wk_t, head_dim = _check_qk(q_weight, q_bias, k_weight, k_bias, num_heads)
    rank = _check_rank(rank, head_dim)
    us, us_inv = _whitening(stats, q_weight.shape[1], rtol, q_weight.device)
    p, sigma, r = _core_svd(wq_t, wk_t, us)
    return _to_projections(us_inv, p, sigma, r, rank, q_weight.dtype)


def svd_attention_factorize(
    q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor, k_bias: Tensor | None, num_heads: int, rank: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Data-free baseline: truncated SVD of every head's homogeneous `G̃ = W̃_Qᵀ W̃_K` (DRONE with `C̃ = I`).

    Args:
        q_weight, q_bias, k_weight, k_bias, num_heads, rank: as in [`drone_attention_factorize`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]`: same layout as
        [`drone_attention_factorize`].

    Raises:
        ValueError: on inconsistent shapes or a `rank` outside `(0, d_h]`.

    Example:

    ```py
    >>> import torch
    >>> from drone_hf.factorize_attention import svd_attention_factorize
    >>> qw, qb, kw, kb = svd_attention_factorize(torch.randn(8, 6), None, torch.randn(8, 6), None, 2, 2)
    >>> tuple(kw.shape), tuple(kb.shape)
    ((4, 6), (4,))

    ```
    """
    wq_t, wk_t, head_dim = _check_qk(q_weight, q_bias, k_weight, k_bias, num_heads)
    rank = _check_rank(rank, head_dim)
    eye = torch.eye(q_weight.shape[1] + 1, dtype=torch.float64, device=q_weight.device)
    p, sigma, r = _core_svd(wq_t, wk_t, eye)
    return _to_projections(eye, p, sigma, r, rank, q_weight.dtype)


def attention_logit_error(
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    new_q_weight: Tensor,
    new_q_bias: Tensor | None,
    new_k_weight: Tensor,
    new_k_bias: Tensor | None,
    stats: Tensor,
    num_heads: int,
) -> Tensor:
    """Per-head data-weighted logit error `||X̃ᵀ (G̃ − M) X̃||_F²`, computed from `stats` alone.

    Args:
        q_weight, q_bias, k_weight, k_bias: the original projections (see [`drone_attention_factorize`]).
        new_q_weight, new_q_bias, new_k_weight, new_k_bias: the factored projections, `(num_heads * k, d)`.
        stats (`torch.Tensor`): `(d+1, d+1)` calibration statistics.
        num_heads (`int`): number of attention heads.

    Returns:
        `torch.Tensor`: float64 of shape `(num_heads,)`, the un-normalised (sum over token pairs) squared error of
        the logits before the `1/√d_h` scale.

    Raises:
        ValueError: on inconsistent shapes or invalid `stats`.

    Example:

    ```py
    >>> import torch
    >>> from drone_hf.factorize_attention import attention_logit_error, drone_attention_factorize
    >>> xt = torch.cat([torch.randn(40, 6, dtype=torch.float64), torch.ones(40, 1, dtype=torch.float64)], dim=1)
    >>> w = [torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)] * 2
    >>> new = drone_attention_factorize(*w, xt.T @ xt, num_heads=2, rank=4)
    >>> bool(attention_logit_error(*w, *new, xt.T @ xt, num_heads=2).max() < 1e-12)
    True

    ```
    """
    wq_t, wk_t, _ = _check_qk(q_weight, q_bias, k_weight, k_bias, num_heads)
    nq_t, nk_t, _ = _check_qk(new_q_weight, new_q_bias, new_k_weight, new_k_bias, num_heads, prefix="new_")
    if new_q_weight.shape[1] != q_weight.shape[1]:
        raise ValueError(
            f"`new_q_weight` has in_features={new_q_weight.shape[1]} but `q_weight` has {q_weight.shape[1]}."
        )
    # Keep every eigen-direction (tiny rtol): this is a measurement, and a sum of squares of S Uᵀ(G̃−M)U S is
    # non-negative by construction, unlike trace(C̃ E C̃ Eᵀ) which can cancel to a small negative number.
    us, _ = _whitening(stats, q_weight.shape[1], 1e-300, q_weight.device)
    diff = (wq_t @ us).transpose(-1, -2) @ (wk_t @ us) - (nq_t @ us).transpose(-1, -2) @ (nk_t @ us)
    return diff.square().sum(dim=(-2, -1))


def attention_spectrum(
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    stats: Tensor,
    num_heads: int,
    *,
    rtol: float = 1e-10,
) -> Tensor:
    """Per-head singular values of the whitened bilinear form `S Uᵀ G̃ U S`, in descending order.

    The optimal error at rank `k` (see [`attention_logit_error`]) is the sum of squares of the values past `k`,
    which makes this the input for rank allocation.

    Args:
        q_weight, q_bias, k_weight, k_bias, stats, num_heads, rtol: as in [`drone_attention_factorize`].

    Returns:
        `torch.Tensor`: float64 of shape `(num_heads, min(d_h, r))`, `r` the numerical rank of `stats`.

    Raises:
        ValueError: on inconsistent shapes or invalid `stats`.

    Example:

    ```py
    >>> import torch
    >>> from drone_hf.factorize_attention import attention_spectrum
    >>> stats = torch.eye(7, dtype=torch.float64)
    >>> attention_spectrum(torch.randn(8, 6), None, torch.randn(8, 6), None, stats, num_heads=2).shape
    torch.Size([2, 4])

    ```
    """
    wq_t, wk_t, _ = _check_qk(q_weight, q_bias, k_weight, k_bias, num_heads)
    us, _ = _whitening(stats, q_weight.shape[1], rtol, q_weight.device)
    return _core_svd(wq_t, wk_t, us)[1]
