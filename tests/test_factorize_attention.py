"""Math properties of `drone_hf.factorize_attention` (DRONE on the per-head query-key bilinear form)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from drone_hf.factorize_attention import (
    attention_logit_error,
    attention_spectrum,
    drone_attention_factorize,
    svd_attention_factorize,
)


F64 = torch.float64


def _weights(d, num_heads, head_dim, seed, bias_scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    out = num_heads * head_dim
    qw, kw = (torch.randn(out, d, generator=g, dtype=F64) / math.sqrt(d) for _ in range(2))
    qb, kb = (bias_scale * torch.randn(out, generator=g, dtype=F64) for _ in range(2))
    return tuple(t.to(dtype) for t in (qw, qb, kw, kb))


def _homogeneous(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _stats(x):
    xt = _homogeneous(x)
    return xt.T @ xt


def _logits(qw, qb, kw, kb, x, num_heads):
    """Raw per-head logits q·k (before the 1/√d_h scale), shape (H, n, n), as BertSelfAttention computes them."""
    q = x @ qw.T + (0 if qb is None else qb)
    k = x @ kw.T + (0 if kb is None else kb)
    q, k = (t.reshape(x.shape[0], num_heads, -1).transpose(0, 1) for t in (q, k))
    return q @ k.transpose(-1, -2)


def _probs(logits, head_dim):
    return torch.softmax(logits * head_dim**-0.5, dim=-1)


def _bilinear(qw, qb, kw, kb, num_heads):
    """Per-head homogeneous bilinear form G̃ = W̃_Qᵀ W̃_K, shape (H, d+1, d+1)."""
    wq, wk = (
        torch.cat([w, (torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b)[:, None]], 1)
        for w, b in ((qw, qb), (kw, kb))
    )
    wq, wk = (w.to(F64).reshape(num_heads, -1, w.shape[1]) for w in (wq, wk))
    return wq.transpose(-1, -2) @ wk


def _direct_error(g, m, xt):
    """||X̃ᵀ (G̃ − M) X̃||_F² per head straight from the tokens (independent of the stats-based formula)."""
    return (xt @ (g - m) @ xt.T).square().sum(dim=(-2, -1))


@pytest.mark.parametrize("bias_scale", [0.0, 2.0])
def test_full_rank_reproduces_attention_probabilities(bias_scale):
    d, num_heads, head_dim, n = 8, 2, 4, 24
    qw, qb, kw, kb = _weights(d, num_heads, head_dim, seed=0, bias_scale=bias_scale)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
    dense = _logits(qw, qb, kw, kb, x, num_heads)
    new = drone_attention_factorize(qw, qb, kw, kb, _stats(x), num_heads, rank=head_dim)
    assert new[0].shape == (num_heads * head_dim, d) and new[1].shape == (num_heads * head_dim,)
    # Logits themselves are reproduced on the calibration span, not just up to a per-query shift.
    torch.testing.assert_close(_logits(*new, x, num_heads), dense, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        _probs(_logits(*new, x, num_heads), head_dim), _probs(dense, head_dim), rtol=1e-10, atol=1e-12
    )
    if bias_scale:
        # b_K only adds a per-query constant (cancels in softmax); b_Q adds b_Qᵀ W_K x_k, which varies by key.
        torch.testing.assert_close(_probs(_logits(qw, qb, kw, None, x, num_heads), head_dim), _probs(dense, head_dim))
        naive = drone_attention_factorize(qw, None, kw, kb, _stats(x), num_heads, rank=head_dim)
        assert (_probs(_logits(*naive, x, num_heads), head_dim) - _probs(dense, head_dim)).abs().max() > 1e-2


def test_bias_none_and_dtype_preserved():
    d, num_heads, head_dim = 6, 2, 3
    qw, _, kw, _ = _weights(d, num_heads, head_dim, seed=2, dtype=torch.float32)
    x = torch.randn(30, d, generator=torch.Generator().manual_seed(3), dtype=F64)
    new = drone_attention_factorize(qw, None, kw, None, _stats(x), num_heads, rank=head_dim)
    assert all(t.dtype == torch.float32 for t in new)
    xf = x.float()
    torch.testing.assert_close(
        _logits(*new, xf, num_heads), _logits(qw, None, kw, None, xf, num_heads), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("rank", [1, 2])
def test_reduced_rank_error_is_the_optimum(num_heads, rank):
    d, head_dim, n = 4, 3, 7
    qw, qb, kw, kb = _weights(d, num_heads, head_dim, seed=10 + num_heads, bias_scale=0.5)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(rank), dtype=F64) * torch.tensor([3.0, 1, 0.5, 2])
    xt, stats = _homogeneous(x), _stats(x)
    new = drone_attention_factorize(qw, qb, kw, kb, stats, num_heads, rank)
    err = attention_logit_error(qw, qb, kw, kb, *new, stats, num_heads)
    spectrum = attention_spectrum(qw, qb, kw, kb, stats, num_heads)
    assert spectrum.shape == (num_heads, head_dim) and (spectrum[:, :-1] >= spectrum[:, 1:]).all()
    torch.testing.assert_close(err, spectrum[:, rank:].square().sum(-1), rtol=1e-9, atol=1e-12)
    g, m_star = _bilinear(qw, qb, kw, kb, num_heads), _bilinear(*new, num_heads)
    assert torch.linalg.matrix_rank(m_star).max() <= rank
    torch.testing.assert_close(_direct_error(g, m_star, xt), err, rtol=1e-9, atol=1e-12)

    # Random rank-k competitors, including small perturbations of the optimum's own factors.
    gen = torch.Generator().manual_seed(99)
    a_star = torch.cat([new[0], new[1][:, None]], 1).reshape(num_heads, rank, d + 1).transpose(-1, -2)
    b_star = torch.cat([new[2], new[3][:, None]], 1).reshape(num_heads, rank, d + 1).transpose(-1, -2)
    for eps in (10.0, 1e-1, 1e-3, 1e-5):
        a = a_star + eps * torch.randn(200, *a_star.shape, generator=gen, dtype=F64)
        b = b_star + eps * torch.randn(200, *b_star.shape, generator=gen, dtype=F64)
        assert (_direct_error(g, a @ b.transpose(-1, -2), xt) >= err * (1 - 1e-8)).all()

    # Gradient-based search over factors M = A Bᵀ from random starts (float64, L-BFGS), one head at a time because
    # the heads' very different error scales slow a joint solve down.
    best = torch.full((num_heads,), math.inf, dtype=F64)
    for head, _start in itertools.product(range(num_heads), range(3)):
        a = torch.randn(d + 1, rank, generator=gen, dtype=F64).requires_grad_()
        b = torch.randn(d + 1, rank, generator=gen, dtype=F64).requires_grad_()
        opt = torch.optim.LBFGS(
            [a, b],
            lr=1,
            max_iter=1000,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure(opt=opt, head=head, a=a, b=b):
            opt.zero_grad()
            loss = _direct_error(g[head], a @ b.T, xt) / err[head]
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            found = _direct_error(g[head], a @ b.T, xt)
        assert found >= err[head] * (1 - 1e-8)
        best[head] = torch.minimum(best[head], found)
    assert (best <= err * (1 + 1e-6)).all(), (best, err)


@pytest.mark.parametrize("x_kind", ["three_tokens", "all_zero"])
def test_rank_deficient_stats(x_kind):
    d, num_heads, head_dim = 8, 2, 4
    qw, qb, kw, kb = _weights(d, num_heads, head_dim, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, d, generator=gen, dtype=F64) if x_kind == "three_tokens" else torch.zeros(5, d, dtype=F64)
    span = torch.linalg.matrix_rank(_homogeneous(x)).item()
    stats = _stats(x)
    new = drone_attention_factorize(qw, qb, kw, kb, stats, num_heads, rank=head_dim)
    assert all(torch.isfinite(t).all() for t in new)
    torch.testing.assert_close(
        _logits(*new, x, num_heads), _logits(qw, qb, kw, kb, x, num_heads), rtol=1e-9, atol=1e-9
    )
    # The data span is narrower than the head: the surplus query/key dimensions are padded with exact zeros.
    per_head = new[0].reshape(num_heads, head_dim, d)
    per_head_bias = new[1].reshape(num_heads, head_dim)
    assert (per_head[:, span:] == 0).all() and (per_head_bias[:, span:] == 0).all()
    assert (per_head_bias[:, :span] != 0).any()
    assert attention_spectrum(qw, qb, kw, kb, stats, num_heads).shape == (num_heads, min(span, head_dim))
    low = drone_attention_factorize(qw, qb, kw, kb, stats, num_heads, rank=1)
    assert all(torch.isfinite(t).all() for t in low)
    assert torch.isfinite(attention_logit_error(qw, qb, kw, kb, *low, stats, num_heads)).all()


def test_identity_stats_equals_svd_baseline():
    d, num_heads, head_dim = 8, 3, 4
    qw, qb, kw, kb = _weights(d, num_heads, head_dim, seed=6)
    eye = torch.eye(d + 1, dtype=F64)
    g = _bilinear(qw, qb, kw, kb, num_heads)
    u, s, vh = torch.linalg.svd(g)
    torch.testing.assert_close(attention_spectrum(qw, qb, kw, kb, eye, num_heads), s[:, :head_dim])
    for rank in range(1, head_dim + 1):
        m_drone = _bilinear(*drone_attention_factorize(qw, qb, kw, kb, eye, num_heads, rank), num_heads)
        m_svd = _bilinear(*svd_attention_factorize(qw, qb, kw, kb, num_heads, rank), num_heads)
        eckart_young = u[..., :rank] @ torch.diag_embed(s[:, :rank]) @ vh[:, :rank]
        torch.testing.assert_close(m_svd, eckart_young, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(m_drone, m_svd, rtol=1e-9, atol=1e-10)


def test_drone_beats_svd_on_structured_data():
    d, num_heads, head_dim, n = 16, 3, 4, 200
    qw, qb, kw, kb = _weights(d, num_heads, head_dim, seed=7, bias_scale=0.3)
    gen = torch.Generator().manual_seed(8)
    # Tokens near a 2-D affine subspace far from the origin: exactly the structure weight-only SVD ignores.
    x = (
        torch.randn(n, 2, generator=gen, dtype=F64) @ torch.randn(2, d, generator=gen, dtype=F64) * 3
        + torch.randn(d, generator=gen, dtype=F64) * 2
        + 0.05 * torch.randn(n, d, generator=gen, dtype=F64)
    )
    stats = _stats(x)
    scale = attention_spectrum(qw, qb, kw, kb, stats, num_heads).square().sum()
    ratios = []
    for rank in range(1, head_dim + 1):
        drone = drone_attention_factorize(qw, qb, kw, kb, stats, num_heads, rank)
        svd = svd_attention_factorize(qw, qb, kw, kb, num_heads, rank)
        e_drone = attention_logit_error(qw, qb, kw, kb, *drone, stats, num_heads)
        e_svd = attention_logit_error(qw, qb, kw, kb, *svd, stats, num_heads)
        assert (e_drone <= e_svd + 1e-10 * scale).all(), (rank, e_drone, e_svd)
        if rank < head_dim:
            ratios.append((e_drone / e_svd).max().item())
    assert max(ratios) < 0.75  # strictly and substantially better, so DRONE silently degrading to SVD fails here


_QW, _QB, _KW, _KB = _weights(6, 2, 3, seed=0)
_GOOD = _stats(torch.randn(20, 6, generator=torch.Generator().manual_seed(0), dtype=F64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"`rank`.*0 < rank <= head_dim=3.*got 0"),
        ({"rank": 4}, r"`rank`.*head_dim=3.*got 4"),
        ({"rank": 2.0}, r"`rank` must be an int"),
        ({"stats": torch.eye(6, dtype=F64)}, r"`stats` has shape \(6, 6\).*\(7, 7\).*another model"),
        ({"num_heads": 4}, r"out_features=6.*not divisible by `num_heads`=4"),
        ({"num_heads": 0}, r"`num_heads` must be a positive int"),
        ({"stats": _GOOD.clone().fill_diagonal_(float("nan"))}, r"`stats` contains NaN or Inf"),
        ({"stats": torch.zeros(7, 7, dtype=F64)}, r"no positive eigenvalue"),
        ({"stats": torch.diag(torch.tensor([1.0, -1, 1, 1, 1, 1, 1], dtype=F64))}, r"not positive semi-definite"),
        ({"k_weight": _KW[:, :5]}, r"same shape"),
        ({"q_bias": _QB[:4]}, r"`q_bias` must be None or a tensor of shape \(6,\)"),
        ({"rtol": 0.0}, r"`rtol` must be a float in \(0, 1\)"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    args = {
        "q_weight": _QW,
        "q_bias": _QB,
        "k_weight": _KW,
        "k_bias": _KB,
        "stats": _GOOD,
        "num_heads": 2,
        "rank": 2,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        drone_attention_factorize(**args)


def test_invalid_inputs_raise_in_helpers():
    with pytest.raises(ValueError, match=r"`rank`.*got 4"):
        svd_attention_factorize(_QW, _QB, _KW, _KB, 2, 4)
    new = drone_attention_factorize(_QW, _QB, _KW, _KB, _GOOD, 2, 2)
    with pytest.raises(ValueError, match=r"`new_q_weight` has in_features=5"):
        attention_logit_error(_QW, _QB, _KW, _KB, new[0][:, :5], new[1], new[2][:, :5], new[3], _GOOD, 2)
    with pytest.raises(ValueError, match=r"`stats` has shape"):
        attention_spectrum(_QW, _QB, _KW, _KB, _GOOD[:6, :6], 2)
