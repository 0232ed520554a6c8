"""The accuracy-budget path of rank allocation (DRONE appendix): per-module drops on held-out rows, the budget split by
each module's share of the model's multiply-adds, a joint check with a safety margin, then a greedy refinement checked
the same way. Nothing here reads a clock, so the same model, data and seed give the same ranks."""

from __future__ import annotations

import functools
import heapq
import math
from numbers import Real

import numpy as np
from transformers.utils.logging import tqdm

from .budget_path import extend_sequential, module_drop, path_search
from .calibration import check_batch, check_dataloader, vocab_size
from .candidates import apply_ranks, restore_modules
from .deployment import describe_deployment, swap_in_dtype, swap_in_int8
from .heads import default_metric_fn, head_rows
from .heldout import LayerwiseEvaluator, count_rows, paired_standard_error, spread_subset


MIN_BUDGET_ROWS = 3
"""An accuracy budget must be worth at least this many held-out rows: on `n` rows one row moves accuracy by `100 / n`
points, so a budget below a few rows' worth is decided by which rows happen to be held out, not by the model."""


def min_heldout_rows(budget: float) -> int:
    """The fewest held-out rows on which a `budget` of metric points is [`MIN_BUDGET_ROWS`] rows' worth (one row moves
    a per-row metric such as accuracy by `100 / n` points). E.g. 300 rows for 1 point, 30 for 10."""
    return math.ceil(MIN_BUDGET_ROWS * 100.0 / budget - 1e-9)


def _row_quantised(metric_fn, problem_type, kind) -> bool:
    """Whether the budget's metric moves in steps of about `100 / n` points per held-out row: the default metrics of
    classification (accuracy), token classification (token accuracy) and question answering (span F1), and metric
    functions marked `row_quantised = True` (e.g. `glue_metric_points` for the classification tasks)."""
    if metric_fn is not None:
        return bool(getattr(metric_fn, "row_quantised", False))
    return kind in ("classification", "token", "span") and problem_type != "regression"


def _check_resolution(budget, rows: int, kind: str) -> None:
    needed = min_heldout_rows(budget)
    if rows >= needed:
        return
    unit = "labelled token" if kind == "token" else "row"
    raise ValueError(
        f"`max_accuracy_drop={budget}` is finer than {rows} held-out {unit}s can resolve: one {unit} moves the metric "
        f"by {100 / rows:.3g} points, so the budget is only {budget * rows / 100:.2g} {unit}s' worth and the ranks "
        f"would be decided by which {unit}s happen to be held out. A budget of {budget} points needs at least "
        f"{needed} held-out {unit}s ({MIN_BUDGET_ROWS} {unit}s' worth); pass more held-out data or a budget of at "
        f"least {MIN_BUDGET_ROWS * 100 / rows:.3g} points."
    )


def _check_labels(evaluator, problem_type, num_labels) -> None:
    """Held-out labels must be classes the head scores (positions inside the sequence, for spans)."""
    if evaluator.kind == "embedding" or (problem_type == "regression" and evaluator.kind == "classification"):
        return
    labels = np.asarray(evaluator.labels)
    if labels.size == 0:
        raise ValueError("The held-out batches have no labelled row (every label is -100); pass labelled rows.")
    limit = evaluator.num_outputs
    bad = labels[(labels < 0) | (labels >= limit) | (labels != np.round(labels))]
    if bad.size == 0:
        return
    seen = bad.flat[0].item()
    if evaluator.kind == "span":
        raise ValueError(
            f"Held-out answer position {seen} is outside the sequences (positions 0..{limit - 1}); the "
            "`start_positions`/`end_positions` must index tokens of the batch."
        )
    hint = (
        " Negative labels such as -1 mark unlabelled rows (e.g. GLUE test splits): hold out labelled rows of the "
        "train split."
        if seen < 0
        else " Were the labels encoded for another label set? Check `model.config.label2id`."
    )
    raise ValueError(
        f"Held-out label {seen!r} is outside the classes of the model's head: num_labels={num_labels} (its "
        f"{limit} outputs score labels 0..{limit - 1}).{hint}"
    )


