"""The fast search of an accuracy budget (`search="fast"`; docs/methods.md §1b).

Instead of a measured drop curve per module (one held-out evaluation per module and grid rank), each module's drop at
every rank is *predicted* from the closed form's relative residual energy (free: it comes with the decomposition),
calibrated by one held-out evaluation per module at a probe rank. The predicted drops then order every single-module
move by the one global scale at which the DRONE appendix's time-share rule allows it (each module the smallest rank
whose drop fits its share of the cost, multiply-adds or seconds measured in a deployment form, times the scale), so a
prefix of that ordering is the time-share allocation at some scale. The length of the prefix is bisected (steps
clearly past or within the budget on the screening rows settled there, the others and the step found by real joint
checks), then single-module moves one grid rank down are tried in growing groups, the cheapest predicted drop per
unit of cost saved first (the exhaustive search's adjustment, on the predicted curves), chosen on one half of the
held-out rows and confirmed on the other. Only the joint checks decide what is returned, so a wrong prediction costs
speed, never the budget. Nothing here reads a clock."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping

from transformers.utils.logging import tqdm

from .candidates import apply_ranks, restore_modules, swap_module
from .heads import soft_change
from .heldout import paired_standard_error


ENERGY_EXPONENT = 0.5
"""Predicted drop at rank `k` = probe drop * (residual energy at `k` / residual energy at the probe rank) ** this. A
module's discarded output energy is the squared size of the change it makes; to first order a probability moves with
the size of the change, its square root."""


SCREEN_Z = 2.0
"""A bisection step is settled on the screening rows (real metric) without its joint check when its drop there is
more than this many of their paired standard errors past the budget (rejected), or within the budget by this many
plus the joint check's own margin (accepted for the bisection). The assignment returned is always joint-checked."""


SCREEN_PATIENCE = 2
"""The bisection stops consulting the screening rows after this many undecided verdicts in a row. Its steps close in
on the budget's edge, where the screening rows settle nothing; each verdict costs a pass over them (at base size a
sixth of a joint check with 256 of 1536 rows, a third with 512), so past that point they only add time."""


