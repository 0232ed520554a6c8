import itertools

import pytest
import torch

from drone_hf.factorize import (
    data_weighted_error,
    drone_factorize,
    drone_spectrum,
    svd_factorize,
    svd_spectrum,
    whiten,
)


def _data(in_features=6, tokens=50, seed=0):
    # Strongly anisotropic inputs with a mean, like post-LayerNorm activations.
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, in_features, dtype=torch.float64)
    x = torch.randn(in_features, tokens, generator=g, dtype=torch.float64) * scales[:, None] + 0.5
    return x


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_drone_error_is_sum_of_discarded_singular_values(rank):
    w = torch.randn(5, 6, dtype=torch.float64)
    x = _data()
    c = x @ x.T
    down, up = drone_factorize(w, c, rank)
    sigma = drone_spectrum(w, c)
    err = data_weighted_error(w, up @ down, c)
    assert err == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-9, abs=1e-12)
    assert err == pytest.approx(float(torch.linalg.norm(w @ x - up @ down @ x) ** 2), rel=1e-9, abs=1e-12)


def test_drone_matches_brute_force_optimum_on_small_shapes():
    # Brute force: the optimal rank-1 M for ||(W - M) X||_F is M = W P where P projects onto the best rank-1 column
    # space; equivalently search rank-1 M = a b^T by enumerating b over a fine grid of directions (in R^2) and
    # solving a in closed form. On a 3x2 weight this is exhaustive up to the grid.
    torch.manual_seed(3)
    w = torch.randn(3, 2, dtype=torch.float64)
    x = torch.randn(2, 20, dtype=torch.float64) * torch.tensor([[3.0], [0.4]], dtype=torch.float64)
    c = x @ x.T
    best = float("inf")
    for angle in torch.linspace(0, torch.pi, 20001, dtype=torch.float64):
        b = torch.stack([torch.cos(angle), torch.sin(angle)])
        proj = b @ x  # (n,)
        a = (w @ x) @ proj / (proj @ proj)  # least squares for a given b
        best = min(best, float(torch.linalg.norm(w @ x - torch.outer(a, proj)) ** 2))
    down, up = drone_factorize(w, c, 1)
    optimum = data_weighted_error(w, up @ down, c)
    assert optimum <= best + 1e-12
    assert optimum == pytest.approx(best, rel=1e-6)


def test_drone_beats_random_rank_k_candidates():
    torch.manual_seed(4)
    w, x = torch.randn(4, 5, dtype=torch.float64), _data(5, 30)
    c = x @ x.T
    down, up = drone_factorize(w, c, 2)
    optimum = data_weighted_error(w, up @ down, c)
    for _ in range(300):
        m = torch.randn(4, 2, dtype=torch.float64) @ torch.randn(2, 5, dtype=torch.float64)
        # Best scaling of each random candidate, to make them competitive.
        alpha = float(((w @ x) * (m @ x)).sum() / ((m @ x) ** 2).sum())
        assert optimum <= data_weighted_error(w, alpha * m, c) + 1e-9


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_identity_covariance_gives_truncated_svd(rank):
    w = torch.randn(7, 5, dtype=torch.float64)
    down, up = drone_factorize(w, torch.eye(5, dtype=torch.float64), rank)
    s_down, s_up = svd_factorize(w, rank)
    torch.testing.assert_close(up @ down, s_up @ s_down)
    u, s, vt = torch.linalg.svd(w)
    torch.testing.assert_close(up @ down, u[:, :rank] @ torch.diag(s[:rank]) @ vt[:rank])


def test_drone_never_worse_than_svd_at_any_rank():
    w, x = torch.randn(8, 6, dtype=torch.float64), _data(6, 40)
    c = x @ x.T
    for rank in range(1, 7):
        d_down, d_up = drone_factorize(w, c, rank)
        s_down, s_up = svd_factorize(w, rank)
        assert data_weighted_error(w, d_up @ d_down, c) <= data_weighted_error(w, s_up @ s_down, c) + 1e-9


def test_full_rank_reproduces_outputs_on_calibration_data():
    w, x = torch.randn(6, 6, dtype=torch.float64), _data(6, 30)
    down, up = drone_factorize(w, x @ x.T, 6)
    torch.testing.assert_close(up @ (down @ x), w @ x)


def test_rank_deficient_statistics_are_finite_and_exact_on_their_span():
    # Fewer tokens (3) than dimensions (8): C has rank 3.
    w, x = torch.randn(5, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    for rank in (2, 3, 5):
        down, up = drone_factorize(w, x @ x.T, rank)
        assert torch.isfinite(down).all() and torch.isfinite(up).all()
        if rank >= 3:
            torch.testing.assert_close(up @ down @ x, w @ x)
    basis, scale = whiten(x @ x.T)
    assert basis.shape == (8, 3) and scale.shape == (3,)


def test_float32_weights_get_float32_factors_and_scale_invariance():
    w, x = torch.randn(5, 6), _data(6, 40)
    down, up = drone_factorize(w, x @ x.T, 3)
    assert down.dtype == up.dtype == torch.float32
    down2, up2 = drone_factorize(w, 1e6 * (x @ x.T), 3)
    torch.testing.assert_close(up @ down, up2 @ down2, rtol=1e-4, atol=1e-5)


def test_deterministic():
    w, x = torch.randn(5, 6), _data(6, 40)
    a = drone_factorize(w, x @ x.T, 3)
    b = drone_factorize(w, x @ x.T, 3)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_spectra_are_descending():
    w, x = torch.randn(5, 6), _data(6, 40)
    for s in (drone_spectrum(w, x @ x.T), svd_spectrum(w)):
        assert all(a >= b for a, b in itertools.pairwise(s.tolist()))


@pytest.mark.parametrize(
    "rank, second_moment, match",
    [
        (0, torch.eye(6), r"`rank` must be an int in \[1, 5\].*got 0"),
        (6, torch.eye(6), r"`rank` must be an int in \[1, 5\].*got 6"),
        (2.0, torch.eye(6), r"`rank` must be an int"),
        (2, torch.eye(7), r"`second_moment` must be \(6, 6\).*another model"),
        (2, torch.full((6, 6), float("nan")), r"NaN or Inf"),
    ],
)
def test_bad_input(rank, second_moment, match):
    with pytest.raises(ValueError, match=match):
        drone_factorize(torch.randn(5, 6), second_moment, rank)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_bias_corrected_drone_is_optimal_on_centred_data_and_never_worse(rank):
    from drone_hf.factorize import drone_factorize_affine

    torch.manual_seed(5)
    w, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = _data(5, 40) + torch.tensor([4.0, -2.0, 1.0, 0.0, 3.0], dtype=torch.float64)[:, None]
    x_tilde = torch.cat([x, torch.ones(1, 40, dtype=torch.float64)])
    down, up, shift = drone_factorize_affine(w, x_tilde @ x_tilde.T, rank)
    affine_err = float(((w @ x + b[:, None]) - (up @ down @ x + (b + shift)[:, None])).pow(2).sum())
    centred = x - x.mean(1, keepdim=True)
    assert affine_err == pytest.approx(float((drone_spectrum(w, centred @ centred.T)[rank:] ** 2).sum()), rel=1e-8)
    p_down, p_up = drone_factorize(w, x @ x.T, rank)
    assert affine_err <= float(((w @ x) - (p_up @ p_down @ x)).pow(2).sum()) + 1e-9
    with pytest.raises(ValueError, match=r"`stats` must be \(6, 6\)"):
        drone_factorize_affine(w, torch.eye(5), rank)
