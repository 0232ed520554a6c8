"""The fast accuracy-budget search (`search="fast"`, drone_hf.budget_path) and the choice between the searches."""

import math

import numpy as np
import pytest
import torch

from drone_hf import DroneCompressionArguments, allocate_ranks, budget_path, collect_activation_stats, compress_model
from drone_hf.budget_path import (
    SCREEN_PATIENCE,
    _bisect,
    _confirmed_refine,
    _refine,
    _Screen,
    assignment,
    bisect_path,
    predicted_drops,
    probe_rank,
    share_path,
)
from drone_hf.budget_search import CONFIRMATION_MIN_ROWS, REFINE_STEPS, _select
from drone_hf.cli_report import refinement_phrase
from drone_hf.heldout import spread_subset

from .testing_utils import measured_drop, self_labelled_case, tiny_batches, tiny_teacher


@pytest.fixture(scope="module")
def case():
    """A tiny teacher whose labels are its own predictions, and a metric that sees every small change of the
    logits (so that a budget of a few hundredths of a point binds on a tiny model)."""
    model, batches, reference, logit_metric = self_labelled_case()
    return model, batches, collect_activation_stats(model, batches), logit_metric, reference


def test_bisection_finds_the_last_fitting_step_within_log2_checks():
    for length in (0, 1, 2, 7, 8, 100):
        for threshold in range(length + 1):
            calls = []

            def fits(step, threshold=threshold, calls=calls):
                calls.append(step)
                return step <= threshold

            assert bisect_path(fits, length) == threshold
            assert len(calls) <= math.ceil(math.log2(length + 1))
            assert 0 not in calls  # dense is known to fit: never checked


def test_share_path_is_the_time_share_rule_at_every_scale():
    """Each prefix of the path is the DRONE appendix's time-share allocation (`budget_search._select`) at some scale,
    and every move only compresses further."""
    rng = np.random.default_rng(0)
    drops, shares = {}, {}
    for name in "abcd":
        grid = [4, 8, 12, 16]
        values = np.sort(rng.random(len(grid)))[::-1]  # smaller rank, larger drop...
        values[1] = values[2] * 0.9  # ...except one dip: rank 8 looks safer than 12, but is read from the top
        drops[name] = dict(zip(grid, values.tolist()))
        shares[name] = float(rng.random())
    path = share_path(drops, shares)
    assert len(path) == sum(len(curve) for curve in drops.values())
    levels = [max(v / shares[n] for k, v in drops[n].items() if k >= rank) for n, rank in path]
    assert levels == sorted(levels)
    for step in range(1, len(path) + 1):
        name, rank = path[step - 1]
        earlier = assignment(path, step - 1).get(name)
        assert earlier is None or rank < earlier  # a module only moves down
        if step == len(path) or levels[step] > levels[step - 1]:  # (moves at one level happen together)
            assert _select(drops, shares, 1.0, levels[step - 1]) == assignment(path, step)  # the rule at that scale
    assert _select(drops, shares, 1.0, 0.0) == {}


def test_the_reported_path_follows_the_predicted_drops_and_cost_shares(case):
    model, batches, stats, metric, _ = case
    report = {}
    allocate_ranks(
        model, stats, eval_dataloader=batches, max_accuracy_drop=0.01, metric_fn=metric, search="fast", report=report
    )
    curves = {n: {int(k): d for k, d in c.items()} for n, c in report["predicted_curves"].items()}
    assert [tuple(move) for move in report["path"]] == share_path(curves, report["shares"])
    assert sum(report["shares"].values()) == pytest.approx(1.0)


def test_predicted_drops_scale_the_probe_by_the_residual_energy():
    tails = {"a": lambda k: {4: 0.64, 8: 0.16, 12: 0.04}[k], "b": lambda k: {4: 0.5, 8: 0.0}[k]}
    grids = {"a": [4, 8, 12], "b": [4, 8]}
    assert probe_rank([12, 4, 8]) == 8 and probe_rank([4, 8]) == 8
    drops = predicted_drops(tails, grids, {"a": (8, 2.0), "b": (8, 1.0)}, exponent=0.5)
    assert drops["a"] == pytest.approx({4: 4.0, 8: 2.0, 12: 1.0})  # sqrt of 4x / 1/4x the energy
    # `b`'s probe discards no energy: it borrows the largest coefficient (a's 2 / sqrt(0.16) = 5).
    assert drops["b"] == pytest.approx({4: 5.0 * 0.5**0.5, 8: 0.0})


