"""Rank allocation: from a budget (accuracy drop, speed-up or parameter ratio) to per-module ranks.

`allocate_by_energy` and the `target_speedup` / `param_ratio` paths of [`allocate_ranks`] need no evaluation: they use
the closed form's residual energy. The `max_accuracy_drop` path follows the DRONE appendix: measure each module's
drop alone on held-out data, split the budget by each module's share of the multiply-adds (deterministic, unlike a
clock), pick the smallest rank within each share, then check the combination jointly and adjust.
"""

from __future__ import annotations

import copy
import heapq
import math
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from numbers import Integral, Real

import torch
from torch import nn
from transformers.utils import logging

from .budget_search import allocate_by_accuracy, check_search
from .candidates import Candidates, breakeven_rank, relative_tail
from .defaults import DEFAULT_SAFETY_MARGIN
from .deployment import resolve_dtype, resolve_quantize
from .heads import MetricFn
from .methods import DEFAULT_METHOD, get_method, resolve_method
from .model_state import check_materialized
from .sequential import check_sequential_method, make_refit
from .stats import check_stats
from .targets import as_int, check_supported_model


logger = logging.get_logger(__name__)
DEFAULT_SEARCH = "exhaustive"
DENSE = None  # a grid entry meaning "leave the module dense"


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
        losses[name] = relative_tail(energy)
        costs[name] = lambda k, o=out_f, i=in_f: o * i if k is None else k * (o + i)
    dense_total = sum(o * i for o, i in shapes.values())
    fixed = sum(o * i for name, (o, i) in shapes.items() if not grids[name])  # too small to factor
    grids = {name: grid for name, grid in grids.items() if grid}
    try:
        chosen = _greedy(losses, costs, grids, param_ratio * dense_total - fixed)
    except ValueError as error:
        raise ValueError(f"`param_ratio={param_ratio}` cannot be met: {error}") from None
    return {name: rank for name, rank in chosen.items() if rank is not None}


def _check_screening(screening_samples, safety_margin, refine_steps) -> None:
    if refine_steps is not None and (
        isinstance(refine_steps, bool) or not isinstance(refine_steps, Integral) or refine_steps < 0
    ):
        raise ValueError(f"`refine_steps` must be an int >= 0 or None (the search's default), got {refine_steps!r}.")
    if isinstance(screening_samples, str):
        valid = screening_samples == "auto"
    else:
        valid = screening_samples is None or (
            isinstance(screening_samples, Integral)
            and not isinstance(screening_samples, bool)
            and screening_samples > 0
        )
    if not valid:
        raise ValueError(
            "`screening_samples` must be a positive int, None (all rows) or 'auto' (the search's default), got "
            f"{screening_samples!r}."
        )
    if not _is_finite(safety_margin) or not safety_margin >= 0:
        raise ValueError(f"`safety_margin` must be a number >= 0 (standard errors), got {safety_margin!r} (finite).")


def _is_finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(name: str, value) -> None:
    if not _is_finite(value) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be a float in (0, 1), got {value!r}.")


def _check_budget(max_accuracy_drop, target_speedup, param_ratio) -> None:
    """Refuses NaN, infinite and out-of-range budgets before any work (NaN compares False with everything, so it
    would otherwise run the whole search and fit nothing)."""
    if param_ratio is not None:
        _check_fraction("param_ratio", param_ratio)
    if target_speedup is not None and (not _is_finite(target_speedup) or target_speedup <= 1):
        raise ValueError(f"`target_speedup` must be a number > 1, got {target_speedup!r} (finite, e.g. 1.5).")
    if max_accuracy_drop is not None and (not _is_finite(max_accuracy_drop) or max_accuracy_drop <= 0):
        raise ValueError(
            f"`max_accuracy_drop` must be a positive number of metric points (finite, e.g. 1.0), got "
            f"{max_accuracy_drop!r}."
        )


