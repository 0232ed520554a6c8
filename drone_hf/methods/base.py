"""The interface every factorisation method implements, and the registry."""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch


AttentionFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""`(q_weight, q_bias, k_weight, k_bias)` of a narrowed query/key pair: `(heads * rank, hidden)`, `(heads * rank,)`."""


class LinearDecomposition:
    r"""
    The rank-independent part of one linear's factorisation.

    Attributes:
        energy (`Tensor`): Descending energies (squared singular values) of the quantity the method truncates;
            `energy[k:].sum()` is what rank `k` discards, the allocation's closed-form loss.
    """

    energy: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(down, up, bias)` at `rank`, in the weight's dtype (`bias` is the layer's bias, possibly corrected)."""
        raise NotImplementedError


class FactorizationMethod:
    r"""
    A factorisation method: a name, whether it needs calibration statistics, and how it factors a linear and an
    attention block's query/key pair.

    Statistics are the augmented `(in+1) x (in+1)` float64 second moments of `collect_activation_stats`.
    """

    name: ClassVar[str]
    data_aware: ClassVar[bool]
    description: ClassVar[str] = ""
    activation_aware: ClassVar[bool] = False
    """Whether `decompose` takes `activation=`: the elementwise activation the linear's output feeds (the FFN's first
    linear; `None` for the others), passed by the engine from the family's spec."""

    def decompose(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: torch.Tensor | None
    ) -> LinearDecomposition:
        raise NotImplementedError

    def factor_attention(
        self, tensors: AttentionFactors, stats: torch.Tensor | None, num_heads: int, rank: int
    ) -> AttentionFactors:
        raise NotImplementedError

    def attention_energy(self, tensors: AttentionFactors, stats: torch.Tensor | None, num_heads: int) -> torch.Tensor:
        """Per-rank energies of the attention block (summed over heads), descending."""
        raise NotImplementedError


_METHODS: dict[str, type[FactorizationMethod]] = {}


def register_method(cls: type[FactorizationMethod], *, exist_ok: bool = False) -> type[FactorizationMethod]:
    """Registers a [`FactorizationMethod`] subclass under its `name` (keyword-free, validated before anything changes).

    Raises:
        `TypeError`: if `cls` is not a `FactorizationMethod` subclass with a `name` and `data_aware`.
        `ValueError`: if another class already has that name and `exist_ok` is False.
    """
    if not (isinstance(cls, type) and issubclass(cls, FactorizationMethod)):
        raise TypeError(f"`cls` must be a FactorizationMethod subclass, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not isinstance(getattr(cls, "data_aware", None), bool):
        raise TypeError(f"{cls.__name__} must define a non-empty `name` and a bool `data_aware`.")
    if name in _METHODS and _METHODS[name] is not cls and not exist_ok:
        raise ValueError(f"A factorisation method named {name!r} is already registered ({_METHODS[name].__name__}).")
    _METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> FactorizationMethod:
    """An instance of the method registered as `name`.

    Raises:
        `ValueError`: naming the value and the registered methods.
    """
    if not isinstance(name, str) or name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=2) if isinstance(name, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown `method` {name!r}; expected one of {list(_METHODS)}.{hint}")
    return _METHODS[name]()


__all__ = [
    "AttentionFactors",
    "FactorizationMethod",
    "LinearDecomposition",
    "get_method",
    "method_names",
    "register_method",
]
