import itertools

import numpy as np
import pytest
import torch

from drone_hf import DroneLinear, allocate_ranks, budget_search, collect_activation_stats, compress_model
from drone_hf.allocation import _greedy, breakeven_rank
from drone_hf.heldout import (
    LayerwiseEvaluator,
    module_time_shares,
    paired_standard_error,
    soft_change,
    spread_subset,
)
from drone_hf.profiling import encoder_macs, flop_speedup_bound

from .testing_utils import self_labelled_case, tiny_batches, tiny_teacher


@pytest.fixture(scope="module")
def setup():
    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    with torch.no_grad():  # labels = the teacher's own predictions: base accuracy is 100%
        for batch in batches:
            batch["labels"] = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.argmax(-1)
    return model, batches, collect_activation_stats(model, batches)


def test_breakeven():
    assert breakeven_rank(384, 384) == 191 and breakeven_rank(768, 3072) == 614
    assert 191 * (384 + 384) < 384 * 384 <= 192 * (384 + 384)


def test_greedy_matches_brute_force_on_concave_curves():
    # Unit cost per step and non-increasing gains (sorted sigma^2, dense = full rank 5): the regime in which the
    # greedy exchange argument makes it exactly optimal.
    torch.manual_seed(0)
    grids = {name: [1, 2, 3, 4] for name in "abc"}
    tails = {}
    for name in grids:
        energy = torch.sort(torch.rand(5), descending=True).values ** 2
        tails[name] = [float(energy[k:].sum()) for k in range(6)]
    losses = {n: (lambda k, t=tails[n]: t[5 if k is None else k]) for n in grids}
    costs = {n: (lambda k: 5 if k is None else k) for n in grids}
    for budget in range(3, 16):
        greedy = _greedy(losses, costs, grids, budget)
        best = min(
            sum(losses[n](k) for n, k in zip(grids, combo))
            for combo in itertools.product(*[grids[n] + [None] for n in grids])
            if sum(costs[n](k) for n, k in zip(grids, combo)) <= budget
        )
        assert sum(costs[n](k) for n, k in greedy.items()) <= budget
        assert sum(losses[n](k) for n, k in greedy.items()) == pytest.approx(best)
    with pytest.raises(ValueError, match="cannot be met"):
        _greedy(losses, costs, grids, 2)


def test_param_ratio_budget_is_met_with_attention_candidates(setup):
    model, _, stats = setup
    ranks = allocate_ranks(model, stats, param_ratio=0.5)
    compressed = compress_model(model, stats, ranks=ranks)
    assert compressed.config.drone_attention_ranks  # the attention blocks are candidates

    def enc(m):
        return sum(
            p.numel()
            for n, p in m.named_parameters()
            if ".encoder." in n and n.endswith("weight") and "LayerNorm" not in n
        )

    assert enc(compressed) <= 0.5 * enc(model)


@pytest.mark.parametrize("target", [1.3, 2.0])
def test_target_speedup_meets_the_flop_bound(setup, target):
    model, _, stats = setup
    compressed = compress_model(model, stats, target_speedup=target)
    assert flop_speedup_bound(model.config, compressed.config, 128) >= target
    # ...without throwing budget away: a much weaker target keeps more.
    weaker = compress_model(model, stats, target_speedup=1.05)
    assert encoder_macs(weaker.config, 128) > encoder_macs(compressed.config, 128)


def test_layerwise_evaluator_equals_full_forward_after_a_swap(setup):
    model, batches, _ = setup
    model = compress_model(model, None, method="svd", ranks={"bert.encoder.layer.1.output.dense": 8})  # a copy
    evaluator = LayerwiseEvaluator(model, batches)
    with torch.no_grad():
        before = torch.cat(
            [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        )
    torch.testing.assert_close(torch.from_numpy(evaluator.initial_rows), before, rtol=1e-5, atol=1e-5)  # no swap yet
    evaluator.advance_to(1)
    name = "bert.encoder.layer.1.intermediate.dense"
    model.set_submodule(name, DroneLinear.from_linear(model.get_submodule(name), 4))
    fast = evaluator.logits()
    with torch.no_grad():
        full = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])
    torch.testing.assert_close(torch.from_numpy(fast), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(evaluator.logits(0)), full, rtol=1e-5, atol=1e-5)