def check_rank_grid(rank_grid) -> list[int] | None:
    """`rank_grid` as a sorted list of Python ints (numpy integers and arrays accepted), or None.

    Raises:
        `TypeError`: for a grid that is not a sequence of integers (floats, bools, strings).
        `ValueError`: for an empty grid or a rank <= 0.
    """
    if rank_grid is None:
        return None
    if hasattr(rank_grid, "tolist") and not isinstance(rank_grid, (str, bytes)):  # numpy arrays, tensors
        rank_grid = rank_grid.tolist()
    if isinstance(rank_grid, (str, bytes, Mapping)) or not isinstance(rank_grid, Iterable):
        raise TypeError(f"`rank_grid` must be a list of positive ints (e.g. [32, 64, 96]), got {rank_grid!r}.")
    grid = list(rank_grid)
    if not grid:
        raise ValueError("`rank_grid` is empty; pass positive ints (e.g. [32, 64, 96]) or None for the default grid.")
    bad = [k for k in grid if isinstance(k, bool) or not isinstance(k, Integral)]
    if bad:
        raise TypeError(
            f"`rank_grid` must hold ints (ranks), got {bad[0]!r} ({type(bad[0]).__name__}) in {grid!r}; e.g. "
            "[32, 64, 96]."
        )
    if min(grid) <= 0:
        raise ValueError(f"`rank_grid` ranks must be positive, got {min(grid)} in {grid!r}.")
    return sorted({int(k) for k in grid})


