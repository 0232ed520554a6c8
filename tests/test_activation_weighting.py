"""`method="drone-act"`: DRONE with the outputs of the FFN's first linear weighted by the activation's slope."""

import math

import pytest
import torch
from transformers.activations import ACT2FN

import drone_hf
from drone_hf.factorize import DroneDecomposition, activation_slope, drone_factorize
from drone_hf.targets import encoder_linear_roles, feeds_activation

from .testing_utils import tiny_batches, tiny_config, tiny_teacher


def _case(out_features=5, in_features=6, tokens=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, in_features, dtype=torch.float64)
    x = torch.randn(in_features, tokens, generator=g, dtype=torch.float64) * scales[:, None] + 0.5
    weight = torch.rand(out_features, generator=g, dtype=torch.float64) * 3 + 0.05
    return w, x, weight


def _weighted_error(w, m, x, weight):
    return float(torch.linalg.norm(weight[:, None] * ((w - m) @ x)) ** 2)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_output_weighted_drone_is_the_optimum_of_the_weighted_error(rank):
    w, x, weight = _case()
    decomposition = DroneDecomposition(w, x @ x.T, output_weight=weight)
    down, up = decomposition.factors(rank)
    best = _weighted_error(w, up @ down, x, weight)
    assert best == pytest.approx(decomposition.error(rank), rel=1e-9)
    # Plain DRONE (the optimum of the unweighted error) is worse on the weighted one...
    plain_down, plain_up = drone_factorize(w, x @ x.T, rank)
    assert best < _weighted_error(w, plain_up @ plain_down, x, weight) * (1 - 1e-6)
    # ... and so is every perturbation of the optimum's factors.
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        d = down + 1e-3 * torch.randn(down.shape, generator=g, dtype=torch.float64)
        u = up + 1e-3 * torch.randn(up.shape, generator=g, dtype=torch.float64)
        assert _weighted_error(w, u @ d, x, weight) >= best * (1 - 1e-12)


def test_a_constant_output_weight_is_plain_drone():
    w, x, _ = _case()
    down, up = DroneDecomposition(w, x @ x.T, output_weight=torch.full((5,), 3.0)).factors(2)
    plain_down, plain_up = drone_factorize(w, x @ x.T, 2)
    torch.testing.assert_close(up @ down, plain_up @ plain_down, rtol=1e-10, atol=1e-12)


def test_a_zero_output_weight_leaves_that_output_free_and_the_factors_finite():
    w, x, weight = _case()
    weight[0] = 0.0
    down, up = DroneDecomposition(w, x @ x.T, output_weight=weight).factors(4)
    assert torch.isfinite(down).all() and torch.isfinite(up).all()
    # The four weighted outputs get the four ranks: they are reproduced exactly on the data.
    torch.testing.assert_close((up @ down @ x)[1:], (w @ x)[1:], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize(
    ("output_weight", "match"),
    [
        (torch.ones(4), r"one entry per output \(5,\)"),
        (torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]), "non-negative"),
        (torch.tensor([1.0, math.nan, 1.0, 1.0, 1.0]), "finite"),
        (torch.zeros(5), "not all zero"),
    ],
)
def test_bad_output_weight(output_weight, match):
    w, x, _ = _case()
    with pytest.raises(ValueError, match=match):
        DroneDecomposition(w, x @ x.T, output_weight=output_weight)


def _population_stats(mean, covariance, count=1000.0):
    # The augmented statistic of inputs with exactly this mean and covariance.
    moment = covariance + torch.outer(mean, mean)
    top = torch.cat([moment, mean[:, None]], 1)
    return count * torch.cat([top, torch.cat([mean, torch.ones(1, dtype=mean.dtype)])[None]], 0)


def _pre_activation(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    mean = torch.randn(3, generator=g, dtype=torch.float64)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    covariance = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64)
    return w, b, _population_stats(mean, covariance), w @ mean + b, ((w @ covariance) * w).sum(1).sqrt()


def test_activation_slope_uses_the_pre_activation_s_mean_and_variance():
    # f(z) = z^2 / 2 has f'(z) = z, so E[f'(z)^2] = mu^2 + sigma^2 exactly (the quadrature is exact on polynomials).
    w, b, stats, mu, sigma = _pre_activation()
    torch.testing.assert_close(activation_slope(w, b, stats, lambda z: z * z / 2), (mu**2 + sigma**2).sqrt())
    # f = exp: E[exp(z)^2] = exp(2 mu + 2 sigma^2), so the root is exp(mu + sigma^2).
    scaled = w / 4  # keeps sigma near 1, where 48 nodes are accurate
    slope = activation_slope(scaled, None, stats, torch.exp)
    mean = scaled @ (stats[:-1, -1] / stats[-1, -1])
    variance = ((scaled @ (stats[:-1, :-1] / stats[-1, -1])) * scaled).sum(1) - mean**2
    torch.testing.assert_close(slope, torch.exp(mean + variance), rtol=1e-9, atol=0)