def _checked_metric(metric_fn):
    """`metric_fn` that refuses a result that is not a finite number, naming the metric, at its first call."""
    name = getattr(metric_fn, "__qualname__", None) or repr(metric_fn)

    def checked(logits, labels) -> float:
        value = metric_fn(logits, labels)
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(
                f"`metric_fn` ({name}) must return a number of points, got {type(value).__name__} {value!r}."
            )
        if not math.isfinite(value):
            raise ValueError(
                f"`metric_fn` ({name}) returned {value} on {len(labels)} held-out rows: no budget can be judged on a "
                "NaN/Inf metric (e.g. a correlation of constant predictions or labels). Pass held-out rows on which "
                "it is defined, or another `metric_fn`."
            )
        return float(value)

    return checked


def cost_shares(candidates) -> dict[str, float]:
    """Each candidate's share of the candidates' dense multiply-adds at `candidates.seq_len` tokens (an attention
    block: its query/key projections and score product). Deterministic: the DRONE appendix splits the budget by
    share of inference time, and multiply-adds are that share without the noise of a clock on a shared machine.
    With `candidates.kernel_costs` (a deployment dtype or int8 given), the shares are of the time measured in that
    form instead, as in the appendix (an attention block: its query/key projections, the part its rank changes)."""
    costs = {name: candidates.dense_cost(name) for name in candidates.names}
    total = sum(costs.values()) or 1
    return {name: cost / total for name, cost in costs.items()}


def _select(curves, shares, budget: float, scale: float) -> dict[str, int]:
    """Smallest evaluated rank per module whose drop, and every larger rank's, fits its share of the scaled budget
    (a rank is only as safe as the ranks above it: a curve is read as non-increasing from the top)."""
    chosen = {}
    for name, curve in curves.items():
        allowed = scale * budget * shares[name]
        for rank in sorted(curve, reverse=True):
            if curve[rank] > allowed:
                break
            chosen[name] = rank
    return chosen


SEARCHES = ("fast", "exhaustive")
"""The searches of an accuracy budget: `"fast"` ([`~drone_hf.budget_path`]: per-module drops predicted from the closed
form's residual energy, one probe per module, bisection of one global scale by joint checks) and `"exhaustive"` (the
DRONE appendix: a drop curve per module by evaluation, the budget split by cost shares, then joint checks)."""
REFINE_STEPS = {"fast": 6, "exhaustive": 48}
"""Default `refine_steps` of each search."""

SCREENING_SAMPLES = {"fast": 256, "exhaustive": 512}
"""Default `screening_samples` (`"auto"`) of each search. The exhaustive search allocates from the screening rows'
per-module curves themselves; the fast search only calibrates one coefficient per module on them and lets joint
checks on all held-out rows decide, so it takes fewer: with 256 instead of 512 rows the all-mpnet-base-v2 MRPC budget
(1 point) stopped at a 2.17 instead of a 2.23 FLOP bound in 28.1 instead of 37.8 min, and MiniLM's SST-2 budget at
1.59 instead of 1.56 in 86 instead of 97 s (2-core AVX2 CPU, README)."""

CONFIRMATION_MIN_ROWS = 128
"""The fast search chooses its refinement's moves on one half of the held-out rows and confirms them on the other
(`budget_path._confirmed_refine`) when each half holds at least this many rows (and enough to resolve a per-row
metric's budget, [`min_heldout_rows`]); with fewer, the refinement is chosen and checked on all rows."""

SEARCH_REVISION = 5
"""Raised whenever the fast search can choose other ranks for the same inputs (1: bisection on joint checks and
single-move refinement; 2: screened acceptance in the bisection, refinement in growing groups, 6 checks; 3: the
refinement's moves ordered by predicted drop per cost saved instead of along the path; 4: the refinement's moves
chosen on half of the held-out rows and confirmed on the other half; 5: the bisection stops consulting the screening
rows after two undecided verdicts in a row): benchmarks key their cached results by it."""


def check_search(search) -> str:
    """`search` if it names a search of [`SEARCHES`], else a ValueError naming the value and the choices."""
    if not isinstance(search, str) or search not in SEARCHES:
        raise ValueError(f"`search` must be one of {list(SEARCHES)}, got {search!r}.")
    return search


