"""(k, j)-projective clustering of embedding rows (Maalouf, Lang, Rus, Feldman, ICLR 2021): instead of one rank-`j`
SVD of the `n x d` embedding, `k` subspaces of dimension `j` through the origin, every row stored as `j` coefficients
in its closest one (`n * j + k * j * d` parameters). Grams and eigendecompositions are float64.

The Lloyd iterations themselves are in `projective_lloyd.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
from transformers.utils import logging

from .projective_lloyd import _lloyd, _seed, _total


logger = logging.get_logger(__name__)

_INITS = ("kmeans++", "random")


def _check_int(name: str, value, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}]{why}, got {value}.")
    return int(value)


def _shape(value) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_matrix(matrix) -> torch.Tensor:
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        raise ValueError(f"`matrix` must be a 2-D tensor (n rows x d columns), got {_shape(matrix)}.")
    if not matrix.is_floating_point() or matrix.shape[0] < 1 or matrix.shape[1] < 2:
        raise ValueError(f"`matrix` must be floating with n >= 1, d >= 2, got {matrix.dtype} {_shape(matrix)}.")
    if not torch.isfinite(matrix).all():
        raise ValueError("`matrix` contains NaN or Inf.")
    return matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()


def _check_weights(weights, n: int, device) -> torch.Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n,):
        raise ValueError(f"`weights` must be a tensor of shape ({n},), one weight per row, got {_shape(weights)}.")
    w = weights.to(device=device, dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"`weights` must be finite and >= 0, got min {float(w.min())}.")
    return w


@dataclass
class ProjectiveClusteringResult:
    """A (k, j)-projective clustering of the rows of an `n x d` matrix.

    Attributes:
        assignments (`torch.Tensor`): `(n,)` int64 cluster of every row, in `[0, k)`.
        bases (`torch.Tensor`): `(k, j, d)`; the rows of `bases[i]` are an orthonormal basis of subspace `i`.
        cost (`float`): Sum over rows of the (weighted) squared distance to the row's own subspace.
        costs_per_iter (`list[float]`): Cost after each Lloyd iteration of the best restart (non-increasing).
        n_iter (`int`): Number of Lloyd iterations of the best restart.
    """

    assignments: torch.Tensor
    bases: torch.Tensor
    cost: float
    costs_per_iter: list[float] = field(default_factory=list)
    n_iter: int = 0

    def _per_cluster(self, tensor, name: str, transpose: bool) -> torch.Tensor:
        k, j, d = self.bases.shape
        n, width = self.assignments.shape[0], (d if transpose else j)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (n, width):
            raise ValueError(f"`{name}` must have shape ({n}, {width}), got {_shape(tensor)}.")
        tensor = tensor.to(self.bases.dtype)
        out = tensor.new_zeros(n, j if transpose else d)
        for c in range(k):
            rows = (self.assignments == c).nonzero().flatten()
            out[rows] = tensor[rows] @ (self.bases[c].T if transpose else self.bases[c])
        return out

    def coefficients(self, matrix: torch.Tensor) -> torch.Tensor:
        """Returns the `(n, j)` coefficients `a V_i^T` of every row `a` in its own subspace `i`."""
        return self._per_cluster(matrix, "matrix", transpose=True)

    def reconstruct(self, matrix: torch.Tensor | None = None, coefficients: torch.Tensor | None = None):
        """Returns the `(n, d)` rows `c V_i` from `coefficients` or from `matrix` (exactly one, else `ValueError`)."""
        if (matrix is None) == (coefficients is None):
            raise ValueError("Pass exactly one of `matrix` and `coefficients` to `reconstruct`.")
        coefficients = self.coefficients(matrix) if coefficients is None else coefficients
        return self._per_cluster(coefficients, "coefficients", transpose=False)


def projective_clustering(
    matrix: torch.Tensor,
    k: int,
    j: int,
    *,
    n_init: int = 3,
    max_iter: int = 30,
    tol: float = 1e-6,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    init: str = "kmeans++",
) -> ProjectiveClusteringResult:
    """Lloyd (k, j)-projective clustering: `k` subspaces of dimension `j` through the origin, each row in its closest.

    Alternates assigning every row to the subspace of smallest residual `||a||^2 - ||a V_i^T||^2` and refitting each
    subspace to the top-`j` eigenvectors of its cluster's float64 Gram `sum_r w_r a_r^T a_r`, keeping the best of
    `n_init` restarts. The cost never increases; `k = 1` is truncated (weighted) SVD. Deterministic for a `seed`.

    Args:
        matrix (`torch.Tensor`): `n x d` rows to cluster (for example `embeddings.word_embeddings.weight`).
        k (`int`): Number of subspaces, `1 <= k <= n`.
        j (`int`): Dimension of every subspace, `1 <= j < d`.
        n_init (`int`, *optional*, defaults to 3): Restarts; the lowest cost wins.
        max_iter (`int`, *optional*, defaults to 30): Lloyd iterations per restart.
        tol (`float`, *optional*, defaults to `1e-6`): Stop once an iteration lowers the cost by `tol` of it or less.
        seed (`int`, *optional*, defaults to 0): Seed of the `torch.Generator` behind every restart.
        weights (`torch.Tensor`, *optional*): `(n,)` non-negative row weights (for example token frequencies).
        init (`str`, *optional*, defaults to `"kmeans++"`): `"kmeans++"` samples seed rows proportionally to their
            residual and fits each subspace to the rows best aligned with its seed; `"random"` assigns rows at random.

    Returns:
        [`ProjectiveClusteringResult`]: Assignments, bases (dtype of `matrix`, float32 for half types) and costs.

    Raises:
        `TypeError`: If `k`, `j`, `n_init`, `max_iter` or `seed` is not an int.
        `ValueError`: If `matrix` is not a finite 2-D floating tensor, an argument is out of range, or `weights` has
            the wrong shape or negative entries.

    Example:

    ```py
    >>> import torch
    >>> from drone_hf.projective import projective_clustering
    >>> result = projective_clustering(torch.randn(200, 16), k=4, j=3, seed=0)
    >>> result.assignments.shape, result.bases.shape
    (torch.Size([200]), torch.Size([4, 3, 16]))
    ```
    """
    x = _check_matrix(matrix)
    n, d = x.shape
    k = _check_int("k", k, 1, n, f" (at most the number of rows n={n})")
    j = _check_int("j", j, 1, d - 1, f" (below the number of columns d={d})")
    n_init, max_iter = _check_int("n_init", n_init, 1, 10**6), _check_int("max_iter", max_iter, 1, 10**6)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    if isinstance(tol, bool) or not isinstance(tol, Real) or not tol >= 0:
        raise ValueError(f"`tol` must be a real number >= 0, got {tol!r}.")
    if init not in _INITS:
        raise ValueError(f"`init` must be one of {_INITS}, got {init!r}.")
    w = _check_weights(weights, n, x.device)
    complement, sq_norms = d - j < j, x.square().sum(1)
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(1 if k == 1 else n_init):  # k = 1 has one optimum (the SVD): restarts would repeat it
        if k == 1:
            assign, own = torch.zeros(n, dtype=torch.long, device=x.device), sq_norms
        else:
            assign, own = _seed(x, sq_norms, w, k, j, complement, init, generator)
        assign, bases, costs = _lloyd(x, sq_norms, w, k, j, complement, assign, own, max_iter, float(tol))
        logger.debug(f"projective_clustering k={k} j={j}: cost {costs[-1]:.6g} after {len(costs)} iterations")
        if best is None or costs[-1] < best[2][-1]:
            best = (assign, bases, costs)
    assign, bases, costs = best
    return ProjectiveClusteringResult(assign, bases.to(x.dtype), costs[-1], costs, len(costs))


def projective_clustering_cost(
    matrix: torch.Tensor, assignments: torch.Tensor, bases: torch.Tensor, weights: torch.Tensor | None = None
) -> float:
    """Sum over rows of the (weighted) squared distance `||a - a V_i^T V_i||^2` to the row's subspace, in float64.

    Args:
        matrix (`torch.Tensor`): `n x d` rows.
        assignments (`torch.Tensor`): `(n,)` integer cluster of every row, in `[0, k)`.
        bases (`torch.Tensor`): `(k, j, d)` bases with orthonormal rows.
        weights (`torch.Tensor`, *optional*): `(n,)` non-negative row weights.

    Returns:
        `float`: The clustering cost.

    Raises:
        `ValueError`: On inconsistent shapes, out-of-range assignments, non-finite input or negative weights.
    """
    x = _check_matrix(matrix).double()
    n, d = x.shape
    if not isinstance(bases, torch.Tensor) or bases.ndim != 3 or bases.shape[2] != d:
        raise ValueError(f"`bases` must have shape (k, j, {d}), got {_shape(bases)}.")
    k, labels = bases.shape[0], assignments
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,) or labels.is_floating_point():
        raise ValueError(f"`assignments` must be an integer tensor of shape ({n},), got {_shape(labels)}.")
    if not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise ValueError(f"`assignments` must lie in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}].")
    w = _check_weights(weights, n, x.device)
    resid = torch.zeros(n, dtype=torch.float64, device=x.device)
    for c in range(k):
        rows, basis = (labels == c).nonzero().flatten(), bases[c].double()
        resid[rows] = (x[rows] - (x[rows] @ basis.T) @ basis).square().sum(1)
    return _total(resid, w)


def embedding_parameter_count(n: int, d: int, k: int, j: int) -> int:
    """Returns `n * j + k * j * d`: per-row coefficients plus the `k` bases (the int assignments are not counted)."""
    for name, value in (("n", n), ("d", d), ("k", k), ("j", j)):
        _check_int(name, value, 0, 2**62)
    return n * j + k * j * d


def choose_kj(
    matrix: torch.Tensor,
    param_ratio: float,
    *,
    k_grid: Sequence[int] = (1, 2, 4, 8, 16),
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 30,
    weights: torch.Tensor | None = None,
) -> tuple[int, int, ProjectiveClusteringResult]:
    """Picks the `(k, j)` of lowest cost within `param_ratio * n * d` parameters: for every `k` in `k_grid` (`k = 1` is
    the SVD baseline) the largest `j < d` with `n * j + k * j * d <= param_ratio * n * d`; ties go to the smaller `k`.

    Args:
        matrix (`torch.Tensor`): `n x d` rows.
        param_ratio (`float`): Budget as a fraction of `n * d`, in `(0, 1)`; `0.6` is a 40% reduction.
        k_grid (`Sequence[int]`, *optional*, defaults to `(1, 2, 4, 8, 16)`): Candidate numbers of subspaces.
        seed, n_init, max_iter, weights: Passed to [`projective_clustering`].

    Returns:
        `tuple[int, int, ProjectiveClusteringResult]`: The best `k`, `j` and clustering.

    Raises:
        `TypeError`: If an entry of `k_grid` is not an int.
        `ValueError`: If `param_ratio` is not in `(0, 1)` or too small to give `j >= 1` for any `k <= n`.

    Example:

    ```py
    >>> import torch
    >>> k, j, result = choose_kj(torch.randn(300, 16), 0.5, k_grid=(1, 2), n_init=1)
    >>> embedding_parameter_count(300, 16, k, j) <= 0.5 * 300 * 16
    True
    ```
    """
    x = _check_matrix(matrix)
    n, d = x.shape
    if isinstance(param_ratio, bool) or not isinstance(param_ratio, Real) or not 0 < param_ratio < 1:
        raise ValueError(f"`param_ratio` must be in (0, 1), got {param_ratio!r}.")
    if not k_grid:
        raise ValueError("`k_grid` must contain at least one k.")
    budget, best = param_ratio * n * d, None
    for k in sorted({_check_int("k", k, 1, 2**62) for k in k_grid}):
        j = min(d - 1, math.floor(budget / (n + k * d)))
        while j >= 1 and embedding_parameter_count(n, d, k, j) > budget:  # float rounding of the division
            j -= 1
        if k > n or j < 1:
            continue
        result = projective_clustering(x, k, j, n_init=n_init, max_iter=max_iter, seed=seed, weights=weights)
        logger.info(f"choose_kj: k={k} j={j} cost={result.cost:.6g} ({result.n_iter} iterations)")
        if best is None or result.cost < best[2].cost:
            best = (k, j, result)
    if best is None:
        raise ValueError(
            f"`param_ratio`={param_ratio} is too small: no k in {tuple(k_grid)} with k <= n={n} leaves j >= 1 "
            f"(k=1 needs param_ratio >= {(n + d) / (n * d):.3g})."
        )
    return best
