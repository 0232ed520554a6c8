"""Rank allocation: from a budget (accuracy drop, speed-up or parameter ratio) to per-module ranks.

`allocate_by_energy` and the `target_speedup` / `param_ratio` paths of [`allocate_ranks`] need no evaluation: they use
the closed form's residual energy. The `max_accuracy_drop` path follows the DRONE appendix: measure each module's
drop alone on held-out data, split the budget by measured time share, pick the smallest rank within each share,
then check the combination jointly and adjust.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .attention import DroneBertSelfAttention
from .calibration import split_stats
from .factorize import DroneDecomposition, centred_scatter, svd_factorize, svd_spectrum
from .factorize_attention import attention_spectrum, drone_attention_factorize, svd_attention_factorize
from .heldout import LayerwiseEvaluator, MetricFn, default_metric_fn, module_time_shares, soft_score
from .layers import DroneLinear
from .targets import attention_block_names, encoder_linear_roles, resolve_target_modules


logger = logging.get_logger(__name__)
_FRACTIONS = (1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8)
DENSE = None  # a grid entry meaning "leave the module dense"


def breakeven_rank(out_features: int, in_features: int) -> int:
    """Largest rank at which a factored pair is still cheaper than the dense layer: `k (in + out) < in * out`."""
    return (in_features * out_features - 1) // (in_features + out_features)


def _greedy(losses, costs, grids, budget: float) -> dict[str, int | None]:
    """Starts every module at its smallest grid rank and repeatedly takes the step (to the next grid rank, or to
    dense after the last) with the largest loss reduction per unit of cost that still fits in `budget`."""
    position = dict.fromkeys(grids, 0)
    used = sum(costs[name](grids[name][0]) for name in grids)
    if used > budget:
        raise ValueError(f"The budget cannot be met: even the smallest ranks cost {used:.4g} > {budget:.4g}.")

    def option(name):
        ladder = grids[name] + [DENSE]
        here, there = ladder[position[name]], ladder[position[name] + 1]
        extra = costs[name](there) - costs[name](here)
        return -(losses[name](here) - losses[name](there)) / max(extra, 1e-12), extra, name

    heap = [option(name) for name in grids]
    heapq.heapify(heap)
    while heap:
        _, extra, name = heapq.heappop(heap)
        if used + extra > budget:
            continue  # does not fit; cheaper steps elsewhere still may
        used += extra
        position[name] += 1
        if position[name] < len(grids[name]):
            heapq.heappush(heap, option(name))
    return {name: (grids[name] + [DENSE])[position[name]] for name in grids}


def allocate_by_energy(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    param_ratio: float,
    *,
    multiple: int = 8,
) -> dict[str, int]:
    r"""
    Chooses per-linear ranks that keep at most `param_ratio` of the modules' weight parameters while discarding as
    little *relative* residual energy (discarded `sigma^2` over total, per module) as possible; ranks are multiples of
    `multiple` below the break-even rank, and a module that would reach break-even is left dense.

    Args:
        spectra (`Mapping[str, Tensor]`): Module name -> singular values, descending (DRONE's `Z`, or `W` for SVD).
        shapes (`Mapping[str, tuple[int, int]]`): Module name -> `(out_features, in_features)`.
        param_ratio (`float`): Fraction in `(0, 1)` of the modules' weight parameters to keep.
        multiple (`int`, *optional*, defaults to 8): Rank granularity.

    Returns:
        `dict[str, int]`: Ranks of the modules to factor; modules left dense are absent.
    """
    _check_fraction("param_ratio", param_ratio)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"`multiple` must be a positive int, got {multiple!r}.")
    grids = {name: list(range(multiple, breakeven_rank(*shape) + 1, multiple)) for name, shape in shapes.items()}
    losses, costs = {}, {}
    for name, (out_f, in_f) in shapes.items():
        energy = spectra[name].double() ** 2
        losses[name] = _relative_tail(energy)
        costs[name] = lambda k, o=out_f, i=in_f: o * i if k is None else k * (o + i)
    dense_total = sum(o * i for o, i in shapes.values())
    fixed = sum(o * i for name, (o, i) in shapes.items() if not grids[name])  # too small to factor
    grids = {name: grid for name, grid in grids.items() if grid}
    try:
        chosen = _greedy(losses, costs, grids, param_ratio * dense_total - fixed)
    except ValueError as error:
        raise ValueError(f"`param_ratio={param_ratio}` cannot be met: {error}") from None
    return {name: rank for name, rank in chosen.items() if rank is not None}


def _relative_tail(energy: torch.Tensor) -> Callable[[int | None], float]:
    total = float(energy.sum()) or 1.0
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).tolist() + [0.0]
    return lambda k: 0.0 if k is None else tail[min(k, len(tail) - 1)] / total


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be a float in (0, 1), got {value!r}.")


def _default_grid(limit: int, multiple: int) -> list[int]:
    return sorted({max(multiple, int(round(limit * f / multiple)) * multiple) for f in _FRACTIONS} - {0}) or [1]


class _Candidates:
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
                for target, value in ((new.query.weight, q_w), (new.query.bias, q_b), (new.key.weight, k_w), (new.key.bias, k_b)):
                    target.copy_(value)
            return new.eval()
        bias = None if old.bias is None else old.bias.detach()
        if self.method == "svd":
            down, up = svd_factorize(old.weight.detach(), rank)
        else:
            down, up = self._decomposition(name).factors(rank)
            if name in self._means and bias is not None:  # bias correction: fold (W - M) mu into the bias
                bias = bias + ((old.weight.detach().double() - up.double() @ down.double()) @ self._means[name]).to(bias)
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
        return _relative_tail(energy)

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


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    old = model.get_submodule(name)
    model.set_submodule(name, module)
    return old


def _apply(model, candidates: _Candidates, ranks: Mapping[str, int]) -> dict[str, nn.Module]:
    # Attention blocks before linears, so a factored value linear lands inside its new block.
    ordered = sorted(ranks, key=lambda n: n not in candidates.blocks)
    return {name: _swap(model, name, candidates.module(name, ranks[name])) for name in ordered}


def _restore(model, originals: Mapping[str, nn.Module]) -> None:
    for name in reversed(list(originals)):
        _swap(model, name, originals[name])


def _select(curves, shares, budget: float, scale: float) -> dict[str, int]:
    """Smallest evaluated rank per module whose drop fits in its share of the (scaled) budget."""
    chosen = {}
    for name, curve in curves.items():
        allowed = scale * budget * shares[name]
        fitting = [rank for rank, drop in curve.items() if drop <= allowed]
        if fitting:
            chosen[name] = min(fitting)
    return chosen


def allocate_ranks(
    model: nn.Module,
    stats: Mapping[str, torch.Tensor] | None,
    *,
    eval_dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    max_accuracy_drop: float | None = None,
    target_speedup: float | None = None,
    param_ratio: float | None = None,
    rank_grid: Sequence[int] | None = None,
    method: str = "drone",
    attention: bool = True,
    target_modules: Sequence[str] | str | None = None,
    metric_fn: MetricFn | None = None,
    seq_len: int = 128,
    rank_multiple: int = 8,
    bias_correction: bool = False,
    show_progress: bool = False,
    report: dict | None = None,
) -> dict[str, int]:
    r"""
    Allocates per-module ranks for a budget. Pass exactly one of `max_accuracy_drop`, `target_speedup`, `param_ratio`.

    - `max_accuracy_drop` (points of the task metric on `eval_dataloader`, e.g. `1.0`): the DRONE appendix recipe.
      Each candidate module is compressed alone at each grid rank (largest first, stopping early once its drop
      exceeds the whole budget) and scored on the held-out batches, re-running only the layers after it. The budget
      is split by each module's **measured** share of inference time; each module takes the smallest rank whose drop
      fits its share. The combination is then scored jointly with the real metric and the shares are scaled up or
      down (bisection) until the joint drop is within the budget. Per-module drops use a smooth stand-in for the
      metric (mean probability of the true label; see [`soft_score`]) because a share is usually far below one
      held-out example; the joint check uses `metric_fn`. Use held-out data carved from the *training* split: the
      dev split you report must stay unseen.
    - `target_speedup` (e.g. `1.5`): no evaluations; multiply-adds (at `seq_len` tokens) must fall to
      `1 / target_speedup` of the dense model's, spending them where the closed form's relative residual energy
      drops most per multiply-add.
    - `param_ratio` (e.g. `0.5`): no evaluations; the same with parameters of the candidate modules.

    Candidates are the target encoder linears and, with `attention=True`, each layer's attention-score product
    (DRONE attention, replacing its query/key linears). Grid ranks are multiples of `rank_multiple` below each
    linear's break-even rank (`k (in + out) < in * out`), so only ranks that reduce a layer's cost are chosen.

    Args:
        model (`BertForSequenceClassification`): The fine-tuned model (not modified; a copy is used).
        stats (`dict[str, Tensor]`, *optional*): From [`collect_activation_stats`] (required for `method="drone"`).
        eval_dataloader (`Iterable[dict]`, *optional*): Held-out tokenizer batches with `labels`
            (required for `max_accuracy_drop`).
        rank_grid (`Sequence[int]`, *optional*): Candidate ranks for linears (default: 1/8 ... 7/8 of break-even,
            rounded to `rank_multiple`). Attention blocks use 1/8 ... 7/8 of the head size.
        method (`str`, *optional*, defaults to `"drone"`): `"drone"` or `"svd"`.
        attention (`bool`, *optional*, defaults to `True`): Include DRONE attention candidates.
        target_modules: As in [`compress_model`].
        metric_fn (`Callable[[ndarray, ndarray], float]`, *optional*): `(logits, labels) -> score in points`;
            defaults to accuracy (classification) or Pearson correlation (regression), times 100.
        seq_len (`int`, *optional*, defaults to 128): Sequence length of the multiply-add model.
        bias_correction (`bool`, *optional*, defaults to `False`): Score linear candidates with bias-corrected DRONE
            (compress with the same setting).
        show_progress (`bool`, *optional*): Progress bar over candidate evaluations.
        report (`dict`, *optional*): Filled with what was done: evaluations, seconds, shares, curves, joint checks.

    Returns:
        `dict[str, int]`: linear name -> rank and attention block name (`...attention.self`) -> per-head rank, for
        the modules to factor (dense ones are absent). Pass it to [`compress_model`] as `ranks=`.

    Raises:
        `ValueError`: for zero or several budgets, a budget out of range or impossible, or missing held-out data.
    """
    budgets = {"max_accuracy_drop": max_accuracy_drop, "target_speedup": target_speedup, "param_ratio": param_ratio}
    given = [key for key, value in budgets.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"Pass exactly one of {list(budgets)}, got {given or 'none'}.")
    if method not in ("drone", "svd"):
        raise ValueError(f"Unknown `method` {method!r}; expected one of ['drone', 'svd'].")
    if method == "drone" and not isinstance(stats, Mapping):
        raise TypeError("`stats` (from collect_activation_stats) is required for method='drone'.")
    working = copy.deepcopy(model).eval()
    candidates = _Candidates(
        working, stats, method=method, attention=attention, target_modules=target_modules, rank_grid=rank_grid,
        rank_multiple=rank_multiple, seq_len=seq_len, bias_correction=bias_correction and method == "drone",
    )
    if method == "drone":
        from .compress import _check_stats

        needed = candidates.linears + [f"{block}.query" for block in candidates.blocks]
        shapes = {n: tuple(working.get_submodule(n).weight.shape) for n in needed}
        _check_stats(stats, needed, shapes)
    started = time.perf_counter()
    report = report if report is not None else {}
    report.update(budget=given[0], value=budgets[given[0]], method=method, candidates=len(candidates.names))
    if max_accuracy_drop is None:
        chosen = _allocate_closed_form(working, candidates, target_speedup, param_ratio)
    else:
        chosen = _allocate_by_accuracy(
            working, candidates, eval_dataloader, max_accuracy_drop, metric_fn, show_progress, report
        )
    report["seconds"] = time.perf_counter() - started
    logger.info(f"Allocated ranks for {len(chosen)} of {len(candidates.names)} modules in {report['seconds']:.1f}s.")
    return chosen


def _allocate_closed_form(working, candidates, target_speedup, param_ratio) -> dict[str, int]:
    from .profiling import encoder_macs

    losses = {name: candidates.energy_loss(name) for name in candidates.names}
    if param_ratio is not None:
        _check_fraction("param_ratio", param_ratio)
        costs = {name: (lambda k, n=name: candidates.params(n, k)) for name in candidates.names}
        budget = param_ratio * sum(candidates.params(name, None) for name in candidates.names)
        label = f"`param_ratio={param_ratio}`"
    else:
        if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or target_speedup <= 1:
            raise ValueError(f"`target_speedup` must be a number > 1, got {target_speedup!r}.")
        costs = {name: (lambda k, n=name: candidates.macs(n, k)) for name in candidates.names}
        total = encoder_macs(working.config, candidates.seq_len, prefix=working.base_model_prefix)
        fixed = total - sum(candidates.macs(name, None) for name in candidates.names)
        budget = total / target_speedup - fixed
        label = f"`target_speedup={target_speedup}`"
    grids = {name: candidates.grid[name] for name in candidates.names}
    try:
        chosen = _greedy(losses, costs, grids, budget)
    except ValueError as error:
        raise ValueError(f"{label} cannot be met with these candidates and rank grids: {error}") from None
    return {name: rank for name, rank in chosen.items() if rank is not None}


def _allocate_by_accuracy(working, candidates, eval_dataloader, budget, metric_fn, show_progress, report):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"`max_accuracy_drop` must be a positive number of metric points, got {budget!r}.")
    if eval_dataloader is None:
        raise ValueError("`max_accuracy_drop` needs `eval_dataloader` (held-out batches with labels, from train).")
    batches = list(eval_dataloader)
    problem_type = working.config.problem_type or ("regression" if working.config.num_labels == 1 else None)
    metric_fn = metric_fn or default_metric_fn(problem_type)
    evaluator = LayerwiseEvaluator(working, batches)
    labels = evaluator.labels
    base_logits = evaluator.logits(0)
    base_soft, base_metric = soft_score(base_logits, labels, problem_type), metric_fn(base_logits, labels)
    shares = module_time_shares(working, candidates.time_entries(), batches[0])
    curves: dict[str, dict[int, float]] = {name: {} for name in candidates.names}
    total_steps = sum(len(candidates.grid[name]) for name in candidates.names)
    with tqdm(total=total_steps, desc="Allocating ranks", disable=not show_progress) as progress:
        for layer in sorted({candidates.layer[name] for name in candidates.names}):
            evaluator.advance_to(layer)
            for name in [n for n in candidates.names if candidates.layer[n] == layer]:
                for rank in sorted(candidates.grid[name], reverse=True):
                    original = _swap(working, name, candidates.module(name, rank))
                    try:
                        drop = base_soft - soft_score(evaluator.logits(), labels, problem_type)
                    finally:
                        _swap(working, name, original)
                    curves[name][rank] = drop
                    progress.update(1)
                    if drop > budget:  # smaller ranks only lose more: early exit
                        progress.update(sum(1 for r in candidates.grid[name] if r < rank))
                        break

    joint = {}

    def check(scale: float) -> float:
        ranks = _select(curves, shares, budget, scale)
        key = tuple(sorted(ranks.items()))
        if key not in joint:
            originals = _apply(working, candidates, ranks)
            try:
                joint[key] = (base_metric - metric_fn(evaluator.logits(0), labels), scale, ranks)
            finally:
                _restore(working, originals)
        return joint[key][0]

    # Scale the per-module shares so that the joint drop is within the budget: grow while it fits, then bisect.
    low, high = 0.0, None
    scale = 1.0
    for _ in range(4):
        if check(scale) <= budget:
            low, scale = scale, scale * 2
        else:
            high = scale
            break
    if high is None:
        high = scale
    for _ in range(4):
        middle = (low + high) / 2 if low > 0 else high / 4
        if check(middle) <= budget:
            low = middle
        else:
            high = middle
    feasible = [entry for entry in joint.values() if entry[0] <= budget]
    drop, scale, chosen = max(feasible, key=lambda e: e[1]) if feasible else (0.0, 0.0, {})
    report.update(
        evaluations=evaluator.evaluations,
        evaluation_seconds=evaluator.seconds,
        heldout_examples=int(len(labels)),
        heldout_base_metric=base_metric,
        heldout_drop=drop,
        scale=scale,
        shares=shares,
        curves=curves,
        joint_checks=[{"scale": s, "drop": d, "modules": len(r)} for d, s, r in joint.values()],
    )
    return chosen


__all__ = ["DENSE", "allocate_by_energy", "allocate_ranks", "breakeven_rank"]