def allocate_by_accuracy(working, candidates, batches, budget, options, show_progress, report) -> dict[str, int]:
    """Ranks for `max_accuracy_drop=budget` (see [`allocate_ranks`]); `working` is a scratch copy of the model."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"`max_accuracy_drop` must be a positive number of metric points, got {budget!r}.")
    search = check_search(options.get("search", "exhaustive"))
    refine_steps = options.get("refine_steps")
    refine_steps = REFINE_STEPS[search] if refine_steps is None else refine_steps
    if batches is None:
        raise ValueError("`max_accuracy_drop` needs `eval_dataloader` (held-out batches with labels, from train).")
    check_dataloader(batches, "eval_dataloader")
    batches = list(batches)
    vocab = vocab_size(working)
    for batch in batches:
        check_batch(batch, vocab, "eval_dataloader")
    problem_type = getattr(working.config, "problem_type", None)
    num_labels = getattr(working.config, "num_labels", 2)
    problem_type = problem_type or ("regression" if num_labels == 1 else None)
    screening_samples = options.get("screening_samples", "auto")
    screening_samples = SCREENING_SAMPLES[search] if screening_samples == "auto" else screening_samples
    screening = spread_subset(batches, screening_samples)
    form = options.get("deployment") or (None, None)  # (dtype, quantize) the result ships in; the checks score it
    rows_fn = options.get("rows_fn") or head_rows
    joint_evaluator = LayerwiseEvaluator(working, batches, rows_fn)  # the joint checks: all rows, the real metric
    _check_labels(joint_evaluator, problem_type, num_labels)
    quantised = _row_quantised(options["metric_fn"], problem_type, joint_evaluator.kind)
    if quantised:
        _check_resolution(budget, len(joint_evaluator.labels), joint_evaluator.kind)
    # Per-module drops: cheap, smooth score on the screening rows (under autocast with a `screening_dtype`; the joint
    # checks, which alone decide that the budget holds, never run under it: they score the deployment `form`).
    screening_dtype = options.get("screening_dtype")
    if len(screening) == len(batches) and screening_dtype is None:
        evaluator = joint_evaluator
    else:
        evaluator = LayerwiseEvaluator(working, screening, rows_fn, autocast_dtype=screening_dtype)
    raw_metric = options["metric_fn"] or default_metric_fn(problem_type, evaluator.kind)
    metric_fn = _checked_metric(raw_metric)
    # Every joint check scores against the same budget, on all held-out rows (or, for the refinement, on a half).
    joint_check = functools.partial(
        _JointCheck,
        working,
        candidates,
        metric_fn=metric_fn,
        budget=budget,
        margin=options["safety_margin"],
        raw_metric=raw_metric,
        deploy=_deploy_hook(*form),
    )
    half_checks = []  # the fast search's refinement: joint checks on two halves of the held-out rows
    if search == "fast":
        bar = tqdm(total=1, desc="Joint checks", disable=not show_progress)
        joint = joint_check(joint_evaluator, progress=bar)
        shares = cost_shares(candidates)
        needed = max(CONFIRMATION_MIN_ROWS, min_heldout_rows(budget) if quantised else 0)

        def halves():
            """Joint checks on two halves of the held-out batches (alternate ones: they are sorted by length), built
            only when the refinement runs; None when a half would hold fewer than `needed` rows, or when the metric
            belongs to the whole held-out set (its `bootstrap_sample` resamples its own units)."""
            parts = (range(0, len(batches), 2), range(1, len(batches), 2))
            smallest = min(count_rows([batches[i] for i in part]) for part in parts)
            if hasattr(raw_metric, "bootstrap_sample") or smallest < needed:
                return None
            # the working copy is as it was when the joint evaluator read its first rows: the halves take theirs
            half_checks.extend(joint_check(joint_evaluator.subset(part), progress=bar) for part in parts)
            return tuple(half_checks)

        refined, details = path_search(
            joint, candidates, evaluator, problem_type, shares, refine_steps, show_progress, quantised, halves
        )
        details["shares"] = shares
        if options.get("refit") is not None:
            bar.total += options["sequential_checks"] + 1
            sequential = joint_check(joint_evaluator, progress=bar, refit=options["refit"])
            refined, details["sequential"] = extend_sequential(
                sequential,
                details["path"],
                details["path_step"],
                refined,
                options["sequential_checks"],
            )
            joint.entries.update({("sequential",) + key: entry for key, entry in sequential.entries.items()})
    else:
        # At most 8 + 5 scale checks and `refine_steps` refinement checks, each a pass over all held-out rows.
        bar = tqdm(total=13 + refine_steps, desc="Joint checks", disable=not show_progress)
        joint = joint_check(joint_evaluator, progress=bar)
        refined, details = _exhaustive_search(
            working, joint, candidates, evaluator, problem_type, refine_steps, show_progress
        )
    bar.total = bar.n  # stopped early (cached or exhausted checks): end the bar at what ran
    bar.close()
    evaluators = [evaluator] + ([joint_evaluator] if joint_evaluator is not evaluator else [])
    evaluators += [check.evaluator for check in half_checks]
    report.update(
        search=search,
        evaluations=sum(e.evaluations for e in evaluators),
        evaluation_seconds=sum(e.seconds for e in evaluators),
        heldout_row_passes=sum(e.row_passes for e in evaluators),
        joint_check_count=len(joint.entries) + sum(len(check.entries) for check in half_checks),
        heldout_examples=int(len(joint_evaluator.labels)),
        screening_examples=int(len(evaluator.labels)),
        screening_dtype=str(screening_dtype).removeprefix("torch.") if screening_dtype is not None else None,
        heldout_base_metric=joint.base_metric,
        heldout_drop=refined["drop"],
        heldout_standard_error=refined["standard_error"],
        safety_margin=joint.margin,
        cost_model=candidates.cost_model,
        joint_check_form=describe_deployment(*form) if any(form) else "as given",
        heldout_kind=evaluator.kind,
        refined_steps=refined.get("steps", 0),
        **details,
        joint_checks=[
            {key: entry.get(key) for key in ("scale", "drop", "standard_error", "stage")}
            | ({"step": entry["step"]} if "step" in entry else {})
            | {"modules": len(entry["ranks"])}
            for entry in joint.entries.values()
        ],
    )
    return refined["ranks"]


def _exhaustive_search(working, joint, candidates, evaluator, problem_type, refine_steps, show_progress):
    """The DRONE appendix's search: a drop curve per module, the budget split by cost shares and scaled by joint
    checks, then `refine_steps` single-module moves. Returns the chosen entry and what to report."""
    budget = joint.budget
    shares = cost_shares(candidates)
    curves = _module_curves(working, candidates, evaluator, problem_type, budget, show_progress)
    # Scale the per-module shares so that the joint drop is within the budget: grow while it fits, then bisect.
    low, high, scale = 0.0, None, 1.0
    for _ in range(8):
        if joint.fits(_select(curves, shares, budget, scale), scale=scale):
            low, scale = scale, scale * 2
        else:
            high = scale
            break
    if high is None:
        high = scale
    for _ in range(5):
        middle = (low + high) / 2 if low > 0 else high / 4
        if joint.fits(_select(curves, shares, budget, middle), scale=middle):
            low = middle
        else:
            high = middle
    feasible = [entry for entry in joint.entries.values() if joint.accepts(entry)]
    best = max(feasible, key=lambda e: e["scale"], default={"ranks": {}, "drop": 0.0, "standard_error": 0.0})
    refined = _refine(joint, candidates, curves, best, refine_steps)
    details = {"scale": best.get("scale", 0.0), "time_share_ranks": best["ranks"], "shares": shares, "curves": curves}
    return refined, details


def _module_curves(working, candidates, evaluator, problem_type, budget, show_progress) -> dict[str, dict[int, float]]:
    """Each candidate compressed alone at each grid rank (largest first; early exit past the whole budget), scored by
    [`soft_change`] on the screening rows, re-running only the layers from the candidate's on."""
    reference = evaluator.initial_rows  # nothing is swapped in yet
    curves: dict[str, dict[int, float]] = {name: {} for name in candidates.names}
    total_steps = sum(len(candidates.grid[name]) for name in candidates.names)
    with tqdm(total=total_steps, desc="Allocating ranks", disable=not show_progress) as progress:
        for layer in sorted({candidates.layer[name] for name in candidates.names}):
            evaluator.advance_to(layer)
            for name in [n for n in candidates.names if candidates.layer[n] == layer]:
                for rank in sorted(candidates.grid[name], reverse=True):
                    drop = module_drop(working, candidates, name, rank, evaluator, reference, problem_type)
                    curves[name][rank] = drop
                    progress.update(1)
                    if drop > budget:  # smaller ranks only lose more: early exit
                        progress.update(sum(1 for r in candidates.grid[name] if r < rank))
                        break
    return curves