@pytest.mark.parametrize("budget", [0.005, 0.01, 0.02])
def test_fast_search_keeps_the_budget_on_the_held_out_rows(case, budget):
    model, batches, stats, metric, base = case
    report = {}
    ranks = allocate_ranks(
        model, stats, eval_dataloader=batches, max_accuracy_drop=budget, metric_fn=metric, search="fast", report=report
    )
    assert report["search"] == "fast" and ranks
    drop, error = measured_drop(model, stats, batches, ranks, metric, base)
    assert drop == pytest.approx(report["heldout_drop"], abs=1e-5)
    assert drop + error <= budget + 1e-9  # the final joint check with its one-standard-error margin holds
    # Bounded cost: one probe per module, the bisection of the path (each step at most one screening and one joint
    # evaluation), the joint check of the step found and the refinement; the dense reference rows cost no run.
    modules, bisection = report["candidates"], math.ceil(math.log2(report["path_moves"] + 1))
    assert report["joint_check_count"] <= bisection + 1 + REFINE_STEPS["fast"] and REFINE_STEPS["fast"] == 6
    assert report["evaluations"] <= modules + 2 * bisection + 1 + REFINE_STEPS["fast"]


def _metric_on_any_rows(case, screening_samples=16):
    """The case's metric, on all rows or on the screening rows (whole batches: the first and the last of four)."""
    _, batches, _, full_metric, base = case
    screening = spread_subset(batches, screening_samples)
    rows = np.concatenate(
        [np.arange(8 * i, 8 * i + 8) for i, b in enumerate(batches) if any(b is s for s in screening)]
    )

    def metric(logits, labels):
        if len(logits) == len(base):
            return full_metric(logits, labels)
        return -100.0 * float(abs(logits - base[rows]).mean())

    return metric


def test_bisection_steps_clearly_past_the_budget_exit_on_the_screening_rows(case):
    model, batches, stats, _, base = case
    metric = _metric_on_any_rows(case)
    report = {}
    ranks = allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=0.005,
        metric_fn=metric,
        screening_samples=16,
        search="fast",
        report=report,
    )
    screened = report["screened_rejections"]
    assert screened and all(entry["drop"] - 2 * entry["standard_error"] > 0.005 for entry in screened)
    assert all(entry["step"] > report["path_step"] for entry in screened)  # only steps past the one returned
    checked = {entry["step"] for entry in report["joint_checks"] if entry.get("step") is not None}
    assert not checked & {entry["step"] for entry in screened}  # a screened step costs no joint check
    drop, error = measured_drop(model, stats, batches, ranks, metric, base)
    assert drop + error <= 0.005 + 1e-9


def test_bisection_starts_from_a_known_fitting_step():
    calls = []
    assert bisect_path(lambda step: calls.append(step) or step <= 40, 100, low=32) == 40
    assert min(calls) > 32 and len(calls) <= math.ceil(math.log2(100 - 32 + 1))


def test_steps_clearly_within_the_budget_on_the_screening_rows_cost_no_joint_check(case):
    model, batches, stats, _, base = case
    metric = _metric_on_any_rows(case)
    report = {}
    kwargs = {"eval_dataloader": batches, "max_accuracy_drop": 0.02, "metric_fn": metric, "search": "fast"}
    ranks = allocate_ranks(model, stats, screening_samples=16, report=report, **kwargs)
    accepted = report["screened_acceptances"]
    margin = math.sqrt(16 / 32)  # the joint check's one-standard-error margin, scaled to the screening rows
    assert accepted and all(e["drop"] + (2 + margin) * e["standard_error"] <= 0.02 for e in accepted)
    checked = {entry["step"] for entry in report["joint_checks"] if entry.get("step") is not None}
    assert report["path_step"] in checked  # the step returned is always joint-checked...
    screened_only = {entry["step"] for entry in accepted} - {report["path_step"]}
    assert screened_only and not checked & screened_only  # ...the other screened acceptances never are
    assert len(checked) < math.ceil(math.log2(report["path_moves"] + 1))  # fewer than one per bisection step
    drop, error = measured_drop(model, stats, batches, ranks, metric, base)
    assert drop + error <= 0.02 + 1e-9


