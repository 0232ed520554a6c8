"""Pure tensor math for DRONE (Chen et al., NeurIPS 2021, Theorem 1) and the plain-SVD baseline.

No module walking here: every function takes and returns tensors. All solvers work in float64 and return factors in
the weight's dtype.
"""

from __future__ import annotations

import torch


DEFAULT_RTOL = 1e-10
_PSD_RTOL = 1e-6  # the same tolerance as the attention solver's check
_MIN_OUTPUT_WEIGHT = 1e-6


def _check_rank(rank: int, weight: torch.Tensor) -> None:
    limit = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit:
        raise ValueError(f"`rank` must be an int in [1, {limit}] for a {tuple(weight.shape)} weight, got {rank!r}.")


def _check_second_moment(second_moment: torch.Tensor, weight: torch.Tensor) -> None:
    in_features = weight.shape[1]
    if second_moment.shape != (in_features, in_features):
        raise ValueError(
            f"`second_moment` must be ({in_features}, {in_features}) for a weight with {in_features} inputs, got "
            f"{tuple(second_moment.shape)}: were the statistics computed on another model?"
        )
    if not torch.isfinite(second_moment).all():
        raise ValueError("`second_moment` contains NaN or Inf.")


def whiten(
    second_moment: torch.Tensor, *, rtol: float = DEFAULT_RTOL, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposes `C = U S^2 U^T` and keeps the pairs above `rtol * max eigenvalue` (a pseudo-inverse).

    Returns:
        `(U, s)`: `U` (`in x r`) with orthonormal columns and `s` (`r`) the square roots of the kept eigenvalues.
        Rank-deficient `C` (fewer tokens than dimensions) simply gives `r < in`; an all-zero `C` gives `r = 0`.

    Raises:
        `ValueError`: if `C` has an eigenvalue below `-1e-6` times its largest magnitude, or times `scale` when that
            is larger (a centred scatter is judged on the scale of the uncentred moment it came from): `C` is then not
            positive semi-definite.
    """
    eigvals, eigvecs = torch.linalg.eigh(second_moment.double())
    top = eigvals.max().clamp_min(0.0)
    # Rounding makes a PSD sum slightly indefinite (~1e-16 relative); anything far below zero is not X X^T at all, and
    # thresholding would silently drop those directions (a negated moment would leave the layer only its bias).
    if float(eigvals.min()) < -_PSD_RTOL * max(float(eigvals.abs().max()), scale or 0.0):
        raise ValueError(
            f"The second moment is not positive semi-definite (eigenvalues from {float(eigvals.min()):.3g} to "
            f"{float(eigvals.max()):.3g}): it is not a sum of x x^T over calibration tokens; collect the statistics "
            "again with collect_activation_stats."
        )
    keep = eigvals > rtol * top if top > 0 else torch.zeros_like(eigvals, dtype=torch.bool)
    return eigvecs[:, keep], eigvals[keep].sqrt()


def _balanced_split(left, sigma, right_t, rank):
    # Pad with zero directions when the data span is smaller than the rank asked for.
    kept = min(rank, sigma.shape[0])
    root = sigma[:kept].sqrt()
    down = torch.zeros(rank, right_t.shape[1], dtype=torch.float64, device=sigma.device)
    up = torch.zeros(left.shape[0], rank, dtype=torch.float64, device=sigma.device)
    down[:kept] = root[:, None] * right_t[:kept]
    up[:, :kept] = left[:, :kept] * root[None, :]
    return down, up


class DroneDecomposition:
    """The rank-independent part of DRONE for one layer (`C = U S^2 U^T` and the SVD of `Z = W U S`), so that the
    factors at many ranks cost one eigendecomposition and one SVD. See [`drone_factorize`].

    With `output_weight` `g` (`out`, positive) it solves the output-weighted problem `min ||G (W X - M X)||_F`,
    `G = diag(g)`: `Z = G W U S`, and the optimum is `M = G^{-1} Z_k S^{-1} U^T` (the closed form of DRONE for
    `G W`, mapped back). Used to weight each output by how much an error in it matters downstream
    ([`activation_slope`])."""

    def __init__(
        self,
        weight: torch.Tensor,
        second_moment: torch.Tensor,
        *,
        rtol: float = DEFAULT_RTOL,
        psd_scale: float | None = None,
        output_weight: torch.Tensor | None = None,
    ):
        _check_second_moment(second_moment, weight)
        basis, scale = whiten(second_moment, rtol=rtol, scale=psd_scale)
        self.weight_shape, self.dtype = tuple(weight.shape), weight.dtype
        target = weight.double()
        self._output_weight = None
        if output_weight is not None:
            self._output_weight = _check_output_weight(output_weight, weight).to(target.device)
            target = self._output_weight[:, None] * target  # Z = G W U S
        self.left, self.sigma, right_t = torch.linalg.svd(target @ (basis * scale), full_matrices=False)
        self._right_t, self._basis = right_t / scale, basis

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(down, up)` at `rank`, in the weight's dtype."""
        limit = min(self.weight_shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit:
            raise ValueError(f"`rank` must be an int in [1, {limit}] for a {self.weight_shape} weight, got {rank!r}.")
        down, up = _balanced_split(self.left, self.sigma, self._right_t, rank)
        if self._output_weight is not None:  # M = G^{-1} (G W)_k
            up = up / self._output_weight[:, None]
        return (down @ self._basis.T).to(self.dtype), up.to(self.dtype)

    def error(self, rank: int) -> float:
        """The data-weighted error `trace(G (W-M) C (W-M)^T G)` at `rank` (`G = I` without `output_weight`): the
        discarded `sigma^2` of `Z`."""
        return float((self.sigma[rank:] ** 2).sum())


def _check_output_weight(output_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if output_weight.shape != (weight.shape[0],):
        raise ValueError(
            f"`output_weight` must have one entry per output ({weight.shape[0]},), got {tuple(output_weight.shape)}."
        )
    g = output_weight.double()
    if not torch.isfinite(g).all() or bool((g < 0).any()) or float(g.max()) <= 0:
        raise ValueError("`output_weight` must be finite, non-negative and not all zero.")
    # An output whose weight is 0 is free to be anything; keep it finite (and still last in line for the rank).
    return g.clamp_min(_MIN_OUTPUT_WEIGHT * float(g.max()))


def _hermite_rule(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Gauss-Hermite for the standard normal (Golub-Welsch): nodes are the eigenvalues of the Jacobi matrix with
    # off-diagonal sqrt(1..n-1); the weights the squared first components of its eigenvectors.
    off = torch.arange(1, nodes, dtype=torch.float64).sqrt()
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    points, vectors = torch.linalg.eigh(jacobi)
    return points, vectors[0] ** 2


def activation_slope(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    activation,
    *,
    nodes: int = 48,
) -> torch.Tensor:
    r"""
    The root mean square slope `sqrt(E[f'(z_j)^2])` of an elementwise activation `f` at each output `z = W x + b` of
    a linear, with `z_j` modelled as Gaussian with the mean and variance the input statistics give it.

    To first order an error `e_j` in `z_j` reaches the next layer as `f'(z_j) e_j`, so these are the output weights
    `g` of [`DroneDecomposition`] for a linear that feeds `f` (a BERT-style FFN's first linear feeds GELU, whose
    slope is near 0 wherever the unit is off). `E` is taken by Gauss-Hermite quadrature under `N(mu_j, s_j^2)`, with
    `mu_j = w_j^T m + b_j` and `s_j^2 = w_j^T Cov(x) w_j` from the augmented statistic; `f'` by autograd, so any
    elementwise `f` works.

    Args:
        weight (`torch.Tensor`): `out x in` weight.
        bias (`torch.Tensor`, *optional*): `out` bias.
        stats (`torch.Tensor`): `(in+1) x (in+1)` augmented statistic from [`collect_activation_stats`].
        activation (`Callable[[Tensor], Tensor]`): The elementwise activation applied to the layer's output.
        nodes (`int`, *optional*, defaults to 48): Quadrature points.

    Returns:
        `torch.Tensor`: `out` float64 slopes (non-negative).
    """
    size = weight.shape[1] + 1
    if stats.shape != (size, size):
        raise ValueError(f"`stats` must be ({size}, {size}) for this weight, got {tuple(stats.shape)}.")
    w = weight.double()
    scatter, mean_x = centred_scatter(stats.to(w.device))  # raises for a statistic of 0 tokens
    mean = w @ mean_x + (0.0 if bias is None else bias.double())
    std = (((w @ scatter) * w).sum(1) / float(stats[-1, -1])).clamp_min(0.0).sqrt()  # w^T Cov(x) w
    points, probabilities = (t.to(w.device) for t in _hermite_rule(nodes))
    with torch.enable_grad():
        z = (mean[:, None] + std[:, None] * points[None, :]).requires_grad_(True)
        (slope,) = torch.autograd.grad(activation(z).sum(), z)
    return ((slope.detach() ** 2) @ probabilities).clamp_min(0.0).sqrt()


def drone_factorize(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    rank: int,
    *,
    rtol: float = DEFAULT_RTOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Closed-form optimal rank-`k` factorisation of `W` under the data: minimises `||W X - M X||_F` over rank-`k` `M`.

    With `C = X X^T = U S^2 U^T`, `Z = W U S` and its truncated SVD `Z_k = P_k Sigma_k Q_k^T`, the optimum is
    `M = Z_k S^{-1} U^T`, stored as `down = Sigma_k^{1/2} Q_k^T S^{-1} U^T` and `up = P_k Sigma_k^{1/2}`. Its
    data-weighted error `trace((W-M) C (W-M)^T)` is the sum of the discarded `sigma^2` of `Z`. With `C = I` this is
    truncated SVD of `W`.

    Args:
        weight (`torch.Tensor`): `out x in` weight.
        second_moment (`torch.Tensor`): `in x in` uncentred second moment of the inputs (any positive scale).
        rank (`int`): Target rank, `1 <= rank <= min(out, in)`.
        rtol (`float`, *optional*, defaults to `1e-10`): Relative eigenvalue cut-off of the pseudo-inverse.

    Returns:
        `tuple[Tensor, Tensor]`: `down` (`rank x in`) and `up` (`out x rank`) in the dtype of `weight`.

    Example:

    ```py
    >>> import torch
    >>> w, x = torch.randn(6, 5), torch.randn(5, 40)
    >>> down, up = drone_factorize(w, x @ x.T, rank=2)
    >>> down.shape, up.shape
    (torch.Size([2, 5]), torch.Size([6, 2]))
    ```
    """
    _check_rank(rank, weight)
    return DroneDecomposition(weight, second_moment, rtol=rtol).factors(rank)


def centred_scatter(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(C - n mu mu^T, mu)` from an augmented statistic (see [`collect_activation_stats`])."""
    stats = stats.double()
    count = stats[-1, -1]
    if count <= 0:
        raise ValueError("`stats` was accumulated over 0 tokens.")
    mean = stats[:-1, -1] / count
    return stats[:-1, :-1] - count * torch.outer(mean, mean), mean


def drone_factorize_affine(
    weight: torch.Tensor, stats: torch.Tensor, rank: int, *, rtol: float = DEFAULT_RTOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    DRONE with bias correction: the optimal rank-`k` `M` *and* bias shift for `||(W X + b) - (M X + b')||_F`.

    For a fixed `M` the best bias is `b' = b + (W - M) mu` (`mu` the mean input), which turns the objective into
    DRONE on the centred scatter `C - n mu mu^T`. Its error is never above the uncentred optimum's (that one pays
    `n ||(W - M) mu||^2` more): the mean direction no longer costs a rank.

    Args:
        weight (`torch.Tensor`): `out x in` weight.
        stats (`torch.Tensor`): `(in+1) x (in+1)` augmented statistic from [`collect_activation_stats`].
        rank (`int`): Target rank.

    Returns:
        `tuple[Tensor, Tensor, Tensor]`: `down`, `up` and `bias_shift = (W - M) mu` (add it to the layer's bias).
    """
    _check_rank(rank, weight)
    if stats.shape != (weight.shape[1] + 1, weight.shape[1] + 1):
        raise ValueError(
            f"`stats` must be ({weight.shape[1] + 1}, {weight.shape[1] + 1}) for this weight, "
            f"got {tuple(stats.shape)}."
        )
    centred, mean = centred_scatter(stats)
    scale = float(stats.double()[:-1, :-1].diagonal().abs().max()) * centred.shape[0]
    down, up = DroneDecomposition(weight, centred, rtol=rtol, psd_scale=scale).factors(rank)
    shift = (weight.double() - up.double() @ down.double()) @ mean
    return down, up, shift.to(weight.dtype)


def drone_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cross: torch.Tensor,
    stats: torch.Tensor,
    rank: int | None,
    *,
    rtol: float = DEFAULT_RTOL,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    r"""
    Sequential (error-compensating) DRONE: the layer's dense output on the dense model's inputs `X`, reproduced from
    the inputs `X~` the *compressed* model feeds it. Minimises `||(W X + b) - (M X~ + b')||_F` over rank-`k` `M` and
    any bias `b'`, for paired columns of `X` and `X~` (the same tokens through the dense and the compressed model).

    With the centred scatter `C~ = X~c X~c^T = U S^2 U^T` and cross moment `K = Xc X~c^T`, the optimum is `M = B_k
    S^{-1} U^T` with `B = W K U S^{-1}` and `B_k` its truncated SVD, and `b' = b + W mu - M mu~`. When `X~ = X` this
    is [`drone_factorize_affine`] (DRONE with bias correction); with `rank=None` it is the least-squares full-rank
    layer.

    Args:
        weight (`torch.Tensor`): `out x in` dense weight.
        bias (`torch.Tensor`, *optional*): `out` dense bias.
        cross (`torch.Tensor`): `(in+1) x (in+1)` sum over tokens of `[x; 1] [x~; 1]^T`.
        stats (`torch.Tensor`): `(in+1) x (in+1)` sum over tokens of `[x~; 1] [x~; 1]^T`.
        rank (`int`, *optional*): Target rank; `None` for an unconstrained (full-rank) refit.

    Returns:
        `tuple[Tensor, Tensor | None, Tensor]`: `down` (`rank x in`) and `up` (`out x rank`), or, when `rank` is
        `None`, the full `out x in` weight and `None`; then the new bias; in the weight's dtype.
    """
    size = weight.shape[1] + 1
    for name, value in (("cross", cross), ("stats", stats)):
        if value.shape != (size, size):
            raise ValueError(f"`{name}` must be ({size}, {size}) for this weight, got {tuple(value.shape)}.")
        if not torch.isfinite(value).all():
            raise ValueError(f"`{name}` contains NaN or Inf: the calibration forward of either model is not finite.")
    if rank is not None:
        _check_rank(rank, weight)
    cross, stats = cross.double(), stats.double()
    count = float(stats[-1, -1])
    if count <= 0 or float(cross[-1, -1]) != count:
        raise ValueError(
            f"`stats` and `cross` must count the same tokens (> 0), got {count} and {float(cross[-1, -1])}."
        )
    mean, mean_tilde = cross[:-1, -1] / count, stats[:-1, -1] / count
    scatter = stats[:-1, :-1] - count * torch.outer(mean_tilde, mean_tilde)
    moment = cross[:-1, :-1] - count * torch.outer(mean, mean_tilde)
    scale = float(stats[:-1, :-1].diagonal().abs().max()) * scatter.shape[0]
    basis, root = whiten(scatter, rtol=rtol, scale=scale)
    w = weight.double()
    inverse = basis / root  # U S^{-1}
    target = w @ moment @ inverse  # B = W K U S^{-1}
    if rank is None:
        up, down = None, target @ inverse.T
        approx = down
    else:
        left, sigma, right_t = torch.linalg.svd(target, full_matrices=False)
        down, up = _balanced_split(left, sigma, right_t, rank)
        down = down @ inverse.T
        approx = up @ down
    shift = w @ mean - approx @ mean_tilde
    new_bias = shift if bias is None else bias.double() + shift
    return down.to(weight.dtype), (None if up is None else up.to(weight.dtype)), new_bias.to(weight.dtype)


def svd_factorize(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of `W` (the data-free baseline) with the balanced split `down = S^{1/2} V^T`, `up = U S^{1/2}`.

    Returns:
        `tuple[Tensor, Tensor]`: `down` (`rank x in`) and `up` (`out x rank`) in the dtype of `weight`.
    """
    _check_rank(rank, weight)
    left, sigma, right_t = torch.linalg.svd(weight.double(), full_matrices=False)
    down, up = _balanced_split(left, sigma, right_t, rank)
    return down.to(weight.dtype), up.to(weight.dtype)


def drone_spectrum(weight: torch.Tensor, second_moment: torch.Tensor, *, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Singular values of `Z = W U S` (descending, float64): DRONE's error at rank `k` is the sum of the squares of
    those after the first `k`."""
    _check_second_moment(second_moment, weight)
    basis, scale = whiten(second_moment, rtol=rtol)
    return torch.linalg.svdvals(weight.double() @ (basis * scale))


def svd_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of `W` (descending, float64)."""
    return torch.linalg.svdvals(weight.double())


def data_weighted_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """Returns `trace((W - M) C (W - M)^T) = ||W X - M X||_F^2` for `C = X X^T`."""
    diff = weight.double() - approx.double()
    return float(torch.einsum("oi,ij,oj->", diff, second_moment.double(), diff))


__all__ = [
    "DroneDecomposition",
    "activation_slope",
    "data_weighted_error",
    "drone_factorize",
    "drone_factorize_affine",
    "drone_refit",
    "drone_spectrum",
    "svd_factorize",
    "svd_spectrum",
    "whiten",
]