def _deploy_hook(dtype, quantize):
    """The joint checks' `deploy` step for a deployment form: int8 modules swapped in ([`swap_in_int8`]) or the working
    copy cast ([`swap_in_dtype`]); each returns its undo. None for the model as given."""
    if quantize is not None:
        return swap_in_int8
    if dtype is not None:
        return functools.partial(swap_in_dtype, dtype=dtype)
    return None


class _JointCheck:
    """Scores whole rank assignments on all held-out rows with the real metric (cached by assignment). An assignment
    fits when its drop plus `margin` paired standard errors is within the budget. The drop is always against the
    model as given (its first pass); `refit` (`working -> replaced modules`) and then `deploy` (`working -> undo`,
    see [`_deploy_hook`]) turn each assignment into the model that will ship before it is scored."""

    def __init__(
        self,
        working,
        candidates,
        evaluator,
        metric_fn,
        budget,
        margin,
        raw_metric=None,
        progress=None,
        refit=None,
        deploy=None,
    ):
        self.working, self.candidates, self.evaluator = working, candidates, evaluator
        self.refit, self.deploy = refit, deploy
        self.progress = progress
        self.metric_fn, self.budget, self.margin = metric_fn, budget, margin
        self.raw_metric = raw_metric or metric_fn  # for bootstrap resamples, where a NaN is only dropped
        self.labels = evaluator.labels
        self.base_logits = evaluator.initial_rows  # built just before, on the unchanged model
        self.base_metric = metric_fn(self.base_logits, self.labels)
        self.entries: dict[tuple, dict] = {}

    def score(self, ranks, **extra) -> dict:
        key = tuple(sorted(ranks.items()))
        if key not in self.entries:
            originals = apply_ranks(self.working, self.candidates, ranks)
            refitted, undeploy = {}, None
            try:
                if self.refit is not None:
                    refitted = self.refit(self.working)
                if self.deploy is not None:
                    undeploy = self.deploy(self.working)
                logits = self.evaluator.logits(0)
            finally:
                if undeploy is not None:
                    undeploy()
                restore_modules(self.working, refitted)
                restore_modules(self.working, originals)
            drop = self.base_metric - self.metric_fn(logits, self.labels)
            # measured with no margin too: the report states the chosen drop's uncertainty either way
            error = paired_standard_error(self.raw_metric, self.base_logits, logits, self.labels)
            self.entries[key] = {"drop": drop, "standard_error": error, "ranks": dict(ranks), **extra}
            if self.progress is not None:
                self.progress.update(1)
        return self.entries[key]

    def accepts(self, entry) -> bool:
        return entry["drop"] + self.margin * entry["standard_error"] <= self.budget

    def fits(self, ranks, **extra) -> bool:
        return self.accepts(self.score(ranks, **extra))