def test_layerwise_evaluator_subset_takes_its_first_rows_without_a_pass(setup):
    """`subset` (the fast search's confirmation halves) reuses the first rows of the evaluator over all batches:
    the same rows and labels as an evaluator built on those batches, without running the model."""
    model, batches, _ = setup
    evaluator = LayerwiseEvaluator(model, batches)
    built = LayerwiseEvaluator(model, batches[1::2])
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        half = evaluator.subset(range(1, len(batches), 2))
    finally:
        handle.remove()
    assert not calls and half.kind == built.kind and half.num_outputs == built.num_outputs
    np.testing.assert_array_equal(half.initial_rows, built.initial_rows)
    np.testing.assert_array_equal(half.labels, built.labels)
    assert len(half.labels) < len(evaluator.labels) and half.rows == built.rows and half.row_passes == 0.0
    # It scores its own batches: after a swap, the same rows as the evaluator built on them.
    name = "bert.encoder.layer.1.output.dense"
    original = model.get_submodule(name)
    model.set_submodule(name, DroneLinear.from_linear(original, 4))
    try:
        np.testing.assert_allclose(half.logits(0), built.logits(0), rtol=1e-6, atol=1e-6)
        assert not np.allclose(half.logits(0), half.initial_rows, atol=1e-4)
    finally:
        model.set_submodule(name, original)


def test_time_shares_sum_to_one(setup):
    model, batches, _ = setup
    shares = module_time_shares(
        model,
        {
            "ffn": ["+bert.encoder.layer.0.intermediate.dense"],
            "att": ["+bert.encoder.layer.0.attention.self", "-bert.encoder.layer.0.attention.self.value"],
        },
        batches[0],
    )
    assert sum(shares.values()) == pytest.approx(1.0) and all(v > 0 for v in shares.values())


def test_accuracy_budget_is_respected_on_held_out_data(setup):
    model, batches, stats = setup
    report = {}
    ranks = allocate_ranks(
        model, stats, eval_dataloader=batches, max_accuracy_drop=10.0, report=report, search="exhaustive"
    )
    assert ranks
    assert report["heldout_drop"] <= 10.0 and report["evaluations"] > 0 and report["seconds"] > 0
    compressed = compress_model(model, stats, ranks=ranks)
    with torch.no_grad():
        acc = (
            torch.cat(
                [
                    compressed(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                    == b["labels"]
                    for b in batches
                ]
            )
            .float()
            .mean()
        )
    assert 100 * (1 - acc) == pytest.approx(report["heldout_drop"], abs=1e-6)
    # Early exit: once a module's drop exceeds the whole budget, smaller ranks are not evaluated.
    for curve in report["curves"].values():
        drops = [curve[r] for r in sorted(curve, reverse=True)]
        assert all(d <= 10.0 for d in drops[:-1])


def test_impossible_accuracy_budget_raises(setup):
    model, batches, stats = setup
    with torch.no_grad():
        reference = torch.cat(
            [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        )
    reference = reference.numpy()

    def strict_metric(logits, labels):  # any change of any logit costs points: no compression can fit 0.01
        return -100.0 * float(abs(logits - reference[: len(logits)]).mean()) if len(logits) == len(reference) else 0.0

    report = {}
    with pytest.raises(ValueError, match="budget cannot be met"):
        compress_model(
            model,
            stats,
            eval_dataloader=batches,
            max_accuracy_drop=0.01,
            rank_grid=[1],
            attention=False,
            target_modules=["bert.encoder.layer.1.output.dense"],
            allocation_report=report,
            allocation_options={"metric_fn": strict_metric, "safety_margin": 0.0, "search": "exhaustive"},
        )
    assert report["curves"]["bert.encoder.layer.1.output.dense"][1] > 0.0
    assert all(check["drop"] > 0.01 for check in report["joint_checks"] if check["modules"])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "Pass exactly one of"),
        ({"param_ratio": 0.5, "target_speedup": 2.0}, ValueError, "Pass exactly one of"),
        ({"target_speedup": 1.0}, ValueError, r"`target_speedup` must be a number > 1, got 1.0"),
        ({"target_speedup": 1000.0}, ValueError, "cannot be met"),
        ({"max_accuracy_drop": 1.0}, ValueError, "needs `eval_dataloader`"),
        ({"max_accuracy_drop": -1.0, "eval_dataloader": []}, ValueError, "must be a positive number"),
        ({"param_ratio": 2}, ValueError, r"`param_ratio` must be a float in \(0, 1\)"),
        ({"param_ratio": 0.5, "method": "pca"}, ValueError, "Unknown `method`"),
    ],
)
def test_bad_budgets(setup, kwargs, error, match):
    model, _, stats = setup
    with pytest.raises(error, match=match):
        allocate_ranks(model, stats, **kwargs)


