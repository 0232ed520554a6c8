"""The fast search of an accuracy budget (`search="fast"`; docs/methods.md §1b).

Instead of a measured drop curve per module (one held-out evaluation per module and grid rank), each module's drop at
every rank is *predicted* from the closed form's relative residual energy (free: it comes with the decomposition),
calibrated by one held-out evaluation per module at a probe rank. The predicted drops order every single-module move
by the increase of the sum of squared predicted drops per unit of cost saved (multiply-adds, or seconds measured in a
deployment form): a water-filling on one global scale, where a prefix of that ordering is the Lagrangian allocation
for some multiplier. The length of the
prefix is bisected with real joint checks, then a few more moves along the ordering are tried one by one. Only the
joint checks decide what is returned, so a wrong prediction costs speed, never the budget. Nothing here reads a
clock."""

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


SCREEN_REJECT_Z = 2.0
"""A bisection step is rejected without its joint check when its drop on the screening rows (real metric) exceeds the
budget by more than this many of their paired standard errors: a cheap early exit for the steps far past the budget.
Acceptance always needs the full joint check."""


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


def water_filling_path(
    drops: Mapping[str, Mapping[int, float]], cost: Callable[[str, int | None], float]
) -> list[tuple[str, int]]:
    """Every module's moves from dense down to its smallest rank, in one order of increasing predicted drop per
    unit of `cost(name, rank)` saved (`rank=None`: dense). Each module moves along the lower convex hull of its
    (cost, predicted drop) points, so its own ratios only grow and the order is that of a single global multiplier:
    the first `t` moves are the cheapest assignment for some price of a point of drop, and the assignments only ever
    compress further."""

    def next_move(name, here):
        here_drop = 0.0 if here is None else drops[name][here]
        best = None
        for rank in drops[name]:
            saved = cost(name, here) - cost(name, rank)
            if (here is not None and rank >= here) or saved <= 0:
                continue
            ratio = max(drops[name][rank] - here_drop, 0.0) / saved
            if best is None or (ratio, -saved) < (best[0], -best[1]):
                best = (ratio, saved, rank)
        return None if best is None else (best[0], -best[1], name, best[2])

    heap = [move for move in (next_move(name, None) for name in drops) if move is not None]
    heapq.heapify(heap)
    path = []
    while heap:
        _, _, name, rank = heapq.heappop(heap)
        path.append((name, rank))
        move = next_move(name, rank)
        if move is not None:
            heapq.heappush(heap, move)
    return path


def assignment(path: list[tuple[str, int]], step: int) -> dict[str, int]:
    """The ranks after the first `step` moves of `path` (later moves of a module overwrite earlier ones)."""
    return dict(path[:step])


def bisect_path(fits: Callable[[int], bool], length: int) -> int:
    """The largest `step` in `[0, length]` that `fits`, by bisection, assuming that `step = 0` (dense) fits and that
    what fits is a prefix of the steps. `fits` is called at most `ceil(log2(length + 1))` times."""
    low, high = 0, length + 1  # `low` fits; `high` does not (length + 1: past the end)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def probe_modules(working, candidates, evaluator, problem_type, show_progress) -> tuple[dict, object]:
    """Each candidate compressed alone at its probe rank and scored by [`soft_change`] on the screening rows,
    re-running only the layers from the candidate's on: one evaluation per candidate. Returns the probes (name ->
    `(rank, drop)`) and the dense model's rows on the screening rows."""
    labels, reference = evaluator.labels, evaluator.logits(0)
    probes = {}
    with tqdm(total=len(candidates.names), desc="Probing modules", disable=not show_progress) as progress:
        for layer in sorted({candidates.layer[name] for name in candidates.names}):
            evaluator.advance_to(layer)
            for name in [n for n in candidates.names if candidates.layer[n] == layer]:
                rank = probe_rank(candidates.grid[name])
                original = swap_module(working, name, candidates.module(name, rank))
                try:
                    drop = soft_change(reference, evaluator.logits(), labels, problem_type, evaluator.kind)
                finally:
                    swap_module(working, name, original)
                if not math.isfinite(drop):
                    raise ValueError(
                        f"The held-out outputs of the model with `{name}` at rank {rank} are not finite (NaN/Inf "
                        "drop); check the model's dtype (float16 can overflow) and the held-out inputs."
                    )
                probes[name] = (rank, drop)
                progress.update(1)
    return probes, reference