def _refine(joint: _JointCheck, candidates, curves, start: dict, steps: int) -> dict:
    """The "adjustment" after the joint check: starting from the time-share allocation, repeatedly tries to move one
    module one grid rank down (or from dense to its largest rank), cheapest measured drop per multiply-add saved
    first, keeping each move only if the whole assignment still fits. At most `steps` joint checks."""
    current = dict(start)
    ranks = dict(current["ranks"])

    def next_step(name):
        ladder = sorted(curves[name], reverse=True)  # evaluated ranks only
        here = ranks.get(name)
        lower = ladder if here is None else [r for r in ladder if r < here]
        if not lower:
            return None
        rank = lower[0]
        extra_loss = curves[name][rank] - (0.0 if here is None else curves[name][here])
        saved = candidates.macs(name, here) - candidates.macs(name, rank)
        return (max(extra_loss, 0.0) / max(saved, 1), name, rank) if saved > 0 else None

    heap = [step for step in map(next_step, candidates.names) if step is not None]
    heapq.heapify(heap)
    tried = 0
    while heap and tried < steps:
        _, name, rank = heapq.heappop(heap)
        trial = {**ranks, name: rank}
        tried += 1
        entry = joint.score(trial, stage="refine")
        if joint.accepts(entry):
            ranks, current = trial, entry
            step = next_step(name)
            if step is not None:
                heapq.heappush(heap, step)
    return {**current, "ranks": ranks, "steps": tried}


__all__ = [
    "CONFIRMATION_MIN_ROWS",
    "MIN_BUDGET_ROWS",
    "REFINE_STEPS",
    "SCREENING_SAMPLES",
    "SEARCHES",
    "SEARCH_REVISION",
    "allocate_by_accuracy",
    "check_search",
    "min_heldout_rows",
]