def _check_positive_int(name: str, value) -> int:
    value = as_int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def allocate_ranks(
    model: nn.Module,
    stats: Mapping[str, torch.Tensor] | None,
    *,
    eval_dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    max_accuracy_drop: float | None = None,
    target_speedup: float | None = None,
    param_ratio: float | None = None,
    rank_grid: Sequence[int] | None = None,
    method: str = DEFAULT_METHOD,
    attention: bool = True,
    target_modules: Sequence[str] | str | None = None,
    metric_fn: MetricFn | None = None,
    seq_len: int = 128,
    rank_multiple: int = 8,
    bias_correction: bool | None = None,
    screening_samples: int | str | None = "auto",
    screening_dtype: torch.dtype | str | None = None,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    refine_steps: int | None = None,
    search: str = DEFAULT_SEARCH,
    show_progress: bool = False,
    report: dict | None = None,
    rows_fn: Callable | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    kernel_costs=None,
    sequential_dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    sequential_checks: int = 4,
    sequential_dense_weight: float = 0.0,
    decompositions: dict | None = None,
) -> dict[str, int]:
    r"""
    Allocates per-module ranks for a budget. Pass exactly one of `max_accuracy_drop`, `target_speedup`, `param_ratio`.

    - `max_accuracy_drop` (points of the task metric on `eval_dataloader`, e.g. `1.0`): two searches (`search`),
      both returning only an assignment whose drop on **all** held-out rows with the real metric, plus
      `safety_margin` paired standard errors (bootstrap), is within the budget, so that a lucky held-out draw does
      not spend the budget twice. Per-module drops are scored on `screening_samples` held-out rows spread over the
      batches, re-running only the layers after the module, with a smooth, never negative stand-in for the metric
      (the mean absolute change of the true label's probability; see [`soft_change`]) because a module's part of
      the budget is usually far below one held-out example.

      `search="fast"`: each module's drop at every grid rank is predicted from the closed form's relative
      residual energy (free), calibrated by one evaluation per module at the middle of its grid; every single-module
      move is ordered by the global scale at which the exhaustive search's cost-share rule (below) allows it on the
      predicted drops, the number of moves taken is bisected (`ceil(log2(moves + 1))` steps; a step clearly past, or
      clearly within, the budget on the screening rows is settled there, the others by a joint check; after two
      undecided screening verdicts in a row only joint checks decide; the step found is always joint-checked), then
      up to `refine_steps` (default 6) joint checks try the next moves in groups that double while they fit and
      halve when they do not. About `modules + log2(moves) + refine_steps` evaluations ([`~drone_hf.budget_path`]).

      `search="exhaustive"` (default; the DRONE appendix recipe, the only search before the fast one): each module is
      compressed alone at each grid rank (largest first, stopping early once its drop exceeds the whole budget). The
      budget is split by each module's share of the multiply-adds at `seq_len`; each module takes the smallest rank
      whose drop fits its share. The combination is then checked jointly and the shares are scaled up or down
      (bisection) until it fits. Then up to `refine_steps` (default 48) single-module moves one grid rank down
      (cheapest measured drop per multiply-add saved first) are each kept only if the whole assignment still passes
      the joint check. About `modules x grid ranks + 13 + refine_steps` evaluations.

      Use held-out data carved from the *training* split: the dev split you report must stay unseen.
    - `target_speedup` (e.g. `1.5`): no evaluations; multiply-adds (at `seq_len` tokens) must fall to
      `1 / target_speedup` of the dense model's, spending them where the closed form's relative residual energy
      drops most per multiply-add.
    - `param_ratio` (e.g. `0.5`): no evaluations; the same with parameters of the candidate modules.

    Candidates are the target encoder linears and, with `attention=True`, each layer's attention-score product
    (DRONE attention, replacing its query/key linears). Grid ranks are multiples of `rank_multiple` below each
    linear's break-even rank (`k (in + out) < in * out`), so only ranks that reduce a layer's cost are chosen.

    With a deployment form (`dtype` and/or `quantize`, or `kernel_costs`), the kernels decide instead of the count:
    the dense and factored products of each shape are timed in that form on this machine
    ([`~drone_hf.kernel_costs.KernelCosts`], batch `8 x seq_len` tokens), each grid rank is kept only if its
    factored pair (narrowed query/key projection) is measured faster than the dense one, so no rank above the
    measured break-even is ever chosen, and `max_accuracy_drop` splits its budget by the measured shares of the time
    (the DRONE appendix's shares). `target_speedup` still counts multiply-adds, over those grids. The joint checks
    of `max_accuracy_drop` also score each assignment in the form it will ship, against the model as given: with
    `quantize` (or int8 `kernel_costs`) quantised ([`~drone_hf.deployment.swap_in_int8`]), with a `dtype` other than
    float32 (or such `kernel_costs`) cast ([`~drone_hf.deployment.swap_in_dtype`], undone exactly after each check).
    The budget then holds for the deployed model, whose rounding can cost more than the factoring (the screening
    curves stay in the model's own dtype).

    Args:
        model (`PreTrainedModel`): The fine-tuned model, any supported family and head (not modified; a copy is
            used).
        stats (`dict[str, Tensor]`, *optional*): From [`collect_activation_stats`] (required for data-aware methods).
        eval_dataloader (`Iterable[dict]`, *optional*): Held-out tokenizer batches with labels (`labels`; for
            question answering `start_positions`/`end_positions`), required for `max_accuracy_drop`.
        rank_grid (`Sequence[int]`, *optional*): Candidate ranks for linears (default: 1/8 ... 7/8 of break-even,
            rounded to `rank_multiple`); positive ints (numpy integers accepted). Ranks above a linear's break-even
            rank are dropped for it, with a warning (an error when no linear keeps a rank). Attention blocks use
            1/8 ... 7/8 of the head size.
        method (`str`, *optional*, defaults to `"drone"`): A registered method: `"drone"`, `"drone-bc"`, `"drone-act"`,
            `"svd"`.
        attention (`bool`, *optional*, defaults to `True`): Include DRONE attention candidates.
        target_modules: As in [`compress_model`].
        metric_fn (`Callable[[ndarray, ndarray], float]`, *optional*): `(logits, labels) -> score in points` on the
            rows of `drone_hf.heads`; defaults to accuracy (sequence classification, multiple choice), Pearson
            correlation (regression), token accuracy (token classification) or span F1 (question answering).
        seq_len (`int`, *optional*, defaults to 128): Sequence length of the multiply-add model.
        bias_correction (`bool`, *optional*): drone_hf 0.1's switch: `True` is `method="drone-bc"`.
        screening_samples (`int` or `str`, *optional*, defaults to `"auto"`): Held-out rows (whole batches, spread
            evenly over `eval_dataloader`) for the per-module curves or probes; `None` uses every row, `"auto"` the
            search's default (`budget_search.SCREENING_SAMPLES`: 256 for `"fast"`, whose probes only calibrate its
            predictions, 512 for `"exhaustive"`, which allocates from these curves). The joint checks always use all
            rows.
        screening_dtype (`torch.dtype` or `str`, *optional*): Score the screening rows (and the dense reference
            they are compared with) under `torch.autocast` in this dtype (`"bfloat16"`, `"float16"`; `None` or
            `"float32"`: the model's own dtype). On a CPU with AMX-bf16 tiles `"bfloat16"` made the per-module
            probes about 2.5x cheaper (all-mpnet-base-v2 on MRPC); the joint checks, which alone decide that the
            budget holds, never run under it: on all rows, in the deployment form (`dtype`/`quantize`, else the
            model's own dtype). On a CPU without bf16 matrix units it is
            slower: measure first.
        safety_margin (`float`, *optional*, defaults to 1.0): Paired standard errors of the held-out drop added to it
            before comparing with `max_accuracy_drop` (`0` compares the raw held-out drop).
        refine_steps (`int`, *optional*): Joint checks spent after the search's main stage on moving modules further
            down, each move kept only if the whole assignment still fits; `None` is the search's default (6 for
            `"fast"`, whose moves go in growing groups; 48 single moves for `"exhaustive"`); `0` keeps the
            bisection's (or the paper's time-share) allocation as is. The fast search chooses the moves on one half
            of the held-out rows and keeps them only if the other half and all rows confirm them (each half at least
            `CONFIRMATION_MIN_ROWS`, 128, rows; with fewer, all rows choose and check).
        search (`str`, *optional*, defaults to `"exhaustive"`): How `max_accuracy_drop` searches: `"exhaustive"`
            (measured per-module curves) or `"fast"` (predicted per-module drops, bisection of one scale: about 4x
            fewer held-out evaluations, a smaller speed-up for the same budget on MiniLM; see above).
        show_progress (`bool`, *optional*): Progress bars (`transformers.utils.logging.tqdm`): the spectra of a
            `target_speedup`/`param_ratio` budget; the per-module evaluations and the joint checks of
            `max_accuracy_drop`.
        report (`dict`, *optional*): Filled with what was done: the `search`, its held-out `evaluations` (screening
            and joint), their `evaluation_seconds` and `heldout_row_passes` (rows times the fraction of the layers
            run), the joint checks (`joint_check_count`, `joint_checks`), the curves (exhaustive: `curves`,
            `shares`; fast: `probes`, `predicted_curves`, `path_moves`, `path_step`, the screen's verdicts
            (`screened_rejections`, `screened_acceptances`, `screened_undecided`), `refinement_confirmation`: the
            halves' rows, the moves, the confirmation half's drop and whether they were kept), the cost model
            (`cost_model`), the form the joint checks scored (`joint_check_form`) and the kind of held-out rows
            (`heldout_kind`).
        rows_fn (`Callable`, *optional*): How model outputs become scored rows (`drone_hf.heads`): the task head's
            by default; `embedding_rows("mean")` scores a bare encoder by the cosine similarity of its pooled
            embeddings to the dense ones (`max_accuracy_drop = 100 * (1 - min_cosine_similarity)`).
        dtype (`torch.dtype` or `str`, *optional*): The deployment dtype (`float32`, `bfloat16`, `float16`) to
            measure break-even ranks and time shares in, and to joint-check `max_accuracy_drop` in (see above);
            `None` counts multiply-adds.
        quantize (`str`, *optional*): `"int8"`: measure them for dynamic int8 modules, and joint-check
            `max_accuracy_drop` on the int8 model.
        kernel_costs ([`~drone_hf.kernel_costs.KernelCosts`], *optional*): A cost model to use (and fill) instead of
            one built from `dtype`/`quantize`, e.g. one shared between allocations, or with a given `seconds_fn`.
        sequential_dataloader (`Iterable[dict]`, *optional*): Calibration batches for the sequential refit
            ([`~drone_hf.sequential.refit_sequential`]), as with `compress_model(..., sequential=True)`: with
            `max_accuracy_drop` and `search="fast"`, the search's result is refitted and joint-checked, then up to
            `sequential_checks` further joint checks of refitted assignments bisect the moves after it (each check
            costs one refit: about as much as a few passes over these batches). The ranks returned are those the
            refitted model meets the budget with, so build it with `compress_model(..., sequential=True)` on the same
            batches. Ignored (with a warning) by the closed-form budgets; with `search="exhaustive"` the joint
            checks do not refit.
        sequential_checks (`int`, *optional*, defaults to 4): Refitted joint checks after the search's result.
        sequential_dense_weight (`float`, *optional*, defaults to 0): The refits' weight of the dense inputs (the
            anchored refit, [`~drone_hf.sequential.refit_sequential`]'s `dense_weight`).
        decompositions (`dict`, *optional*): Filled with the decomposition of each linear the allocation
            decomposed (module name -> the method's decomposition, whose `factors(rank)` are that rank's factors), so
            that factoring the ranks returned needs no second decomposition: [`compress_model`] passes one (at base
            size the decompositions take about a minute on a 2-core CPU).

    Returns:
        `dict[str, int]`: linear name -> rank and attention block name (`...attention.self`) -> per-head rank, for
        the modules to factor (dense ones are absent). Pass it to [`compress_model`] as `ranks=`.

    Raises:
        `ValueError`: for zero or several budgets, a budget out of range (NaN and infinity included) or impossible,
            missing held-out data, held-out labels outside the head's classes, a `metric_fn` that returns NaN, or an
            accuracy budget finer than the held-out rows resolve: it must be worth at least
            `drone_hf.budget_search.MIN_BUDGET_ROWS` (3) rows, i.e. `300 / max_accuracy_drop` rows (one row moves
            accuracy by `100 / n` points; per-row metrics only, not correlations or cosine similarities).
        `TypeError`: for a `rank_grid` that is not a list of ints, a `metric_fn` that is not callable or does not
            return a number, or a `report` that is not a dict.
    """
    budgets = {"max_accuracy_drop": max_accuracy_drop, "target_speedup": target_speedup, "param_ratio": param_ratio}
    given = [key for key, value in budgets.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"Pass exactly one of {list(budgets)}, got {given or 'none'}.")
    _check_budget(max_accuracy_drop, target_speedup, param_ratio)
    rank_grid = check_rank_grid(rank_grid)
    seq_len = _check_positive_int("seq_len", seq_len)
    rank_multiple = _check_positive_int("rank_multiple", rank_multiple)
    if metric_fn is not None and not callable(metric_fn):
        raise TypeError(
            f"`metric_fn` must be a callable `(logits, labels) -> points`, got {type(metric_fn).__name__} "
            f"{metric_fn!r}."
        )
    if report is not None and not isinstance(report, MutableMapping):
        raise TypeError(f"`report` must be a dict to fill (or None), got {type(report).__name__}.")
    if decompositions is not None and not isinstance(decompositions, MutableMapping):
        raise TypeError(f"`decompositions` must be a dict to fill (or None), got {type(decompositions).__name__}.")
    check_search(search)
    screening_dtype = _screening_dtype(screening_dtype)
    if max_accuracy_drop is not None:
        _check_screening(screening_samples, safety_margin, refine_steps)
        if isinstance(sequential_checks, bool) or not isinstance(sequential_checks, Integral) or sequential_checks < 0:
            raise ValueError(f"`sequential_checks` must be an int >= 0, got {sequential_checks!r}.")
    else:
        evaluation_only = {
            "eval_dataloader": eval_dataloader,
            "metric_fn": metric_fn,
            "rows_fn": rows_fn,
            "screening_dtype": screening_dtype,
            "sequential_dataloader": sequential_dataloader,
        }
        unused = [key for key, value in evaluation_only.items() if value is not None]
        if unused:
            logger.warning(
                f"{unused} {'is' if len(unused) == 1 else 'are'} only used by `max_accuracy_drop`; ignored with "
                f"`{given[0]}` (a closed-form allocation without evaluations)."
            )
    method = resolve_method(method, bias_correction)
    if sequential_dataloader is not None and max_accuracy_drop is not None:
        check_sequential_method(get_method(method))
    if get_method(method).data_aware and not isinstance(stats, Mapping):
        raise TypeError(f"`stats` (from collect_activation_stats) is required for method={method!r}.")
    check_supported_model(model)
    check_materialized(model, "allocate ranks for")
    kernel_costs = _kernel_costs(model, dtype, quantize, kernel_costs, seq_len)
    working = copy.deepcopy(model).eval()
    candidates = Candidates(
        working,
        stats,
        method=method,
        attention=attention,
        target_modules=target_modules,
        rank_grid=rank_grid,
        rank_multiple=rank_multiple,
        seq_len=seq_len,
        kernel_costs=kernel_costs,
    )
    if kernel_costs is not None and not candidates.names:
        raise ValueError(
            f"The budget cannot be met: no candidate rank of any module is faster than the dense module in this "
            f"deployment form ({kernel_costs.describe()}); keep the model dense in this form, or deploy in another."
        )
    if candidates.method.data_aware:
        needed = candidates.linears + [candidates.qk[block][0] for block in candidates.blocks]
        shapes = {n: tuple(working.get_submodule(n).weight.shape) for n in needed}
        check_stats(stats, needed, shapes, model=working)
    started = time.perf_counter()
    report = report if report is not None else {}
    report.update(budget=given[0], value=budgets[given[0]], method=method, candidates=len(candidates.names))
    if max_accuracy_drop is None:
        chosen = _allocate_closed_form(working, candidates, target_speedup, param_ratio, show_progress)
    else:
        refit = None
        if sequential_dataloader is not None and search == "fast":
            refit = make_refit(model, sequential_dataloader, dense_weight=sequential_dense_weight)
        elif sequential_dataloader is not None:
            logger.warning(
                "The exhaustive search's joint checks do not refit: the budget is checked on the model before the "
                'sequential refit. Use `search="fast"` to check (and search with) the refitted model.'
            )
        options = {
            "refit": refit,
            "deployment": _deployed_form(dtype, quantize, kernel_costs),
            "sequential_checks": sequential_checks,
            "metric_fn": metric_fn,
            "screening_samples": screening_samples,
            "screening_dtype": screening_dtype,
            "safety_margin": safety_margin,
            "refine_steps": refine_steps,
            "search": search,
            "rows_fn": rows_fn,
        }
        chosen = allocate_by_accuracy(
            working, candidates, eval_dataloader, max_accuracy_drop, options, show_progress, report
        )
    if kernel_costs is not None:
        report["kernel_costs"] = kernel_costs.summary()
        report["grids"] = {name: list(candidates.grid[name]) for name in candidates.names}
    report["seconds"] = time.perf_counter() - started
    if decompositions is not None:
        decompositions.update(candidates.decompositions)
    logger.info(f"Allocated ranks for {len(chosen)} of {len(candidates.names)} modules in {report['seconds']:.1f}s.")
    return chosen