def test_a_screened_acceptance_that_the_joint_check_refuses_is_bisected_again(case, monkeypatch):
    """A screen that accepts every step sends the bisection to the end of the path; the joint check of that step
    refuses it, and a bisection on joint checks alone finds the same step as a search without the screen."""
    model, batches, stats, _, base = case
    metric = _metric_on_any_rows(case)
    kwargs = {"eval_dataloader": batches, "max_accuracy_drop": 0.01, "metric_fn": metric, "search": "fast"}
    monkeypatch.setattr(_Screen, "verdict", lambda self, ranks, step: None)
    honest = {}
    expected = allocate_ranks(model, stats, screening_samples=16, refine_steps=0, report=honest, **kwargs)
    monkeypatch.setattr(_Screen, "verdict", lambda self, ranks, step: True)
    report = {}
    ranks = allocate_ranks(model, stats, screening_samples=16, refine_steps=0, report=report, **kwargs)
    assert report["path_step"] == honest["path_step"] < report["path_moves"] and ranks == expected
    assert any(
        e.get("step") == report["path_moves"] and e["drop"] + e["standard_error"] > 0.01
        for e in report["joint_checks"]
    )  # the end of the path was joint-checked and refused
    drop, error = measured_drop(model, stats, batches, ranks, metric, base)
    assert drop + error <= 0.01 + 1e-9


class _CountingJoint:
    """A stand-in for the joint check: an assignment fits unless it moves a module of `bad`, or takes a rank below
    `floor` (module -> rank)."""

    def __init__(self, bad=(), floor=None):
        self.bad, self.floor, self.entries = set(bad), floor or {}, {}

    def score(self, ranks, **extra):
        key = tuple(sorted(ranks.items()))
        refused = self.bad & set(ranks) or any(rank < self.floor.get(name, 0) for name, rank in ranks.items())
        self.entries.setdefault(key, {"drop": float(bool(refused)), "standard_error": 0.0, "ranks": ranks, **extra})
        return self.entries[key]

    def fits(self, ranks, **extra):
        return self.accepts(self.score(ranks, **extra))

    def accepts(self, entry):
        return entry["drop"] == 0.0


