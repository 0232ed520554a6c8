"""The modules a rank allocation chooses between (encoder linears and attention-score blocks), with cached
decompositions so the replacement module at any rank is cheap to build, and the swaps that try them in place."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers.utils import logging

from .layers import DroneLinear
from .methods import get_method
from .structure import attention_geometry, narrowed_attention_block, qk_linear_names, swap_module
from .targets import attention_block_names, encoder_linear_layers, feeds_activation, resolve_target_modules


logger = logging.get_logger(__name__)
_FRACTIONS = (1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8)


def decompose_linear(model, method, name: str, stats: torch.Tensor | None):
    """The rank-independent decomposition of the linear `name` of `model` by `method` (a `FactorizationMethod`).

    Raises:
        `ValueError`: the method's complaint about `stats`, prefixed with `stats[name]`.
    """
    layer = model.get_submodule(name)
    bias = None if layer.bias is None else layer.bias.detach()
    # Only methods that declare it get the activation (a method registered by a user keeps its 3-argument form).
    extra = {"activation": feeds_activation(model, name)} if getattr(method, "activation_aware", False) else {}
    try:
        return method.decompose(layer.weight.detach(), bias, stats, **extra)
    except ValueError as error:
        raise ValueError(f"`stats[{name!r}]`: {error}") from error


def breakeven_rank(out_features: int, in_features: int) -> int:
    """Largest rank at which a factored pair is still cheaper than the dense layer: `k (in + out) < in * out`."""
    return (in_features * out_features - 1) // (in_features + out_features)


def relative_tail(energy: torch.Tensor) -> Callable[[int | None], float]:
    """`k -> ` discarded energy beyond rank `k` over the total (`None`, i.e. dense, discards nothing)."""
    total = float(energy.sum()) or 1.0
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).tolist() + [0.0]
    return lambda k: 0.0 if k is None else tail[min(k, len(tail) - 1)] / total


def _default_grid(limit: int, multiple: int) -> list[int]:
    return sorted({max(multiple, int(round(limit * f / multiple)) * multiple) for f in _FRACTIONS} - {0}) or [1]


class Candidates:
    """The modules an allocation chooses ranks for: encoder linears and (optionally) whole attention-score blocks,
    whose query/key linears they replace. Holds cached decompositions so any rank's module is cheap to build."""

    def __init__(
        self, model, stats, *, method, attention, target_modules, rank_grid, rank_multiple, seq_len, kernel_costs=None
    ):
        self.model, self.seq_len = model, seq_len
        self.kernel_costs = kernel_costs  # a KernelCosts: grids keep measured-paying ranks, shares are measured time
        self.method = get_method(method)
        targets = resolve_target_modules(model, target_modules)
        blocks = [
            block
            for block in (attention_block_names(model) if attention else [])
            if all(name in targets for name in qk_linear_names(model, block))
        ]
        self.qk = {block: qk_linear_names(model, block) for block in blocks}
        replaced = {name for names in self.qk.values() for name in names}
        self.linears = [name for name in targets if name not in replaced]
        self.blocks = blocks
        self.names = self.linears + blocks
        layers = encoder_linear_layers(model)
        self.layer = {name: layers[name] for name in self.names}
        self.stats = stats
        self._decompositions = {}
        # Built factors by (name, rank), least recently used first: a search scores the same modules at the same
        # ranks over and over (every joint check rebuilds its whole assignment, and the bisection's steps share most
        # of it); at base size rebuilding an assignment took about 3 s (8-90 ms a linear, ~160 ms an attention block).
        self._factors: OrderedDict[tuple[str, int], tuple] = OrderedDict()
        self.grid, self.shape = {}, {}
        for name in self.linears:
            out_f, in_f = model.get_submodule(name).weight.shape
            self.shape[name] = (out_f, in_f)
            limit = breakeven_rank(out_f, in_f)
            grid = _default_grid(limit, rank_multiple) if rank_grid is None else list(rank_grid)
            self.grid[name] = sorted({k for k in grid if isinstance(k, int) and 0 < k <= limit})
        if rank_grid is not None:
            self._report_grid(rank_grid)
        if kernel_costs is not None:  # measured in the deployment form: only ranks whose kernels beat the dense one
            for name in self.linears:
                self.grid[name] = kernel_costs.paying_ranks(*self.shape[name], self.grid[name])
        for block in blocks:
            query, _, num_heads, head = attention_geometry(model, block)
            self.grid[block] = sorted({max(1, round(head * f)) for f in _FRACTIONS} - {head})
            if kernel_costs is not None:
                self.grid[block] = kernel_costs.paying_qk_ranks(query.in_features, num_heads, head, self.grid[block])
        self.names = [name for name in self.names if self.grid[name]]

    def _report_grid(self, rank_grid) -> None:
        """Says which linears a user's `rank_grid` leaves without a rank (every rank above their break-even rank,
        where a factored pair stops being cheaper): an error when that is every candidate, else a warning."""
        above = [name for name in self.linears if not self.grid[name]]
        if not above:
            return
        limits = {name: breakeven_rank(*self.shape[name]) for name in above}
        name = max(limits, key=limits.get)
        detail = (
            f"`rank_grid={list(rank_grid)}` has no rank at or below the break-even rank (where a factored pair stops "
            f"being cheaper than the dense layer, k*(in+out) >= in*out) of {len(above)} of {len(self.linears)} "
            f"linears; the largest such break-even rank is {limits[name]} (`{name}`, "
            f"{self.shape[name][0]}x{self.shape[name][1]})"
        )
        if len(above) == len(self.linears):
            raise ValueError(f"{detail}: nothing is left to compress. Pass ranks at or below {limits[name]}.")
        logger.warning(f"{detail}; they stay dense. Add smaller ranks to `rank_grid` to compress them.")

    def block_stats(self, block):
        """The statistics of an attention block's (shared) query/key input, or None for a data-free method."""
        return self.stats[self.qk[block][0]] if self.method.data_aware else None

    # ----- factors and modules -----
    def _decomposition(self, name):
        if name not in self._decompositions:
            stats = self.stats[name] if self.method.data_aware else None
            self._decompositions[name] = decompose_linear(self.model, self.method, name, stats)
        return self._decompositions[name]

    @property
    def decompositions(self) -> dict:
        """The decompositions computed so far (linear name -> the method's decomposition), as a new dict."""
        return dict(self._decompositions)

    def _qk_tensors(self, block):
        query, key, num_heads, _ = attention_geometry(self.model, block)
        tensors = (query.weight, query.bias, key.weight, key.bias)
        return tuple(t.detach() for t in tensors), num_heads

    def factors(self, name, rank) -> tuple:
        """The factors of `name` at `rank`: `(down, up, bias)` of a linear, `(q_weight, q_bias, k_weight, k_bias)` of
        an attention block. Kept for the `2 * len(names)` (name, rank) pairs used last; [`module`] builds from them."""
        key = (name, rank)
        if key in self._factors:
            self._factors.move_to_end(key)
            return self._factors[key]
        if name in self.blocks:
            tensors, num_heads = self._qk_tensors(name)
            factors = self.method.factor_attention(tensors, self.block_stats(name), num_heads, rank)
        else:
            factors = self._decomposition(name).factors(rank)
        self._factors[key] = factors
        while len(self._factors) > 2 * len(self.names):
            self._factors.popitem(last=False)
        return factors

    def module(self, name, rank):
        """A new replacement module for `name` at `rank` (a DroneLinear, or the attention block with narrowed
        query/key projections), from [`factors`]."""
        factors = self.factors(name, rank)
        if name in self.blocks:
            return narrowed_attention_block(self.model, name, rank, factors).eval()
        old = self.model.get_submodule(name)
        return DroneLinear.from_factors(*factors).to(old.weight.device)

    # ----- closed-form losses and costs -----
    def energy_loss(self, name) -> Callable[[int | None], float]:
        if name in self.blocks:
            tensors, num_heads = self._qk_tensors(name)
            return relative_tail(self.method.attention_energy(tensors, self.block_stats(name), num_heads))
        return relative_tail(self._decomposition(name).energy)

    def params(self, name, rank) -> int:
        if name in self.blocks:
            query, _, num_heads, head = attention_geometry(self.model, name)
            width = num_heads * (head if rank is None else rank)
            return 2 * query.in_features * width
        out_f, in_f = self.shape[name]
        return out_f * in_f if rank is None else rank * (out_f + in_f)

    def macs(self, name, rank) -> int:
        """Multiply-adds per sequence of `seq_len` tokens (attention blocks: Q/K projections and scores; the scores
        at the full head width at any rank, as [`DroneQKLinear`] pads each head back and they run at that width)."""
        if name in self.blocks:
            _, _, num_heads, head = attention_geometry(self.model, name)
            return self.seq_len * self.params(name, rank) + self.seq_len**2 * num_heads * head
        return self.seq_len * self.params(name, rank)

    def dense_cost(self, name) -> float:
        """The dense module's cost for splitting a budget: measured seconds in the deployment form with
        `kernel_costs`, else multiply-adds at `seq_len` tokens (see [`cost_model`])."""
        if self.kernel_costs is None:
            return self.macs(name, None)
        if name in self.blocks:
            query, _, num_heads, head = attention_geometry(self.model, name)
            return self.kernel_costs.dense_attention_seconds(query.in_features, num_heads, head)
        return self.kernel_costs.dense_linear_seconds(*self.shape[name])

    def cost(self, name, rank) -> float:
        """The cost of `name` at `rank` (`None`: dense) in the units of [`dense_cost`]: measured seconds in the
        deployment form with `kernel_costs` (an attention block: its query/key projections), else multiply-adds."""
        if self.kernel_costs is None:
            return self.macs(name, rank)
        if name in self.blocks:
            query, _, num_heads, head = attention_geometry(self.model, name)
            return 2 * self.kernel_costs.seconds("qk", (query.in_features, num_heads, head), [rank])[rank]
        return self.kernel_costs.seconds("linear", self.shape[name], [rank])[rank]

    @property
    def cost_model(self) -> str:
        """What [`dense_cost`] counts, for reports."""
        if self.kernel_costs is None:
            return f"multiply-adds at {self.seq_len} tokens"
        return self.kernel_costs.describe()


def apply_ranks(model, candidates: Candidates, ranks: Mapping[str, int]) -> dict[str, nn.Module]:
    # Attention blocks before linears, so a factored value linear lands inside its new block.
    ordered = sorted(ranks, key=lambda n: n not in candidates.blocks)
    return {name: swap_module(model, name, candidates.module(name, ranks[name])) for name in ordered}


def restore_modules(model, originals: Mapping[str, nn.Module]) -> None:
    for name in reversed(list(originals)):
        swap_module(model, name, originals[name])


__all__ = [
    "Candidates",
    "apply_ranks",
    "breakeven_rank",
    "decompose_linear",
    "relative_tail",
    "restore_modules",
    "swap_module",
]