def _deployed_form(dtype, quantize, kernel_costs) -> tuple[torch.dtype | None, str | None]:
    """The form the result will ship in, `(dtype, quantize)`: as given, or the form `kernel_costs` was measured in
    (float32 counts as no cast). The joint checks score each candidate in it: the accuracy that counts is the
    deployed model's."""
    quantize = resolve_quantize(quantize) or (kernel_costs.quantize if kernel_costs is not None else None)
    dtype = resolve_dtype(dtype) or (kernel_costs.dtype if kernel_costs is not None else None)
    return (None if quantize is not None or dtype == torch.float32 else dtype), quantize


def _screening_dtype(screening_dtype) -> torch.dtype | None:
    """The autocast dtype of the screening evaluations: None for `None` or float32 (the model's own dtype).

    Raises:
        `ValueError`: naming `screening_dtype`, the value and the allowed dtypes.
    """
    from .deployment import resolve_dtype

    resolved = resolve_dtype(screening_dtype, "screening_dtype")
    return None if resolved in (None, torch.float32) else resolved


def _kernel_costs(model, dtype, quantize, kernel_costs, seq_len):
    """The cost model of a deployment form: `kernel_costs` as given, one measured for `dtype`/`quantize` on the
    model's device, or None (multiply-adds)."""
    from .kernel_costs import KernelCosts

    if kernel_costs is not None:
        if not isinstance(kernel_costs, KernelCosts):
            raise TypeError(f"`kernel_costs` must be a KernelCosts, got {type(kernel_costs).__name__}.")
        given = (resolve_dtype(dtype) or torch.float32, resolve_quantize(quantize))
        if (dtype is not None or quantize is not None) and given != (kernel_costs.dtype, kernel_costs.quantize):
            raise ValueError(
                f"`kernel_costs` measures {kernel_costs.describe()!r}, not the deployment form `dtype={dtype}`, "
                f"`quantize={quantize!r}`; pass one cost model for the form the model is deployed in."
            )
        return kernel_costs
    if dtype is None and quantize is None:
        return None
    device = next(model.parameters()).device  # `seq_len` was checked by allocate_ranks
    return KernelCosts(dtype or torch.float32, quantize=quantize, tokens=8 * seq_len, device=device)