def probe_rank(grid: list[int]) -> int:
    """The rank a module is evaluated at to calibrate its prediction: the middle of its (sorted) grid."""
    return sorted(grid)[len(grid) // 2]


def predicted_drops(
    tails: Mapping[str, Callable[[int | None], float]],
    grids: Mapping[str, list[int]],
    probes: Mapping[str, tuple[int, float]],
    exponent: float = ENERGY_EXPONENT,
) -> dict[str, dict[int, float]]:
    """Each module's predicted drop at each grid rank: its measured drop at the probe rank, scaled by the `exponent`
    power of the ratio of relative residual energies (`tails[name](rank)`). A module whose probe rank discards no
    energy gets the largest drop-per-energy coefficient of the others (a cautious guess)."""
    coefficients = {}
    for name, (rank, drop) in probes.items():
        energy = tails[name](rank)
        coefficients[name] = drop / energy**exponent if energy > 0 else None
    fallback = max((c for c in coefficients.values() if c is not None), default=0.0)
    drops = {}
    for name, grid in grids.items():
        coefficient = fallback if coefficients[name] is None else coefficients[name]
        drops[name] = {rank: coefficient * tails[name](rank) ** exponent for rank in grid}
    return drops


def share_path(drops: Mapping[str, Mapping[int, float]], shares: Mapping[str, float]) -> list[tuple[str, int]]:
    """Every module's moves from dense down to its smallest rank, in the order in which one global scale `s` lets
    them: module `m` may take rank `k` once `s * shares[m]` reaches its predicted drop at `k` and at every larger
    rank (a rank is only as safe as the ranks above it). The first `t` moves are the DRONE appendix's time-share
    allocation (each module the smallest rank whose drop fits its share of a scaled budget) for some scale, and each
    further move only compresses more."""
    moves = []
    for order, name in enumerate(drops):
        level = 0.0
        for rank in sorted(drops[name], reverse=True):
            level = max(level, drops[name][rank] / max(shares[name], 1e-300))
            moves.append((level, order, -rank, name, rank))
    return [(name, rank) for *_, name, rank in sorted(moves)]


def assignment(path: list[tuple[str, int]], step: int) -> dict[str, int]:
    """The ranks after the first `step` moves of `path` (later moves of a module overwrite earlier ones)."""
    return dict(path[:step])


def bisect_path(fits: Callable[[int], bool], length: int, low: int = 0) -> int:
    """The largest `step` in `[low, length]` that `fits`, by bisection, assuming that `step = low` fits (`0`: dense)
    and that what fits is a prefix of the steps. `fits` is called at most `ceil(log2(length - low + 1))` times."""
    high = length + 1  # `low` fits; `high` does not (length + 1: past the end)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def module_drop(working, candidates, name: str, rank: int, evaluator, reference, problem_type) -> float:
    """[`soft_change`] on the screening rows with `name` alone at `rank` (the layers from its own on re-run by
    `evaluator`); the module is put back whatever happens.

    Raises:
        `ValueError`: when the compressed model's held-out outputs are not finite.
    """
    original = swap_module(working, name, candidates.module(name, rank))
    try:
        drop = soft_change(reference, evaluator.logits(), evaluator.labels, problem_type, evaluator.kind)
    finally:
        swap_module(working, name, original)
    if not math.isfinite(drop):
        raise ValueError(
            f"The held-out outputs of the model with `{name}` at rank {rank} are not finite (NaN/Inf drop); check "
            "the model's dtype (float16 can overflow) and the held-out inputs."
        )
    return drop


def probe_modules(working, candidates, evaluator, problem_type, show_progress) -> tuple[dict, object]:
    """Each candidate compressed alone at its probe rank and scored by [`soft_change`] on the screening rows,
    re-running only the layers from the candidate's on: one evaluation per candidate. Returns the probes (name ->
    `(rank, drop)`) and the dense model's rows on the screening rows."""
    reference = evaluator.initial_rows  # nothing is swapped in yet
    probes = {}
    with tqdm(total=len(candidates.names), desc="Probing modules", disable=not show_progress) as progress:
        for layer in sorted({candidates.layer[name] for name in candidates.names}):
            evaluator.advance_to(layer)
            for name in [n for n in candidates.names if candidates.layer[n] == layer]:
                rank = probe_rank(candidates.grid[name])
                probes[name] = (rank, module_drop(working, candidates, name, rank, evaluator, reference, problem_type))
                progress.update(1)
    return probes, reference


class _Screen:
    """The shortcut of the bisection: scores an assignment on the screening rows with the real metric and settles
    the steps that are clearly past or clearly within the budget ([`SCREEN_Z`]) without a joint check."""

    def __init__(self, joint, evaluator, reference, min_error: float = 0.0):
        self.joint, self.evaluator, self.reference = joint, evaluator, reference
        # A joint check's standard error is about the screening one times this (the paired error falls as 1/sqrt(n)).
        self.error_ratio = math.sqrt(len(evaluator.labels) / len(joint.labels))
        # An acceptance counts at least this error (one screening row's worth for a per-row metric): a step that
        # changes no screening row has a zero bootstrap error, and is not thereby known to be within the budget.
        self.min_error = min_error
        self.rejected: list[dict] = []
        self.accepted: list[dict] = []
        self.undecided: list[dict] = []
        self._in_a_row = 0  # undecided verdicts since the last decided one

    def verdict(self, ranks, step) -> bool | None:
        """`False`: clearly past the budget; `True`: clearly within it, the joint check's margin included; `None`:
        undecided (or already joint-checked, or the screen has stopped: [`SCREEN_PATIENCE`]), the joint check
        decides."""
        joint = self.joint
        if self._in_a_row >= SCREEN_PATIENCE or tuple(sorted(ranks.items())) in joint.entries:
            return None
        originals = apply_ranks(joint.working, joint.candidates, ranks)
        try:
            logits = self.evaluator.logits(0)
        finally:
            restore_modules(joint.working, originals)
        labels = self.evaluator.labels
        drop = joint.raw_metric(self.reference, labels) - joint.raw_metric(logits, labels)
        error = paired_standard_error(joint.raw_metric, self.reference, logits, labels)
        if not math.isfinite(drop):
            return None
        entry = {"step": step, "drop": float(drop), "standard_error": error}
        if drop - SCREEN_Z * error > joint.budget:
            self.rejected.append(entry)
            self._in_a_row = 0
            return False
        if drop + (SCREEN_Z + joint.margin * self.error_ratio) * max(error, self.min_error) <= joint.budget:
            self.accepted.append(entry)
            self._in_a_row = 0
            return True
        self.undecided.append(entry)
        self._in_a_row += 1
        return None


def _bisect(joint, path, screen) -> int:
    """The last step of `path` whose assignment passes the joint check: bisection with the steps the screening rows
    settle (`screen`), then the joint check of the step found; when it refuses a step the screen accepted, the
    bisection starts again below it, from the last step the joint checks accepted, on joint checks alone."""

    def joint_fits(step):
        return joint.fits(assignment(path, step), step=step, stage="bisect")

    def fits(step):
        verdict = None if screen is None else screen.verdict(assignment(path, step), step)
        return joint_fits(step) if verdict is None else verdict

    step = bisect_path(fits, len(path))
    while step and not joint_fits(step):
        known = [e["step"] for e in joint.entries.values() if e.get("step", step) < step and joint.accepts(e)]
        step = bisect_path(joint_fits, step - 1, low=max(known, default=0))
    return step


def _refine(joint, candidates, drops, ranks, accepted, refine_steps) -> tuple[dict, dict, int]:
    """Up to `refine_steps` joint checks after the bisection: moves of one module one grid rank down, the cheapest
    predicted drop per unit of cost saved first (the exhaustive search's adjustment, on the predicted curves), tried
    in groups: a group that fits is kept and the next group is twice as large, one that does not is halved (a single
    move that does not fit blocks its module). Returns the ranks, their joint-check entry and the number of checks
    run."""

    def next_move(name, here):
        lower = sorted((rank for rank in drops[name] if here is None or rank < here), reverse=True)
        if not lower:
            return None
        rank = lower[0]
        extra = drops[name][rank] - (0.0 if here is None else drops[name][here])
        saved = candidates.cost(name, here) - candidates.cost(name, rank)
        return (max(extra, 0.0) / saved, name, rank) if saved > 0 else None

    queue = [move for move in (next_move(name, ranks.get(name)) for name in drops) if move is not None]
    heapq.heapify(queue)
    tried, size = 0, 1
    while tried < refine_steps and queue:
        group = [heapq.heappop(queue) for _ in range(min(size, len(queue)))]
        trial = {**ranks, **{name: rank for _, name, rank in group}}
        fresh = tuple(sorted(trial.items())) not in joint.entries
        entry = joint.score(trial, stage="refine", moves=len(group))
        tried += fresh
        if joint.accepts(entry):
            ranks, accepted, size = trial, entry, size * 2
            for _, name, rank in group:
                move = next_move(name, rank)
                if move is not None:
                    heapq.heappush(queue, move)
        elif len(group) > 1:
            for move in group:
                heapq.heappush(queue, move)
            size = max(1, len(group) // 2)
        # a single move that does not fit is dropped: its module is blocked
    return ranks, accepted, tried


def screens(joint, evaluator) -> bool:
    """Whether the bisection can settle steps on the screening rows: they are a true subset of the held-out rows,
    and the metric scores any rows (not one tied to the full held-out set, such as entity F1 over its sentences or
    SQuAD F1 over its examples, whose `bootstrap_sample` resamples its own units)."""
    return evaluator is not joint.evaluator and not hasattr(joint.raw_metric, "bootstrap_sample")


def _confirmed_refine(joint, halves, candidates, drops, ranks, accepted, refine_steps):
    """[`_refine`] with its moves chosen on one half of the held-out rows and the result confirmed on the other.

    Each refinement check keeps a move whose drop, on the rows that judge it, happens to come out low; after a few
    dozen checks the kept moves are those the noise of those rows favoured (at base size, 24 checks added a point
    of dev drop at an unchanged held-out drop). So the moves are tried on the `selection` half (`halves[0]`), and
    the assignment they reach is kept only if it also fits on the `confirmation` half (`halves[1]`), rows that chose
    nothing, and then on all held-out rows (scored only when the confirmation half accepts); otherwise the
    bisection's ranks are returned. Returns the ranks, their all-rows entry, the number of selection checks and what
    to report."""
    selection, confirmation = halves
    start = dict(ranks)
    ranks, _, tried = _refine(selection, candidates, drops, ranks, accepted, refine_steps)
    report = {
        "selection_rows": len(selection.labels),
        "confirmation_rows": len(confirmation.labels),
        "selection_checks": tried,
        "moves": sum(ranks.get(name) != start.get(name) for name in ranks),
        "drop": None,
        "standard_error": None,
        "kept": False,
    }
    if ranks == start:
        return start, accepted, tried, report
    check = confirmation.score(ranks, stage="confirm")
    report.update(drop=check["drop"], standard_error=check["standard_error"])
    if not confirmation.accepts(check):  # refused: no all-rows check could overturn that, so none is run
        return start, accepted, tried, report
    entry = joint.score(ranks, stage="refine")
    report["kept"] = joint.accepts(entry)
    return (ranks, entry, tried, report) if report["kept"] else (start, accepted, tried, report)


def path_search(
    joint,
    candidates,
    evaluator,
    problem_type,
    shares,
    refine_steps: int,
    show_progress=False,
    row_quantised=False,
    halves=None,
):
    """Ranks for the budget of `joint` (a `budget_search._JointCheck`): probes, predicted drops, the path of one
    global scale over the cost `shares` ([`share_path`]), bisection of its length ([`_bisect`]: steps clearly past
    or within the budget on the screening rows are settled there, `_Screen`), then up to `refine_steps` further
    joint checks on single-module moves, cheapest predicted drop per cost saved first, in growing groups
    ([`_refine`]). Returns the accepted entry (ranks, drop, standard error) and what to report. Only joint checks
    accept what is returned. At most `len(candidates.names) + ceil(log2(moves + 1))` screening evaluations (the
    screen stops after [`SCREEN_PATIENCE`] undecided verdicts in a row) and, unless the joint check refuses a step
    the screening rows accepted, `ceil(log2(moves + 1)) + 1 + refine_steps` joint checks. `row_quantised`: the metric
    moves by `100 / n` points per row (accuracy, F1), the least error a screened acceptance assumes. `halves`: a
    callable returning `(selection, confirmation)` joint checks on two halves of the held-out rows (or None); when
    given, the refinement's moves are chosen on the first and confirmed on the second ([`_confirmed_refine`]): then
    its `refine_steps` checks each cost half a joint check, and confirming costs half a check, plus one on all rows
    when the confirmation half accepts."""
    probes, reference = probe_modules(joint.working, candidates, evaluator, problem_type, show_progress)
    min_error = 100.0 / len(evaluator.labels) if row_quantised else 0.0
    screen = _Screen(joint, evaluator, reference, min_error) if screens(joint, evaluator) else None
    tails = {name: candidates.energy_loss(name) for name in candidates.names}
    grids = {name: list(candidates.grid[name]) for name in candidates.names}
    drops = predicted_drops(tails, grids, probes)
    path = share_path(drops, shares)
    if joint.progress is not None:
        joint.progress.total = math.ceil(math.log2(len(path) + 1)) + 1 + refine_steps
        joint.progress.refresh()
    step = _bisect(joint, path, screen)
    ranks = assignment(path, step)
    accepted = joint.score(ranks, step=step, stage="bisect") if ranks else {"drop": 0.0, "standard_error": 0.0}
    pair = halves() if halves is not None and refine_steps > 0 and step < len(path) else None
    if pair is None:
        ranks, accepted, tried = _refine(joint, candidates, drops, ranks, accepted, refine_steps)
        confirmation = None
    else:
        ranks, accepted, tried, confirmation = _confirmed_refine(
            joint, pair, candidates, drops, ranks, accepted, refine_steps
        )
    details = {
        "probes": {name: {"rank": rank, "drop": drop} for name, (rank, drop) in probes.items()},
        "energy_exponent": ENERGY_EXPONENT,
        "predicted_curves": drops,
        "path_moves": len(path),
        "path": [[name, rank] for name, rank in path],
        "path_step": step,
        "screened_rejections": [] if screen is None else screen.rejected,
        "screened_acceptances": [] if screen is None else screen.accepted,
        "screened_undecided": [] if screen is None else screen.undecided,
        "refinement_confirmation": confirmation,
    }
    return {**accepted, "ranks": ranks, "steps": tried}, details


def extend_sequential(joint, path, step: int, found: dict, checks: int) -> tuple[dict, dict]:
    """The fast search's result taken further with the sequential refit (`joint.refit`, [`~drone_hf.sequential`]):
    every assignment is refitted before its joint check, which then judges the model `compress_model(...,
    sequential=True)` returns. The refitted search result (`found`, reached at `step` moves of `path`) is checked
    first; then up to `checks` joint checks bisect the moves after it (each step adds the path's next moves to
    `found`'s ranks). When the refitted result itself does not fit, the bisection runs below `step` instead. Returns
    the accepted entry (`ranks`, `drop`, `standard_error`; no ranks when nothing fits) and what to report."""
    ranks = dict(found["ranks"])

    def trial(at: int) -> dict[str, int]:
        return {**ranks, **dict(path[step:at])} if at >= step else assignment(path, at)

    start = joint.score(ranks, step=step, stage="sequential") if ranks else None
    if start is not None and joint.accepts(start):
        low, high, best = step, len(path) + 1, start
    else:
        low, high, best = 0, step, {"drop": 0.0, "standard_error": 0.0, "ranks": {}}
    tried = 0
    while high - low > 1 and tried < checks:
        middle = (low + high) // 2
        entry = joint.score(trial(middle), step=middle, stage="sequential")
        tried += 1
        if joint.accepts(entry):
            low, best = middle, entry
        else:
            high = middle
    details = {
        "start_step": step,
        "start_drop": None if start is None else start["drop"],
        "start_standard_error": None if start is None else start["standard_error"],
        "step": low,
        "checks": tried + (start is not None),
        "open_interval": [low, high],
    }
    return {**best, "ranks": dict(best["ranks"]), "steps": found.get("steps", 0)}, details


__all__ = [
    "ENERGY_EXPONENT",
    "extend_sequential",
    "SCREEN_PATIENCE",
    "SCREEN_Z",
    "assignment",
    "bisect_path",
    "path_search",
    "predicted_drops",
    "probe_rank",
    "share_path",
]
