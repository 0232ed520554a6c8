"""The modules a rank allocation chooses between (encoder linears and attention-score blocks), with cached
decompositions so the replacement module at any rank is cheap to build, and the swaps that try them in place."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .attention import DroneBertSelfAttention
from .calibration import split_stats
from .factorize import DroneDecomposition, centred_scatter, svd_factorize, svd_spectrum
from .factorize_attention import attention_spectrum, drone_attention_factorize, svd_attention_factorize
from .layers import DroneLinear
from .targets import attention_block_names, encoder_linear_roles, resolve_target_modules


_FRACTIONS = (1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8)


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
        self, model, stats, *, method, attention, target_modules, rank_grid, rank_multiple, seq_len, bias_correction
    ):
        self.model, self.method, self.seq_len, self.bias_correction = model, method, seq_len, bias_correction
        roles = encoder_linear_roles(model)
        targets = resolve_target_modules(model, target_modules)
        blocks = [b for b in attention_block_names(model) if f"{b}.query" in targets and f"{b}.key" in targets]
        blocks = blocks if attention else []
        qk = {f"{b}.{p}" for b in blocks for p in ("query", "key")}
        self.linears = [name for name in targets if name not in qk]
        self.blocks = blocks
        self.names = self.linears + blocks
        self.layer = {name: int(name.split(".encoder.layer.")[1].split(".")[0]) for name in self.names}
        self.stats = stats
        self._decompositions: dict[str, DroneDecomposition] = {}
        self._means: dict[str, torch.Tensor] = {}
        self.grid, self.shape = {}, {}
        for name in self.linears:
            out_f, in_f = model.get_submodule(name).weight.shape
            self.shape[name] = (out_f, in_f)
            limit = breakeven_rank(out_f, in_f)
            grid = _default_grid(limit, rank_multiple) if rank_grid is None else list(rank_grid)
            self.grid[name] = sorted({k for k in grid if isinstance(k, int) and 0 < k <= limit})
        for block in blocks:
            head = model.get_submodule(block).attention_head_size
            self.grid[block] = sorted({max(1, round(head * f)) for f in _FRACTIONS} - {head})
        self.names = [name for name in self.names if self.grid[name]]
        self.roles = roles

    # ----- factors and modules -----
    def _decomposition(self, name):
        if name not in self._decompositions:
            weight = self.model.get_submodule(name).weight.detach()
            if self.bias_correction:
                moment, self._means[name] = centred_scatter(self.stats[name])
            else:
                moment = split_stats(self.stats[name])[0]
            self._decompositions[name] = DroneDecomposition(weight, moment)
        return self._decompositions[name]

    def module(self, name, rank):
        """The replacement module for `name` at `rank` (a DroneLinear or a DroneBertSelfAttention)."""
        old = self.model.get_submodule(name)
        if name in self.blocks:
            args = (old.query.weight.detach(), old.query.bias.detach(), old.key.weight.detach(), old.key.bias.detach())
            if self.method == "svd":
                q_w, q_b, k_w, k_b = svd_attention_factorize(*args, old.num_attention_heads, rank)
            else:
                stats = self.stats[f"{name}.query"]
                q_w, q_b, k_w, k_b = drone_attention_factorize(*args, stats, old.num_attention_heads, rank)
            new = DroneBertSelfAttention(old.config, rank, is_causal=old.is_causal, layer_idx=old.layer_idx)
            new.to(old.query.weight)
            new.value = old.value
            with torch.no_grad():
                for target, value in (
                    (new.query.weight, q_w),
                    (new.query.bias, q_b),
                    (new.key.weight, k_w),
                    (new.key.bias, k_b),
                ):
                    target.copy_(value)
            return new.eval()
        bias = None if old.bias is None else old.bias.detach()
        if self.method == "svd":
            down, up = svd_factorize(old.weight.detach(), rank)
        else:
            down, up = self._decomposition(name).factors(rank)
            if name in self._means and bias is not None:  # bias correction: fold (W - M) mu into the bias
                bias = bias + ((old.weight.detach().double() - up.double() @ down.double()) @ self._means[name]).to(
                    bias
                )
        return DroneLinear.from_factors(down, up, bias).to(old.weight.device)

    # ----- closed-form losses and costs -----
    def energy_loss(self, name) -> Callable[[int | None], float]:
        module = self.model.get_submodule(name)
        if name in self.blocks:
            args = (module.query.weight, module.query.bias, module.key.weight, module.key.bias)
            args = tuple(t.detach() for t in args)
            stats = self.stats[f"{name}.query"] if self.method == "drone" else torch.eye(args[0].shape[1] + 1)
            energy = (attention_spectrum(*args, stats.double(), module.num_attention_heads) ** 2).sum(0)
        elif self.method == "svd":
            energy = svd_spectrum(module.weight.detach()) ** 2
        else:
            energy = self._decomposition(name).sigma ** 2
        return relative_tail(energy)

    def params(self, name, rank) -> int:
        if name in self.blocks:
            block = self.model.get_submodule(name)
            width = block.all_head_size if rank is None else block.num_attention_heads * rank
            return 2 * block.query.in_features * width
        out_f, in_f = self.shape[name]
        return out_f * in_f if rank is None else rank * (out_f + in_f)

    def macs(self, name, rank) -> int:
        """Multiply-adds per sequence of `seq_len` tokens (attention blocks: Q/K projections and scores)."""
        if name in self.blocks:
            block = self.model.get_submodule(name)
            width = block.all_head_size if rank is None else block.num_attention_heads * rank
            return self.seq_len * 2 * block.query.in_features * width + self.seq_len**2 * width
        return self.seq_len * self.params(name, rank)

    def time_entries(self) -> dict[str, list[str]]:
        return {name: ([f"+{name}", f"-{name}.value"] if name in self.blocks else [f"+{name}"]) for name in self.names}


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    old = model.get_submodule(name)
    model.set_submodule(name, module)
    return old


def apply_ranks(model, candidates: Candidates, ranks: Mapping[str, int]) -> dict[str, nn.Module]:
    # Attention blocks before linears, so a factored value linear lands inside its new block.
    ordered = sorted(ranks, key=lambda n: n not in candidates.blocks)
    return {name: swap_module(model, name, candidates.module(name, ranks[name])) for name in ordered}


def restore_modules(model, originals: Mapping[str, nn.Module]) -> None:
    for name in reversed(list(originals)):
        swap_module(model, name, originals[name])


__all__ = ["Candidates", "apply_ranks", "breakeven_rank", "relative_tail", "restore_modules", "swap_module"]
