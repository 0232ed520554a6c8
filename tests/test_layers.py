import pytest
import torch
from torch import nn

from drone_hf import DroneLinear


def test_full_rank_from_linear_reproduces_dense_output():
    dense = nn.Linear(16, 12)
    layer = DroneLinear.from_linear(dense, rank=12)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_low_rank_from_linear_is_truncated_svd():
    dense = nn.Linear(16, 12)
    layer = DroneLinear.from_linear(dense, rank=4)
    u, s, vt = torch.linalg.svd(dense.weight.detach().double())
    torch.testing.assert_close(layer.to_dense().weight.double(), (u[:, :4] * s[:4]) @ vt[:4], rtol=1e-5, atol=1e-6)


def test_to_dense_inverts_from_factors():
    down, up, bias = torch.randn(3, 10), torch.randn(8, 3), torch.randn(8)
    layer = DroneLinear.from_factors(down, up, bias)
    dense = layer.to_dense()
    torch.testing.assert_close(dense.weight, up @ down)
    torch.testing.assert_close(dense.bias, bias)
    x = torch.randn(4, 10)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)


def test_parameter_names_and_counts():
    layer = DroneLinear(10, 8, rank=3)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "down.weight": (3, 10),
        "up.weight": (8, 3),
        "up.bias": (8,),
    }
    assert DroneLinear(10, 8, rank=3, bias=False).up.bias is None


def test_repr_shows_rank():
    assert "in_features=10, out_features=8, rank=3" in repr(DroneLinear(10, 8, rank=3))


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 8\]"):
        DroneLinear(10, 8, rank=rank)


def test_bad_factor_shapes():
    with pytest.raises(ValueError, match="same rank"):
        DroneLinear.from_factors(torch.randn(3, 10), torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"`bias` must have shape \(8,\)"):
        DroneLinear.from_factors(torch.randn(3, 10), torch.randn(8, 3), torch.randn(7))


def test_balance_keeps_the_product_and_equalises_each_components_norms():
    """Factors scaled as DRONE's are (`up` ~ the data's scale, `down` ~ its inverse); one component is zero."""
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(4, 6, generator=generator) * torch.tensor([1e-3, 1e-2, 1.0, 0.0])[:, None]
    up = torch.randn(5, 4, generator=generator) * torch.tensor([1e3, 1e2, 1.0, 3.0])[None, :]
    layer = DroneLinear.from_factors(down, up, torch.randn(5, generator=generator))
    before = layer.to_dense().weight.detach().clone()
    assert layer.balance_() is layer
    torch.testing.assert_close(layer.to_dense().weight, before, rtol=1e-6, atol=1e-6)
    down_norms, up_norms = layer.down.weight.norm(dim=1), layer.up.weight.norm(dim=0)
    torch.testing.assert_close(down_norms[:3], up_norms[:3], rtol=1e-5, atol=0)
    assert down_norms[3] == 0 and torch.equal(layer.up.weight[:, 3], up[:, 3])  # a zero component is left alone
    unbalanced = torch.tensor([down[i].norm() / up[:, i].norm() for i in range(2)])
    assert unbalanced.max() < 1e-2  # the first two were far from balanced
