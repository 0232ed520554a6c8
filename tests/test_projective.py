"""(k, j)-projective clustering: exactness against SVD and brute force, Lloyd invariants, errors."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from transformers import AutoModel

from drone_hf import projective
from drone_hf.projective import (
    ProjectiveClusteringResult,
    choose_kj,
    embedding_parameter_count,
    projective_clustering,
    projective_clustering_cost,
)

from .testing_utils import minilm_path, one_torch_thread


_one_thread = one_torch_thread("function")


def _matrix(n=300, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Decaying column scales: a spectrum with clear gaps, like real embeddings.
    return torch.randn(n, d, generator=g, dtype=dtype) * torch.logspace(0, -1, d, dtype=dtype)


def _union_of_subspaces(k=4, j=3, d=20, per_cluster=100, noise=1e-6, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = torch.linalg.qr(torch.randn(k, d, j, generator=g, dtype=torch.float64)).Q.transpose(1, 2)
    labels = torch.arange(k * per_cluster) % k
    coeffs = torch.randn(k * per_cluster, j, generator=g, dtype=torch.float64)
    rows = torch.einsum("nj,njd->nd", coeffs, bases[labels])
    return rows + noise * torch.randn(rows.shape, generator=g, dtype=torch.float64), labels


def _optimal_cluster_cost(rows, j):
    # The best j-dim subspace for a set of rows leaves the smallest d - j eigenvalues of its Gram (Eckart-Young).
    if rows.shape[0] == 0:
        return 0.0
    return float(torch.linalg.eigvalsh(rows.T @ rows)[: rows.shape[1] - j].clamp_min(0).sum())


def _all_residuals(matrix, bases):
    proj = torch.einsum("nd,kjd->nkj", matrix.double(), bases.double())
    return matrix.double().square().sum(1, keepdim=True) - proj.square().sum(-1)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_k1_is_truncated_svd(dtype, rtol):
    a, j = _matrix(dtype=dtype), 5
    result = projective_clustering(a, k=1, j=j)
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    assert result.cost == pytest.approx(float(s[j:].square().sum()), rel=rtol)
    expected = (u[:, :j] * s[:j]) @ vh[:j]
    torch.testing.assert_close(result.reconstruct(a).double(), expected, rtol=0, atol=rtol * 10)
    assert result.bases.shape == (1, j, a.shape[1]) and result.bases.dtype == dtype
    assert torch.equal(result.assignments, torch.zeros(a.shape[0], dtype=torch.long))


def test_weighted_k1_is_weighted_svd_and_zero_weight_rows_are_ignored():
    a, j = _matrix(), 4
    weights = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights[:5] = 0.0
    a[:5] *= 1e3  # huge rows of weight 0 would dominate an unweighted fit
    result = projective_clustering(a, k=1, j=j, weights=weights)
    _, s, vh = torch.linalg.svd(weights.sqrt()[:, None] * a, full_matrices=False)
    assert result.cost == pytest.approx(float(s[j:].square().sum()), rel=1e-10)
    torch.testing.assert_close(result.bases[0].T @ result.bases[0], vh[:j].T @ vh[:j], rtol=0, atol=1e-10)
    assert result.cost == pytest.approx(projective_clustering_cost(a, result.assignments, result.bases, weights))


def test_integer_weights_equal_repeated_rows():
    a, j = _matrix(n=50, d=6), 2
    counts = torch.arange(50) % 3 + 1
    weighted = projective_clustering(a, k=1, j=j, weights=counts.double())
    repeated = projective_clustering(a.repeat_interleave(counts, dim=0), k=1, j=j)
    assert weighted.cost == pytest.approx(repeated.cost, rel=1e-10)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_costs_decrease_to_a_lloyd_fixed_point(init):
    a, k, j = _matrix(n=400, d=10, seed=1), 4, 3
    result = projective_clustering(a, k=k, j=j, n_init=1, max_iter=500, tol=0.0, init=init)
    costs = result.costs_per_iter
    assert result.n_iter == len(costs) >= 3 and result.n_iter < 500
    assert all(later <= earlier for earlier, later in zip(costs, costs[1:]))
    assert costs[-1] < costs[0] and result.cost == costs[-1]
    assert result.cost == pytest.approx(projective_clustering_cost(a, result.assignments, result.bases), rel=1e-10)
    # Fixed point: every row sits in its nearest subspace, every subspace is the best fit of its rows.
    resid = _all_residuals(a, result.bases)
    own = resid.gather(1, result.assignments[:, None]).squeeze(1)
    assert torch.all(own <= resid.min(1).values + 1e-10)
    eye = torch.eye(j, dtype=a.dtype).expand(k, j, j)
    torch.testing.assert_close(result.bases @ result.bases.transpose(1, 2), eye, rtol=0, atol=1e-10)
    per_cluster = sum(_optimal_cluster_cost(a[result.assignments == c], j) for c in range(k))
    assert result.cost == pytest.approx(per_cluster, rel=1e-9)


def test_restarts_keep_the_best(monkeypatch):
    finals = []

    def recording_lloyd(*args):
        out = lloyd(*args)
        finals.append(out[2][-1])
        return out

    lloyd = projective._lloyd
    monkeypatch.setattr(projective, "_lloyd", recording_lloyd)
    result = projective_clustering(_matrix(n=400, d=10, seed=1), 4, 3, n_init=4, init="random")
    assert len(finals) == 4 and finals.index(min(finals)) not in (0, 3)  # neither the first nor the last is best
    assert result.cost == min(finals)


def test_deterministic_for_a_seed():
    a = _matrix(n=300, d=10, dtype=torch.float32)
    first, second = (projective_clustering(a, 3, 4, seed=7) for _ in range(2))
    assert torch.equal(first.assignments, second.assignments) and torch.equal(first.bases, second.bases)
    assert first.costs_per_iter == second.costs_per_iter
    others = [projective_clustering(a, 3, 4, n_init=1, seed=s).assignments for s in range(4)]
    assert any(not torch.equal(others[0], other) for other in others[1:])


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_recovers_a_union_of_subspaces(dtype, rtol):
    a, labels = _union_of_subspaces()
    result = projective_clustering(a.to(dtype), k=4, j=3, seed=0)
    assert result.cost <= rtol * float(a.square().sum())  # the noise alone is ~1e-12 of it
    contingency = torch.zeros(4, 4, dtype=torch.long)
    contingency.index_put_((labels, result.assignments), torch.ones_like(labels), accumulate=True)
    assert torch.equal((contingency > 0).sum(0), torch.ones(4, dtype=torch.long))  # a permutation of the labels
    assert torch.equal((contingency > 0).sum(1), torch.ones(4, dtype=torch.long))


def _brute_force(a, j):
    best = float("inf")
    for mask in itertools.product([False, True], repeat=a.shape[0]):
        mask = torch.tensor(mask)
        best = min(best, _optimal_cluster_cost(a[mask], j) + _optimal_cluster_cost(a[~mask], j))
    return best


def test_matches_brute_force_on_seven_rows():
    g = torch.Generator().manual_seed(5)
    lines = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.3, 1.0]], dtype=torch.float64)
    easy = lines[torch.arange(7) % 2] * torch.randn(7, 1, generator=g, dtype=torch.float64)
    easy += 0.05 * torch.randn(7, 3, generator=g, dtype=torch.float64)
    assert projective_clustering(easy, k=2, j=1, n_init=5).cost == pytest.approx(_brute_force(easy, 1), rel=1e-9)
    for seed in range(5):  # Lloyd may stop in a local optimum, never below the global one
        a = torch.randn(7, 3, generator=g, dtype=torch.float64)
        result = projective_clustering(a, k=2, j=1, n_init=5, seed=seed)
        assert result.cost >= _brute_force(a, 1) - 1e-12
        assert result.cost == pytest.approx(projective_clustering_cost(a, result.assignments, result.bases))


def test_half_precision_input_gives_float32_bases():
    a = _matrix(n=100, d=6, dtype=torch.float32)
    result = projective_clustering(a.to(torch.bfloat16), 2, 2)
    assert result.bases.dtype == torch.float32 and result.reconstruct(a.to(torch.bfloat16)).dtype == torch.float32


def test_coefficients_and_reconstruction():
    a, k, j = _matrix(n=200, d=8), 3, 2
    weights = torch.rand(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = projective_clustering(a, k, j, weights=weights)
    coeffs = result.coefficients(a)
    assert coeffs.shape == (200, j)
    rebuilt = result.reconstruct(coefficients=coeffs)
    torch.testing.assert_close(rebuilt, result.reconstruct(a))
    assert float((weights * (a - rebuilt).square().sum(1)).sum()) == pytest.approx(result.cost, rel=1e-9)
    with pytest.raises(ValueError, match="exactly one of `matrix` and `coefficients`"):
        result.reconstruct()
    with pytest.raises(ValueError, match=r"`coefficients` must have shape \(200, 2\)"):
        result.reconstruct(coefficients=coeffs[:, :1])


@pytest.mark.parametrize("matrix", [torch.randn(6, 4, dtype=torch.float64), torch.zeros(6, 4), torch.ones(6, 4)])
@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_degenerate_inputs_fill_empty_clusters_without_nan(matrix, init):
    # k = n with random starts leaves clusters empty; each must get a row, so every row ends alone: cost 0.
    result = projective_clustering(matrix, k=6, j=1, init=init, n_init=2)
    assert torch.isfinite(result.bases).all() and result.cost == pytest.approx(0.0, abs=1e-12)
    assert result.assignments.min() >= 0 and result.assignments.max() < 6


def test_embedding_parameter_count_and_choose_kj_budget():
    assert embedding_parameter_count(30522, 768, 8, 383) == 30522 * 383 + 8 * 383 * 768
    a, labels = _union_of_subspaces(k=4, j=3, d=20, per_cluster=60)
    n, d = a.shape
    k, j, result = choose_kj(a, 0.5, k_grid=(1, 2, 4), n_init=2)
    budget = 0.5 * n * d
    assert embedding_parameter_count(n, d, k, j) <= budget < embedding_parameter_count(n, d, k, j + 1)
    assert isinstance(result, ProjectiveClusteringResult) and result.bases.shape == (k, j, d)
    svd_j = int(budget // (n + d))
    svd_cost = float(torch.linalg.svdvals(a)[svd_j:].square().sum())
    assert k > 1 and result.cost < 1e-3 * svd_cost
    assert choose_kj(a, 0.5, k_grid=(1,))[:2] == (1, svd_j)


def test_minilm_embedding_beats_svd_at_equal_parameters():
    model = AutoModel.from_pretrained(minilm_path())
    weight = model.embeddings.word_embeddings.weight.detach()
    n, d = weight.shape
    k, j, result = choose_kj(weight, 0.6, k_grid=(1, 4), n_init=1, max_iter=3)
    svd_j = int(0.6 * n * d // (n + d))
    eigenvalues = torch.linalg.eigvalsh(weight.double().T @ weight.double()).flip(0)  # squared singular values
    svd_cost = float(eigenvalues[svd_j:].sum())
    assert (k, j) == (4, 219) and embedding_parameter_count(n, d, k, j) <= 0.6 * n * d
    assert result.cost < 0.97 * svd_cost


@pytest.mark.slow
def test_speed_on_bert_sized_embedding(pytestconfig):
    if not pytestconfig.getoption("--run-slow", default=False):
        pytest.skip("timing test: needs --run-slow")
    a = torch.randn(30522, 768, generator=torch.Generator().manual_seed(0))
    j = int(0.6 * 30522 * 768 // (30522 + 8 * 768))
    start = time.perf_counter()
    result = projective_clustering(a, k=8, j=j, n_init=3, max_iter=30)
    assert time.perf_counter() - start < 60
    assert result.bases.shape == (8, j, 768) and result.costs_per_iter == sorted(result.costs_per_iter, reverse=True)


ERRORS = [
    ({"matrix": torch.randn(5)}, ValueError, r"`matrix` must be a 2-D tensor .* got \(5,\)"),
    ({"matrix": torch.randn(2, 3, 4)}, ValueError, r"`matrix` must be a 2-D tensor .* got \(2, 3, 4\)"),
    ({"matrix": torch.tensor([[1.0, float("nan")]] * 3)}, ValueError, "`matrix` contains NaN or Inf"),
    ({"matrix": torch.tensor([[1.0, float("inf")]] * 3)}, ValueError, "`matrix` contains NaN or Inf"),
    ({"k": 0}, ValueError, r"`k` must be in \[1, 10\] \(at most the number of rows n=10\), got 0"),
    ({"k": 11}, ValueError, r"`k` must be in \[1, 10\] \(at most the number of rows n=10\), got 11"),
    ({"j": 0}, ValueError, r"`j` must be in \[1, 3\] \(below the number of columns d=4\), got 0"),
    ({"j": 4}, ValueError, r"`j` must be in \[1, 3\] \(below the number of columns d=4\), got 4"),
    ({"k": 2.0}, TypeError, "`k` must be an int, got float 2.0"),
    ({"j": "1"}, TypeError, "`j` must be an int, got str '1'"),
    ({"k": True}, TypeError, "`k` must be an int, got bool True"),
    ({"n_init": 0}, ValueError, r"`n_init` must be in \[1, "),
    ({"max_iter": 0}, ValueError, r"`max_iter` must be in \[1, "),
    ({"tol": -1.0}, ValueError, "`tol` must be a real number >= 0, got -1.0"),
    ({"init": "svd"}, ValueError, r"`init` must be one of \('kmeans\+\+', 'random'\), got 'svd'"),
    ({"weights": torch.ones(9)}, ValueError, r"`weights` must be a tensor of shape \(10,\).* got \(9,\)"),
    ({"weights": -torch.ones(10)}, ValueError, "`weights` must be finite and >= 0, got min -1.0"),
    ({"weights": torch.full((10,), float("nan"))}, ValueError, "`weights` must be finite and >= 0"),
    ({"seed": -1}, ValueError, r"`seed` must be in \[0, "),
    ({"n_init": 1.5}, TypeError, "`n_init` must be an int, got float 1.5"),
    ({"matrix": torch.ones(10, 4, dtype=torch.long)}, ValueError, "`matrix` must be floating"),
]


@pytest.mark.parametrize("kwargs, error, match", ERRORS)
def test_projective_clustering_errors(kwargs, error, match):
    call = {"matrix": torch.randn(10, 4), "k": 2, "j": 1} | kwargs
    with pytest.raises(error, match=match):
        projective_clustering(call.pop("matrix"), call.pop("k"), call.pop("j"), **call)


@pytest.mark.parametrize(
    "param_ratio, k_grid, match",
    [
        (0.0, (1, 2), r"`param_ratio` must be in \(0, 1\), got 0.0"),
        (1.0, (1, 2), r"`param_ratio` must be in \(0, 1\), got 1.0"),
        (-0.5, (1, 2), r"`param_ratio` must be in \(0, 1\), got -0.5"),
        (0.01, (1, 2), r"`param_ratio`=0.01 is too small: no k in \(1, 2\) with k <= n=10 leaves j >= 1"),
        (0.5, (), "`k_grid` must contain at least one k"),
        (0.5, (0,), r"`k` must be in \[1, "),
    ],
)
def test_choose_kj_errors(param_ratio, k_grid, match):
    with pytest.raises(ValueError, match=match):
        choose_kj(torch.randn(10, 4), param_ratio, k_grid=k_grid)


def test_other_errors():
    a = torch.randn(10, 4)
    bases = torch.linalg.qr(torch.randn(2, 4, 1)).Q.transpose(1, 2)
    with pytest.raises(ValueError, match=r"`assignments` must lie in \[0, 2\), got range \[0, 2\]"):
        projective_clustering_cost(a, torch.arange(10) % 3, bases)
    with pytest.raises(ValueError, match=r"`assignments` must be an integer tensor of shape \(10,\)"):
        projective_clustering_cost(a, torch.zeros(10), bases)
    with pytest.raises(ValueError, match=r"`bases` must have shape \(k, j, 4\), got \(2, 1, 5\)"):
        projective_clustering_cost(a, torch.zeros(10, dtype=torch.long), torch.zeros(2, 1, 5))
    with pytest.raises(TypeError, match="`j` must be an int, got float 1.5"):
        embedding_parameter_count(10, 4, 2, 1.5)
    with pytest.raises(TypeError, match="`k` must be an int, got str 'a'"):
        choose_kj(a, 0.5, k_grid=("a",))


def test_public_api_at_the_top_level():
    import drone_hf

    assert drone_hf.projective_clustering is projective_clustering and drone_hf.choose_kj is choose_kj
    result = drone_hf.projective_clustering(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), 2, 3)
    assert isinstance(result, drone_hf.ProjectiveClusteringResult) and result.bases.shape == (2, 3, 6)