class _FixedScreen:
    """A stand-in for `_Screen`: the verdict of each step from a table (`None` where the joint check decides)."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def verdict(self, ranks, step):
        return self.verdicts.get(step)


def test_a_refused_screened_step_is_bisected_again_from_the_last_joint_accepted_step():
    """Steps 1..40 fit the joint check. The screen leaves step 32 to a joint check (accepted there) and wrongly
    accepts every other step; the joint check of the step found (64) refuses it, and the second bisection spends
    joint checks only above 32."""
    path = [(f"m{i}", 8) for i in range(64)]
    joint = _CountingJoint(bad={f"m{i}" for i in range(40, 64)})
    screen = _FixedScreen({step: True for step in range(1, 65) if step != 32})
    assert _bisect(joint, path, screen) == 40
    checked = sorted(len(e["ranks"]) for e in joint.entries.values())
    assert 32 in checked and 64 in checked  # the screen's undecided step, then the refused end of the path
    second = [step for step in checked if step not in (32, 64)]
    assert second and all(32 < step < 64 for step in second) and len(second) <= math.ceil(math.log2(64 - 32))


class _HalvingCosts:
    """A stand-in for `Candidates.cost`: 100 dense, then the rank itself (16 or 8)."""

    def cost(self, name, rank):
        return 100.0 if rank is None else float(rank)


# Predicted drops: the moves to 16 are cheap (a cheapest per cost saved), the moves to 8 costly and last.
_DROPS = {
    "a": {16: 0.1, 8: 5.0},
    "b": {16: 0.2, 8: 4.9},
    "c": {16: 0.3, 8: 4.8},
    "d": {16: 0.4, 8: 4.7},
}


def test_refinement_orders_moves_by_predicted_drop_per_cost_saved_in_growing_groups():
    """`c` never fits. a16 (1 move), b16 c16 (2: refused), b16 (1), c16 d16 (2: refused), c16 (1: the assignment of
    the first refused group, cached: no new check; c blocked), d16 (1), then the moves to 8 in the order of their
    predicted extra drop per cost saved: d8 b8 (2), a8 (1)."""
    joint = _CountingJoint(bad={"c"})
    ranks, entry, tried = _refine(joint, _HalvingCosts(), _DROPS, {}, {"drop": 0.0}, refine_steps=8)
    assert ranks == {"a": 8, "b": 8, "d": 8} and entry["ranks"] == ranks
    assert tried == 7 == len(joint.entries)
    assert [e["moves"] for e in joint.entries.values()] == [1, 2, 1, 2, 1, 2, 1]
    assert list(joint.entries)[-2] == (("a", 16), ("b", 8), ("d", 8))  # d8 and b8 before a8: 4.3/8 < 4.7/8 < 4.9/8
    # The order is the predictions': with `d` the cheapest module it moves first.
    cheap_d = {**_DROPS, "d": {16: 0.01, 8: 4.7}}
    joint = _CountingJoint()
    _refine(joint, _HalvingCosts(), cheap_d, {}, {"drop": 0.0}, refine_steps=1)
    assert list(joint.entries) == [(("d", 16),)]


class _RowsJoint(_CountingJoint):
    """`_CountingJoint` on `rows` held-out rows (the confirmation reports them)."""

    def __init__(self, rows=128, **kwargs):
        super().__init__(**kwargs)
        self.labels = np.zeros(rows)


def test_refinement_moves_chosen_on_one_half_are_kept_only_when_the_other_half_and_all_rows_confirm_them():
    """The moves of the refinement test above, chosen on the selection half; the assignment they reach is kept only
    if the confirmation half (rows that chose nothing) and all rows accept it, else the bisection's ranks return."""
    start = {"a": 32}
    start_entry = {"drop": 0.25, "standard_error": 0.0, "ranks": start}
    drops = {**_DROPS, "a": {32: 0.0, **_DROPS["a"]}}

    def run(confirmation, full):
        selection = _RowsJoint(rows=100, bad={"c"})
        result = _confirmed_refine(full, (selection, confirmation), _HalvingCosts(), drops, start, start_entry, 8)
        return result, selection

    confirmation, full = _RowsJoint(rows=90), _RowsJoint()
    (ranks, entry, tried, report), selection = run(confirmation, full)
    alone, _, alone_tried = _refine(_CountingJoint(bad={"c"}), _HalvingCosts(), drops, start, start_entry, 8)
    assert ranks == alone == {"a": 8, "b": 8, "d": 8} and tried == alone_tried == len(selection.entries)
    assert entry is full.entries[tuple(sorted(ranks.items()))] and entry["stage"] == "refine"  # all rows' entry
    assert list(confirmation.entries) == list(full.entries) == [tuple(sorted(ranks.items()))]  # one check each
    assert report == {
        "selection_rows": 100,
        "confirmation_rows": 90,
        "selection_checks": tried,
        "moves": 3,
        "drop": 0.0,
        "standard_error": 0.0,
        "kept": True,
    }
    # The confirmation half refuses b at 8 (the selection half's noise favoured it): nothing of the refinement is
    # kept, and all rows are not scored (their check could not overturn the refusal).
    full = _RowsJoint()
    (ranks, entry, _, report), _ = run(_RowsJoint(floor={"b": 16}), full)
    assert ranks == start and entry is start_entry and report["kept"] is False and report["drop"] == 1.0
    assert not full.entries
    # The confirmation half accepts but all rows do not: the same.
    (ranks, entry, _, report), _ = run(_RowsJoint(), _RowsJoint(floor={"d": 16}))
    assert ranks == start and entry is start_entry and report["kept"] is False
    # No move fits on the selection half: no confirmation check at all.
    confirmation, full = _RowsJoint(), _RowsJoint()
    selection = _RowsJoint(bad=set("abcd"))
    ranks, entry, tried, report = _confirmed_refine(
        full, (selection, confirmation), _HalvingCosts(), _DROPS, {}, {"drop": 0.0}, 3
    )
    assert ranks == {} and tried == 3 and not confirmation.entries and not full.entries and report["drop"] is None


def _label_probability(logits, labels):
    """Mean probability of the label, in points: a per-row metric that sees small changes of a tiny model."""
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return 100.0 * float((z / z.sum(-1, keepdims=True))[np.arange(len(labels)), labels].mean())