def _allocate_closed_form(working, candidates, target_speedup, param_ratio, show_progress=False) -> dict[str, int]:
    from transformers.utils.logging import tqdm

    from .profiling import model_macs

    # One decomposition (the spectrum) per candidate: most of the time of an evaluation-free budget.
    losses = {
        name: candidates.energy_loss(name)
        for name in tqdm(candidates.names, desc="Spectra", unit="module", disable=not show_progress)
    }
    if param_ratio is not None:
        _check_fraction("param_ratio", param_ratio)
        costs = {name: (lambda k, n=name: candidates.params(n, k)) for name in candidates.names}
        budget = param_ratio * sum(candidates.params(name, None) for name in candidates.names)
        label = f"`param_ratio={param_ratio}`"
    else:
        costs = {name: (lambda k, n=name: candidates.macs(n, k)) for name in candidates.names}
        total = model_macs(working, candidates.seq_len)
        fixed = total - sum(candidates.macs(name, None) for name in candidates.names)
        budget = total / target_speedup - fixed
        label = f"`target_speedup={target_speedup}`"
    grids = {name: candidates.grid[name] for name in candidates.names}
    try:
        chosen = _greedy(losses, costs, grids, budget)
    except ValueError as error:
        grids_note = ""
        if candidates.kernel_costs is not None:
            grids_note = (
                " (the grids keep only ranks measured faster than the dense module in this deployment form "
                f"({candidates.kernel_costs.describe()}))"
            )
        raise ValueError(f"{label} cannot be met with these candidates and rank grids{grids_note}: {error}") from None
    return {name: rank for name, rank in chosen.items() if rank is not None}


__all__ = ["DENSE", "allocate_by_energy", "allocate_ranks", "breakeven_rank", "check_rank_grid"]