def test_eval_set_without_labels(setup):
    model, batches, stats = setup
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="without labels"):
        allocate_ranks(model, stats, eval_dataloader=unlabeled, max_accuracy_drop=1.0)


def test_budget_cannot_combine_with_explicit_ranks(setup):
    model, batches, stats = setup
    with pytest.raises(ValueError, match=r"cannot be combined with \['rank'\]"):
        compress_model(model, stats, rank=8, target_speedup=1.5)


def test_paired_standard_error_matches_the_analytic_formula_for_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    base = np.eye(2)[labels] + 0.1 * rng.standard_normal((2000, 2))  # always right
    flipped = rng.random(2000) < 0.05
    other = np.where(flipped[:, None], base[:, ::-1], base)  # 5% wrong

    def accuracy(logits, y):
        return 100.0 * float((logits.argmax(-1) == y).mean())

    differences = 100.0 * ((base.argmax(-1) == labels).astype(float) - (other.argmax(-1) == labels))
    analytic = differences.std() / np.sqrt(len(labels))
    estimate = paired_standard_error(accuracy, base, other, labels, samples=2000)
    assert estimate == pytest.approx(analytic, rel=0.08)
    assert paired_standard_error(accuracy, base, base, labels) == 0.0  # identical models: no uncertainty


def test_spread_subset_covers_the_whole_length_range():
    batches = [{"input_ids": torch.zeros(8, 3, dtype=torch.long), "id": i} for i in range(20)]
    subset = spread_subset(batches, 40)
    assert [b["id"] for b in subset] == [0, 5, 10, 14, 19]  # first and last (shortest and longest) included
    assert spread_subset(batches, None) is batches and spread_subset(batches, 1000) is batches


def test_safety_margin_makes_the_joint_check_stricter(setup):
    model, batches, stats = setup
    strict, loose = {}, {}
    allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=10.0,
        safety_margin=0.0,
        report=loose,
        screening_samples=16,
    )
    allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=10.0,
        safety_margin=2.0,
        report=strict,
        screening_samples=16,
    )
    assert loose["screening_examples"] == 16 and loose["heldout_examples"] == 32
    assert strict["heldout_drop"] + 2.0 * strict["heldout_standard_error"] <= 10.0
    assert loose["heldout_drop"] <= 10.0
    assert all(entry["standard_error"] >= 0.0 for entry in strict["joint_checks"])
    with pytest.raises(ValueError, match=r"`safety_margin` must be a number >= 0 \(standard errors\), got -1"):
        allocate_ranks(model, stats, eval_dataloader=batches, max_accuracy_drop=1.0, safety_margin=-1)
    for bad in (0, "all", True):
        with pytest.raises(
            ValueError, match=rf"`screening_samples` must be a positive int, None \(all rows\) or 'auto' .*got {bad!r}"
        ):
            allocate_ranks(model, stats, eval_dataloader=batches, max_accuracy_drop=1.0, screening_samples=bad)


@pytest.mark.parametrize("search", ["fast", "exhaustive"])
def test_auto_screening_samples_take_the_search_default(setup, monkeypatch, search):
    # The default ("auto") reads budget_search.SCREENING_SAMPLES for the search in use: patched to whole-batch sizes
    # (8 rows a batch) that differ per search and from every row (32), so reading the wrong entry, or none, shows.
    model, batches, stats = setup
    assert budget_search.SCREENING_SAMPLES == {"fast": 256, "exhaustive": 512}  # what the README's timings used
    monkeypatch.setattr(budget_search, "SCREENING_SAMPLES", {"fast": 16, "exhaustive": 24})
    report = {}
    allocate_ranks(
        model, stats, eval_dataloader=batches, max_accuracy_drop=10.0, search=search, refine_steps=0, report=report
    )
    assert report["screening_examples"] == {"fast": 16, "exhaustive": 24}[search]
    assert report["heldout_examples"] == 32


def test_unknown_allocation_option_is_rejected(setup):
    model, batches, stats = setup
    with pytest.raises(ValueError, match=r"Unknown `allocation_options` \['margin'\]; allowed: \['metric_fn'"):
        compress_model(model, stats, eval_dataloader=batches, max_accuracy_drop=1.0, allocation_options={"margin": 1})