def _self_labelled(rows):
    """A tiny teacher labelled with its own predictions on `rows` rows (batches of 16)."""
    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=rows, seq_len=10, batch_size=16)
    with torch.no_grad():
        for batch in batches:
            batch["labels"] = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.argmax(-1)
    return model, batches, collect_activation_stats(model, batches)


def _allocate_fast(model, batches, stats, budget):
    report = {}
    ranks = allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=budget,
        metric_fn=_label_probability,
        search="fast",
        report=report,
    )
    return ranks, report


@pytest.mark.parametrize("budget, kept", [(0.001, True), (0.0005, False)])
def test_fast_search_confirms_its_refinement_on_the_held_out_half_that_did_not_choose_it(budget, kept):
    """With enough held-out rows the refinement's checks score one half (alternate batches) and what they reach is
    confirmed on the other half and on all rows: kept at one budget; at the other the confirmation half refuses it
    and the bisection's ranks return. Either way the ranks keep the budget on all rows."""
    model, batches, stats = _self_labelled(2 * CONFIRMATION_MIN_ROWS)
    ranks, report = _allocate_fast(model, batches, stats, budget)
    confirmation = report["refinement_confirmation"]
    assert confirmation["selection_rows"] == confirmation["confirmation_rows"] == CONFIRMATION_MIN_ROWS
    assert confirmation["selection_checks"] == report["refined_steps"] == REFINE_STEPS["fast"]
    assert confirmation["moves"] > 0 and confirmation["kept"] is kept
    assert confirmation["drop"] + confirmation["standard_error"] > budget or kept  # refused by the other half
    bisected = assignment([tuple(move) for move in report["path"]], report["path_step"])
    assert (ranks != bisected) is kept
    refine_checks = [entry for entry in report["joint_checks"] if entry["stage"] == "refine"]
    # on all rows: only the confirmation of what the selection half chose, once the confirmation half accepted it
    assert len(refine_checks) == int(kept)
    # the count of joint checks takes in the selection half's and the confirmation half's
    assert report["joint_check_count"] == len(report["joint_checks"]) + REFINE_STEPS["fast"] + 1
    with torch.no_grad():
        base = torch.cat([model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits for b in batches]).numpy()
    drop, error = measured_drop(model, stats, batches, ranks, _label_probability, base)
    assert drop == pytest.approx(report["heldout_drop"], abs=1e-6) and drop + error <= budget + 1e-9
    # The CLI's summary says what became of the refinement.
    phrase = refinement_phrase(report, "accuracy")
    rows = CONFIRMATION_MIN_ROWS
    assert f"on {rows} held-out rows; on the other {rows} the accuracy drop" in phrase
    assert phrase.endswith(": kept.") if kept else phrase.endswith("not kept: the bisection's ranks stand.")
    # Fewer rows than two halves of CONFIRMATION_MIN_ROWS: the refinement runs on all rows, as before.
    model, batches, stats = _self_labelled(2 * CONFIRMATION_MIN_ROWS - 32)
    _, report = _allocate_fast(model, batches, stats, budget)
    assert report["refinement_confirmation"] is None and report["refined_steps"] == REFINE_STEPS["fast"]
    assert refinement_phrase(report, "accuracy") is None


def test_refinement_starts_from_the_bisected_ranks_reuses_cached_checks_and_keeps_its_limit():
    joint = _CountingJoint(bad={"c"})
    start = {"a": 16}
    joint.score({"a": 16, "b": 16})  # already checked (by the bisection, say): trying it again is not a new check
    ranks, _, tried = _refine(joint, _HalvingCosts(), _DROPS, start, joint.score(start), refine_steps=2)
    # b16 (cached), c16 d16 (refused), c16 (refused, c blocked): two new checks, the limit
    assert ranks == {"a": 16, "b": 16} and tried == 2 and len(joint.entries) == 4
    ranks, _, tried = _refine(_CountingJoint(bad={"c"}), _HalvingCosts(), _DROPS, {}, {"drop": 0.0}, refine_steps=3)
    assert ranks == {"a": 16, "b": 16} and tried == 3  # the limit on joint checks holds