class _Screen:
    """The early exit of the bisection: scores an assignment on the screening rows with the real metric and says
    whether it is clearly past the budget ([`SCREEN_REJECT_Z`])."""

    def __init__(self, joint, evaluator, reference):
        self.joint, self.evaluator, self.reference = joint, evaluator, reference
        self.rejected: list[dict] = []

    def rejects(self, ranks, step) -> bool:
        joint = self.joint
        if tuple(sorted(ranks.items())) in joint.entries:
            return False  # already scored on all rows
        originals = apply_ranks(joint.working, joint.candidates, ranks)
        try:
            logits = self.evaluator.logits(0)
        finally:
            restore_modules(joint.working, originals)
        labels = self.evaluator.labels
        drop = joint.raw_metric(self.reference, labels) - joint.raw_metric(logits, labels)
        error = paired_standard_error(joint.raw_metric, self.reference, logits, labels)
        clearly_past = math.isfinite(drop) and drop - SCREEN_REJECT_Z * error > joint.budget
        if clearly_past:
            self.rejected.append({"step": step, "drop": float(drop), "standard_error": error})
        return clearly_past


def path_search(joint, candidates, evaluator, problem_type, refine_steps: int, show_progress=False):
    """Ranks for the budget of `joint` (a `budget_search._JointCheck`): probes, predicted drops, the water-filling
    path, bisection of its length by joint checks, then up to `refine_steps` further joint checks trying the next
    moves of the path one at a time (a module whose move fails moves no further). Returns the accepted entry (ranks,
    drop, standard error) and what to report. A bisection step clearly past the budget on the screening rows is
    rejected without its joint check (`_Screen`). At most `len(candidates.names) + 1 + ceil(log2(moves + 1))`
    screening evaluations and `ceil(log2(moves + 1)) + refine_steps` joint checks."""
    probes, reference = probe_modules(joint.working, candidates, evaluator, problem_type, show_progress)
    screen = _Screen(joint, evaluator, reference) if evaluator is not joint.evaluator else None
    tails = {name: candidates.energy_loss(name) for name in candidates.names}
    grids = {name: list(candidates.grid[name]) for name in candidates.names}
    drops = predicted_drops(tails, grids, probes)
    # Perturbations of different modules add in energy (their output changes point in unrelated directions), so the
    # joint change of several modules is about the root of the sum of their squares: the path prices squared drops,
    # which spreads the compression over many modules instead of cutting a few deeply.
    squared = {name: {rank: drop**2 for rank, drop in curve.items()} for name, curve in drops.items()}
    path = water_filling_path(squared, candidates.cost)
    bisection_checks = math.ceil(math.log2(len(path) + 1))
    if joint.progress is not None:
        joint.progress.total = bisection_checks + refine_steps
        joint.progress.refresh()

    def fits(step):
        ranks = assignment(path, step)
        if screen is not None and screen.rejects(ranks, step):
            return False
        return joint.fits(ranks, step=step, stage="bisect")

    step = bisect_path(fits, len(path))
    ranks = assignment(path, step)
    accepted = joint.score(ranks, step=step, stage="bisect") if ranks else {"drop": 0.0, "standard_error": 0.0}
    tried, blocked = 0, set()
    for name, rank in path[step:]:
        if tried >= refine_steps:
            break
        if name in blocked:
            continue
        trial = {**ranks, name: rank}
        fresh = tuple(sorted(trial.items())) not in joint.entries
        entry = joint.score(trial, stage="refine")
        tried += fresh
        if joint.accepts(entry):
            ranks, accepted = trial, entry
        else:
            blocked.add(name)
    details = {
        "probes": {name: {"rank": rank, "drop": drop} for name, (rank, drop) in probes.items()},
        "energy_exponent": ENERGY_EXPONENT,
        "predicted_curves": drops,
        "path_moves": len(path),
        "path": [[name, rank] for name, rank in path],
        "path_step": step,
        "screened_rejections": [] if screen is None else screen.rejected,
    }
    return {**accepted, "ranks": ranks, "steps": tried}, details


__all__ = [
    "ENERGY_EXPONENT",
    "assignment",
    "bisect_path",
    "path_search",
    "predicted_drops",
    "probe_rank",
    "water_filling_path",
]