def test_activation_slope_of_gelu_matches_numerical_integration():
    w, b, stats, mu, sigma = _pre_activation(seed=2)
    gelu = ACT2FN["gelu"]
    t = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    density = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    expected = []
    for m, s in zip(mu.tolist(), sigma.tolist(), strict=True):
        z = (m + s * t).requires_grad_(True)
        (slope,) = torch.autograd.grad(gelu(z).sum(), z)
        expected.append(float(torch.trapezoid(slope**2 * density, t)) ** 0.5)
    expected = torch.tensor(expected, dtype=torch.float64)
    # GELU's slope turns within about one unit of 0, sharp against these sigmas (0.7-2.4): 48 points get within 0.1%
    # (a weight, not a result), and more points converge.
    torch.testing.assert_close(activation_slope(w, b, stats, gelu), expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(activation_slope(w, b, stats, gelu, nodes=300), expected, rtol=2e-5, atol=0)
    # A linear activation has slope 1 everywhere; no bias means mean w^T m.
    torch.testing.assert_close(activation_slope(w, None, stats, lambda z: 2 * z), torch.full((4,), 2.0).double())


def test_activation_slope_bad_input():
    w, b, stats, _, _ = _pre_activation()
    with pytest.raises(ValueError, match=r"`stats` must be \(4, 4\)"):
        activation_slope(w, b, stats[:3, :3], torch.relu)
    with pytest.raises(ValueError, match="0 tokens"):
        activation_slope(w, b, torch.zeros_like(stats), torch.relu)


@pytest.mark.parametrize(
    ("model_type", "attribute"),
    [("bert", "hidden_act"), ("distilbert", "activation"), ("mpnet", "hidden_act"), ("albert", "hidden_act")],
)
def test_only_the_ffn_s_first_linear_feeds_the_family_s_activation(model_type, attribute):
    from transformers import AutoModel

    model = AutoModel.from_config(tiny_config(model_type))
    roles = encoder_linear_roles(model)
    expected = ACT2FN[getattr(model.config, attribute)]
    for name, role in roles.items():
        activation = feeds_activation(model, name)
        if role == "intermediate":
            assert type(activation) is type(expected)
        else:
            assert activation is None, name


def test_a_gated_mlp_feeds_no_elementwise_activation():
    from transformers import AutoModel

    model = AutoModel.from_config(tiny_config("modernbert"))
    assert all(feeds_activation(model, name) is None for name in encoder_linear_roles(model))


def test_drone_act_weights_only_the_intermediate_linears():
    model = tiny_teacher(hidden_act="gelu").eval()
    batches = tiny_batches(num_rows=40, seq_len=9)
    stats = drone_hf.collect_activation_stats(model, batches)
    kwargs = {"rank": 4, "attention": False}
    act = drone_hf.compress_model(model, stats, method="drone-act", **kwargs)
    plain = drone_hf.compress_model(model, stats, method="drone", **kwargs)
    assert act.config.drone_method == "drone-act"
    roles = encoder_linear_roles(model)
    gelu = ACT2FN["gelu"]
    for name, role in roles.items():
        a, p = act.get_submodule(name), plain.get_submodule(name)
        if role != "intermediate":
            assert torch.equal(a.down.weight, p.down.weight) and torch.equal(a.up.weight, p.up.weight), name
            continue
        dense = model.get_submodule(name)
        weight, bias = dense.weight.detach(), dense.bias.detach()
        slope = activation_slope(weight, bias, stats[name], gelu)
        down, up = DroneDecomposition(weight, stats[name].double()[:-1, :-1], output_weight=slope).factors(4)
        torch.testing.assert_close(a.down.weight, down)
        torch.testing.assert_close(a.up.weight, up)
        # The slope-weighted error on the calibration inputs is lower than plain DRONE's.
        moment = stats[name].double()[:-1, :-1]

        def weighted(module, slope=slope, moment=moment, weight=weight):
            diff = slope[:, None] * (
                weight.double() - module.up.weight.detach().double() @ module.down.weight.detach().double()
            )
            return float(torch.einsum("oi,ij,oj->", diff, moment, diff))

        assert weighted(a) < weighted(p)


def test_the_sequential_refit_is_refused_with_drone_act():
    model = tiny_teacher(hidden_act="gelu").eval()
    batches = tiny_batches(num_rows=16, seq_len=9)
    stats = drone_hf.collect_activation_stats(model, batches)
    with pytest.raises(ValueError, match="would undo method='drone-act'"):
        drone_hf.compress_model(
            model, stats, method="drone-act", rank=4, sequential=True, calibration_dataloader=batches
        )
    with pytest.raises(ValueError, match="would undo method='drone-act'"):
        drone_hf.allocate_ranks(
            model,
            stats,
            method="drone-act",
            max_accuracy_drop=1.0,
            eval_dataloader=batches,
            sequential_dataloader=batches,
        )