def test_a_wrong_predictor_costs_speed_never_the_budget(case, monkeypatch):
    """Predictions inverted (the most sensitive module looks free): the joint checks still decide, and the ranks
    returned still fit; with a budget nothing fits, the dense model comes back."""
    model, batches, stats, metric, base = case

    def inverted(tails, grids, probes, exponent=0.5):
        honest = predicted_drops(tails, grids, probes, exponent)
        top = max(v for curve in honest.values() for v in curve.values())
        return {name: {rank: top - value for rank, value in curve.items()} for name, curve in honest.items()}

    monkeypatch.setattr(budget_path, "predicted_drops", inverted)
    report = {}
    ranks = allocate_ranks(
        model, stats, eval_dataloader=batches, max_accuracy_drop=0.01, metric_fn=metric, search="fast", report=report
    )
    drop, error = measured_drop(model, stats, batches, ranks, metric, base)
    assert drop + error <= 0.01 + 1e-9 and drop == pytest.approx(report["heldout_drop"], abs=1e-5)
    assert any(not entry["drop"] + entry["standard_error"] <= 0.01 for entry in report["joint_checks"])
    tiny = allocate_ranks(
        model, stats, eval_dataloader=batches, max_accuracy_drop=1e-7, metric_fn=metric, search="fast"
    )
    assert tiny == {}  # even the first move breaks the budget: nothing is compressed


def test_fast_search_is_cheaper_than_the_exhaustive_one(case):
    model, batches, stats, metric, base = case
    fast, exhaustive = {}, {}
    kwargs = {"eval_dataloader": batches, "max_accuracy_drop": 0.01, "metric_fn": metric, "safety_margin": 0.0}
    allocate_ranks(model, stats, search="fast", report=fast, **kwargs)
    allocate_ranks(model, stats, search="exhaustive", report=exhaustive, **kwargs)
    assert fast["evaluations"] < exhaustive["evaluations"] / 2
    assert fast["probes"] and "curves" not in fast and "curves" in exhaustive and "probes" not in exhaustive


def test_exhaustive_search_is_unchanged(case):
    """The same ranks, evaluations and drop as drone_hf before the fast search existed (computed with that code)."""
    model, batches, stats, metric, base = case
    report = {}
    ranks = allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=0.01,
        safety_margin=0.0,
        metric_fn=metric,
        refine_steps=6,
        search="exhaustive",
        report=report,
    )
    layer = "bert.encoder.layer."
    assert ranks == {
        f"{layer}0.attention.output.dense": 24,
        f"{layer}0.attention.self": 2,
        f"{layer}0.output.dense": 32,
        f"{layer}1.attention.output.dense": 24,
        f"{layer}1.attention.self": 2,
        f"{layer}1.intermediate.dense": 40,
        f"{layer}1.output.dense": 24,
    }
    # 58 evaluations before the dense reference rows were taken from the evaluators' first pass (two runs fewer).
    assert report["evaluations"] == 56 and report["heldout_drop"] == pytest.approx(0.009902, abs=1e-6)


def test_bad_search_options_are_refused(case):
    model, batches, stats, _, _ = case
    with pytest.raises(ValueError, match=r"`search` must be one of \['fast', 'exhaustive'\], got 'quick'"):
        allocate_ranks(model, stats, eval_dataloader=batches, max_accuracy_drop=1.0, search="quick")
    with pytest.raises(ValueError, match=r"`search` must be one of .*got None"):
        allocate_ranks(model, stats, target_speedup=1.5, search=None)
    with pytest.raises(ValueError, match=r"`refine_steps` must be an int >= 0 or None .*got -1"):
        allocate_ranks(model, stats, eval_dataloader=batches, max_accuracy_drop=1.0, refine_steps=-1)
    with pytest.raises(ValueError, match=r"`search` must be one of .*got 'Fast'"):
        compress_model(
            model, stats, eval_dataloader=batches, max_accuracy_drop=1.0, allocation_options={"search": "Fast"}
        )
    with pytest.raises(ValueError, match=r"`allocation_search` must be one of \['fast', 'exhaustive'\], got 'x'"):
        DroneCompressionArguments(max_accuracy_drop=1.0, allocation_search="x")
    kwargs = DroneCompressionArguments(max_accuracy_drop=1.0, allocation_search="exhaustive").compress_kwargs()
    assert kwargs["allocation_options"]["search"] == "exhaustive"


