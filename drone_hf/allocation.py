"""Rank allocation from the closed form's residual energy (no evaluations needed)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch


def breakeven_rank(out_features: int, in_features: int) -> int:
    """Largest rank at which a factored pair is still cheaper than the dense layer: `k (in + out) < in * out`."""
    return (in_features * out_features - 1) // (in_features + out_features)


def allocate_by_energy(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    param_ratio: float,
    *,
    multiple: int = 8,
) -> dict[str, int]:
    r"""
    Chooses per-module ranks that keep at most `param_ratio` of the modules' weight parameters while discarding as
    little *relative* residual energy as possible.

    Each module's error at rank `k` is the sum of its discarded squared singular values (DRONE's `Z`, or `W` for SVD),
    normalised by the module's total so modules of different scale compare. Ranks grow greedily in steps of
    `multiple`, always where the next step removes the most relative energy per parameter. A module that would reach
    its break-even rank is left dense (it costs `in * out` and loses nothing).

    Args:
        spectra (`Mapping[str, Tensor]`): Module name -> singular values, descending.
        shapes (`Mapping[str, tuple[int, int]]`): Module name -> `(out_features, in_features)`.
        param_ratio (`float`): Fraction in `(0, 1)` of the modules' weight parameters to keep.
        multiple (`int`, *optional*, defaults to 8): Ranks are multiples of this (hardware-friendly).

    Returns:
        `dict[str, int]`: Ranks of the modules to factor; modules left dense are absent.

    Raises:
        `ValueError`: if `param_ratio` is outside `(0, 1)` or too small for rank `multiple` everywhere.
    """
    if isinstance(param_ratio, bool) or not isinstance(param_ratio, (int, float)) or not 0 < param_ratio < 1:
        raise ValueError(f"`param_ratio` must be a float in (0, 1), got {param_ratio!r}.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"`multiple` must be a positive int, got {multiple!r}.")
    dense = {name: out * inp for name, (out, inp) in shapes.items()}
    budget = param_ratio * sum(dense.values())
    # Modules too small to factor at rank `multiple` start (and stay) dense.
    ranks = {name: multiple if multiple <= breakeven_rank(*shape) else None for name, shape in shapes.items()}
    used = sum(dense[name] if rank is None else rank * sum(shapes[name]) for name, rank in ranks.items())
    if used > budget:
        raise ValueError(
            f"`param_ratio={param_ratio}` cannot be met: even rank {multiple} everywhere keeps "
            f"{used / sum(dense.values()):.3f} of the parameters."
        )
    energy = {name: (s.double() ** 2) for name, s in spectra.items()}
    total = {name: float(e.sum()) or 1.0 for name, e in energy.items()}

    def step(name: str):
        """(-relative gain per parameter, cost, new rank or None for dense) of growing `name` by one step."""
        rank, (out, inp) = ranks[name], shapes[name]
        new = rank + multiple
        if new > breakeven_rank(out, inp):  # the next step makes the layer dense: all energy, full cost
            gain, cost, new = float(energy[name][rank:].sum()), dense[name] - rank * (out + inp), None
        else:
            gain, cost = float(energy[name][rank:new].sum()), multiple * (out + inp)
        return -gain / total[name] / cost, cost, new

    heap = []
    for name in shapes:
        if ranks[name] is not None:
            gain, cost, new = step(name)
            heap.append((gain, cost, name, new))
    heapq.heapify(heap)
    while heap:
        neg_gain, cost, name, new = heapq.heappop(heap)
        if used + cost > budget:
            continue  # this step does not fit; a cheaper step elsewhere still may
        used += cost
        ranks[name] = new
        if new is not None:
            gain, cost, new = step(name)
            heapq.heappush(heap, (gain, cost, name, new))
    return {name: rank for name, rank in ranks.items() if rank is not None}


__all__ = ["allocate_by_energy", "breakeven_rank"]