def test_soft_change_is_never_negative_and_zero_without_change():
    rng = np.random.default_rng(1)
    base, labels = rng.standard_normal((50, 3)), rng.integers(0, 3, 50)
    moved = base + 0.5 * rng.standard_normal((50, 3))
    assert soft_change(base, base, labels, None) == 0.0
    assert soft_change(base, moved, labels, None) > 0.0 and soft_change(moved, base, labels, None) > 0.0
    values = rng.standard_normal((50, 1))
    assert soft_change(values, values + 0.1, values[:, 0], "regression") == pytest.approx(
        10.0 / values.std(), rel=1e-6
    )


def test_refinement_only_compresses_further_and_keeps_the_budget():
    model, batches, _, logit_metric = self_labelled_case()  # the budget binds on a tiny model
    stats = collect_activation_stats(model, batches)
    report = {}
    ranks = allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=0.02,
        safety_margin=0.0,
        attention=False,
        metric_fn=logit_metric,
        refine_steps=12,
        search="exhaustive",  # the time-share allocation, then its refinement
        report=report,
    )

    def macs(chosen):
        return encoder_macs(compress_model(model, stats, ranks=chosen).config, 10)

    assert 0 < report["refined_steps"] <= 12
    assert macs(ranks) < macs(report["time_share_ranks"])  # the refinement moved ranks down...
    assert all(ranks[name] <= rank for name, rank in report["time_share_ranks"].items())
    assert report["heldout_drop"] <= 0.02  # ...within the budget, measured for real:
    compressed = compress_model(model, stats, ranks=ranks)
    with torch.no_grad():
        logits = torch.cat(
            [compressed(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        )
    assert -logit_metric(logits.numpy(), None) == pytest.approx(report["heldout_drop"], abs=1e-5)
    # with no safety margin the report still states the kept drop's paired standard error (it was printed as 0)
    assert report["safety_margin"] == 0.0 and report["heldout_drop"] > 0 and report["heldout_standard_error"] > 0


def test_candidates_build_each_rank_once_and_forget_the_least_recently_used(setup, monkeypatch):
    # A search scores the same (module, rank) again and again; Candidates keeps their factors (not the modules: every
    # call returns a new module, so a swap never shares one) for the 2 * len(names) pairs used last.
    from drone_hf.candidates import Candidates

    model, _, stats = setup
    candidates = Candidates(
        model, stats, method="drone", attention=True, target_modules=None, rank_grid=None, rank_multiple=8, seq_len=16
    )
    linear, block = candidates.linears[0], candidates.blocks[0]
    rank, head_rank = candidates.grid[linear][0], candidates.grid[block][0]
    decomposition = candidates._decomposition(linear)
    expected_linear = DroneLinear.from_factors(*decomposition.factors(rank))
    tensors, heads = candidates._qk_tensors(block)
    expected_qk = candidates.method.factor_attention(tensors, candidates.block_stats(block), heads, head_rank)
    calls = []
    factors, factor_attention = decomposition.factors, candidates.method.factor_attention
    monkeypatch.setattr(decomposition, "factors", lambda *a: calls.append("linear") or factors(*a))
    monkeypatch.setattr(
        candidates.method, "factor_attention", lambda *a: calls.append("block") or factor_attention(*a)
    )
    built = [candidates.module(linear, rank) for _ in range(3)]
    blocks = [candidates.module(block, head_rank) for _ in range(3)]
    assert calls == ["linear", "block"]  # built once each
    assert built[0] is not built[1] and blocks[0] is not blocks[1]
    for module in built:
        assert all(
            torch.equal(a, b) for a, b in zip(module.state_dict().values(), expected_linear.state_dict().values())
        )
    query_attribute = candidates.qk[block][0].rsplit(".", 1)[1]
    for module in blocks:
        assert torch.equal(getattr(module, query_attribute).weight, expected_qk[0].to(torch.float32))
    pairs = [(name, r) for name in candidates.names for r in candidates.grid[name]]
    assert len(pairs) > 2 * len(candidates.names) + 2
    for name, r in pairs:
        candidates.factors(name, r)
    assert len(candidates._factors) == 2 * len(candidates.names)
    calls.clear()
    candidates.module(linear, rank)  # long since forgotten: built again
    assert calls == ["linear"]