def test_a_screen_that_changes_no_row_is_not_taken_as_within_the_budget(monkeypatch):
    """A step whose screening rows are all unchanged has a zero bootstrap error: it is accepted on the screen only
    while the least error a per-row metric assumes (one row's worth) still leaves it within the budget."""
    monkeypatch.setattr(budget_path, "apply_ranks", lambda *args: {})
    monkeypatch.setattr(budget_path, "restore_modules", lambda *args: None)
    reference = np.eye(2)[np.arange(100) % 2]
    evaluator = type("Evaluator", (), {"labels": np.arange(100) % 2, "logits": lambda self, start: reference})()
    accuracy = lambda logits, labels: 100.0 * float((logits.argmax(-1) == labels).mean())  # noqa: E731
    joint = type("Joint", (), {})()
    joint.working = joint.candidates = None
    joint.entries, joint.labels, joint.raw_metric, joint.margin = {}, np.zeros(400), accuracy, 1.0
    joint.budget = 1.0
    assert _Screen(joint, evaluator, reference).verdict({"m": 8}, 3) is True  # drop 0, error 0
    # one row's worth (1 point on 100 rows): 0 + (2 + 1 * sqrt(100 / 400)) * 1 > 1 -> undecided, joint check
    assert _Screen(joint, evaluator, reference, min_error=1.0).verdict({"m": 8}, 3) is None
    joint.budget = 3.0
    assert _Screen(joint, evaluator, reference, min_error=1.0).verdict({"m": 8}, 3) is True


def test_the_screen_stops_after_undecided_verdicts_in_a_row(monkeypatch):
    """The bisection's steps close in on the budget's edge, where the screening rows settle nothing: after
    `SCREEN_PATIENCE` undecided verdicts in a row the screen answers `None` without scoring its rows; a decided
    verdict in between starts the count again."""
    monkeypatch.setattr(budget_path, "apply_ranks", lambda *args: {})
    monkeypatch.setattr(budget_path, "restore_modules", lambda *args: None)
    labels = np.arange(100) % 2
    reference = np.eye(2)[labels]

    def wrong(rows):  # the reference with `rows` rows predicted wrongly
        logits = reference.copy()
        logits[:rows] = logits[:rows, ::-1]
        return logits

    queue = []
    evaluator = type("Evaluator", (), {"labels": labels, "logits": lambda self, start: queue.pop(0)})()
    accuracy = lambda logits, labels: 100.0 * float((logits.argmax(-1) == labels).mean())  # noqa: E731
    joint = type("Joint", (), {})()
    joint.working = joint.candidates = None
    joint.entries, joint.labels, joint.raw_metric, joint.margin, joint.budget = {}, np.zeros(400), accuracy, 1.0, 1.0
    screen = _Screen(joint, evaluator, reference)
    queue.extend([wrong(1), wrong(30), wrong(1), wrong(2), wrong(30)])
    verdicts = [screen.verdict({"m": 8}, step) for step in (10, 20, 15, 12, 11)]
    assert verdicts == [None, False, None, None, None] and SCREEN_PATIENCE == 2
    assert len(queue) == 1  # the fifth step was not scored: two undecided verdicts in a row came before it
    assert [e["step"] for e in screen.undecided] == [10, 15, 12] and [e["step"] for e in screen.rejected] == [20]


def test_fast_search_with_a_metric_of_the_whole_held_out_set_takes_no_screen_shortcut():
    """Entity F1 scores the held-out sentences it was built from, and only them: the bisection then settles every
    step by a joint check instead of scoring the screening rows with it (which raised before)."""
    import transformers

    from drone_hf.token_metrics import EntityF1Points

    from .testing_utils import tiny_config, tiny_family_batches

    torch.manual_seed(0)
    model = transformers.AutoModelForTokenClassification.from_config(tiny_config("bert", num_labels=2)).eval()
    batches = [{**b, "labels": b["token_labels"]} for b in tiny_family_batches("bert")]
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    stats = collect_activation_stats(model, inputs)
    metric = EntityF1Points.from_batches(batches, ["O", "B-PER"])
    report = {}
    allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=60.0,
        metric_fn=metric,
        screening_samples=4,
        search="fast",
        report=report,
    )
    assert report["screening_examples"] < report["heldout_examples"]  # a real screening subset...
    assert report["screened_rejections"] == [] and report["screened_acceptances"] == []  # ...never used to settle
    assert report["heldout_drop"] + report["heldout_standard_error"] <= 60.0
