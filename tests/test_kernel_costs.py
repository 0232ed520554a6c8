"""Budgets measured in the deployment form: `KernelCosts` keeps only ranks whose factored product is measured faster
than the dense one, so a budget measured in bfloat16 never picks a rank above the bfloat16 break-even."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

import drone_hf
from drone_hf.allocation import allocate_ranks
from drone_hf.candidates import breakeven_rank
from drone_hf.kernel_costs import KernelCosts

from .testing_utils import tiny_batches, tiny_bert_config


def _model():
    torch.manual_seed(0)
    config = tiny_bert_config(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_labels=2)
    return BertForSequenceClassification(config).eval()


def _stats(model):
    return drone_hf.collect_activation_stats(model, tiny_batches(num_labels=2))


def _half_speed_factored(kind, shape, rank):
    """A made-up bfloat16 machine on which skinny products run at half the throughput of square ones: a factored
    pair pays only below half the multiply-add break-even, a narrowed query/key below half the head size."""
    if kind == "linear":
        out_features, in_features = shape
        return float(out_features * in_features) if rank is None else 2.0 * rank * (out_features + in_features)
    in_features, heads, head = shape
    return float(in_features * heads * head) if rank is None else 2.0 * in_features * heads * rank


def _linear_shapes(model, ranks):
    return {name: tuple(model.get_submodule(name).weight.shape) for name in ranks}


def _shapes(ranks):
    model = _model()
    return [tuple(model.get_submodule(name).weight.shape) for name in ranks]


def test_paying_ranks_are_those_measured_faster():
    costs = KernelCosts(torch.bfloat16, seconds_fn=_half_speed_factored)
    # 256 x 64: multiply-adds pay up to rank 51; at half throughput up to 25.
    assert costs.paying_ranks(256, 64, [8, 16, 24, 32, 40, 48, 56, 64]) == [8, 16, 24]
    assert costs.breakeven_rank(256, 64, multiple=8) == 24
    assert costs.breakeven_rank(256, 64, multiple=16) == 16
    assert costs.paying_qk_ranks(64, 4, 16, [2, 4, 8, 12, 16]) == [2, 4]
    assert "bfloat16" in costs.describe() and costs.summary()["seconds"]["linear 256x64"]["dense"] == 256 * 64


def test_budget_in_bfloat16_never_picks_a_rank_above_the_bfloat16_breakeven():
    model = _model()
    stats = _stats(model)
    costs = KernelCosts(torch.bfloat16, seconds_fn=_half_speed_factored)
    report = {}
    compressed = drone_hf.compress_model(
        model,
        stats,
        target_speedup=1.3,
        dtype=torch.bfloat16,
        allocation_options={"kernel_costs": costs},
        allocation_report=report,
    )
    ranks, attention = compressed.config.drone_ranks or {}, compressed.config.drone_attention_ranks or {}
    assert ranks or attention
    for name, (out_features, in_features) in _linear_shapes(model, ranks).items():
        assert ranks[name] <= costs.breakeven_rank(out_features, in_features, multiple=8), name
        assert ranks[name] < breakeven_rank(out_features, in_features) / 2
    assert all(rank < 16 / 2 for rank in attention.values())  # head size 16
    assert report["kernel_costs"]["dtype"] == "bfloat16"
    assert {p.dtype for p in compressed.parameters()} == {torch.bfloat16}

    # Control: counting multiply-adds, the same budget spends ranks that do not pay on that machine.
    plain = allocate_ranks(model, stats, target_speedup=1.3)
    linears = {n: k for n, k in plain.items() if isinstance(model.get_submodule(n), torch.nn.Linear)}
    assert any(k > costs.breakeven_rank(*shape, multiple=8) for k, shape in zip(linears.values(), _shapes(linears)))


def test_budget_measured_in_bfloat16_on_this_machine():
    """Real timings (tiny shapes, 8 x 16 tokens): whatever this machine measures, no chosen rank is slower."""
    model = _model()
    report = {}
    try:
        ranks = allocate_ranks(
            model, _stats(model), target_speedup=1.05, attention=False, dtype=torch.bfloat16, seq_len=16, report=report
        )
    except ValueError as error:  # a machine on which no factored pair of these tiny shapes is faster: also correct
        assert "no candidate rank of any module is faster than the dense module" in str(error)
        pytest.skip(f"no rank pays at these tiny shapes on this machine: {error}")
    timings = report["kernel_costs"]["seconds"]
    assert report["kernel_costs"]["tokens"] == 128
    for name, (out_features, in_features) in _linear_shapes(model, ranks).items():
        measured = timings[f"linear {out_features}x{in_features}"]
        assert measured[str(ranks[name])] < measured["dense"], (name, ranks[name], measured)
        assert ranks[name] in report["grids"][name]


def test_accuracy_budget_splits_by_measured_time_shares():
    model = _model()
    costs = KernelCosts(torch.bfloat16, seconds_fn=_half_speed_factored)
    report = {}
    allocate_ranks(
        model,
        _stats(model),
        max_accuracy_drop=50.0,
        eval_dataloader=tiny_batches(num_labels=2),
        kernel_costs=costs,
        screening_samples=None,
        refine_steps=0,
        search="exhaustive",
        report=report,
    )
    shares = report["shares"]
    up = "bert.encoder.layer.0.intermediate.dense"
    block = "bert.encoder.layer.0.attention.self"
    expected_ratio = costs.dense_linear_seconds(256, 64) / costs.dense_attention_seconds(64, 4, 16)
    assert shares[up] / shares[block] == pytest.approx(expected_ratio)
    assert report["cost_model"].startswith("seconds measured in bfloat16")


def test_measurements_are_cached_and_rescaled_to_the_first_dense_timing():
    costs = KernelCosts(torch.float32, tokens=16, repeats=1, warmup=0)
    first = costs.seconds("linear", (24, 16), [None, 8])
    second = costs.seconds("linear", (24, 16), [None, 4, 8])
    assert second[None] == first[None] and second[8] == first[8] and second[4] > 0
    assert costs.seconds("qk", (16, 2, 8), [None, 2])[2] > 0
    with pytest.raises(ValueError, match="`kind` must be"):
        costs.seconds("scores", (2, 8, 8), [None])


def test_int8_costs_time_int8_modules():
    costs = KernelCosts(quantize="int8", tokens=16, repeats=1, warmup=0)
    assert set(costs.seconds("linear", (24, 16), [None, 8])) == {None, 8}
    assert costs.seconds("qk", (16, 2, 8), [None, 4])[4] > 0
    assert "dynamic int8" in costs.describe()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "int4"}, r"`dtype` must be one of"),
        ({"quantize": "int4"}, r"`quantize` must be one of"),
        ({"quantize": "int8", "dtype": torch.bfloat16}, r"timed with float32 activations"),
        ({"tokens": 0}, r"`tokens` must be an int >= 1"),
    ],
)
def test_bad_kernel_costs_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelCosts(**kwargs)


def test_kernel_costs_must_match_the_deployment_form():
    model = _model()
    with pytest.raises(ValueError, match="not the deployment form"):
        allocate_ranks(
            model, _stats(model), target_speedup=1.3, dtype=torch.bfloat16, kernel_costs=KernelCosts(torch.float32)
        )


def test_fast_accuracy_budget_orders_moves_by_measured_seconds():
    """With a deployment form, the fast search prices each move in the seconds measured in that form, and picks only
    ranks whose kernels were measured faster than the dense ones."""
    model = _model()
    costs = KernelCosts(torch.bfloat16, seconds_fn=_half_speed_factored)
    report = {}
    ranks = allocate_ranks(
        model,
        _stats(model),
        max_accuracy_drop=50.0,
        eval_dataloader=tiny_batches(num_labels=2),
        kernel_costs=costs,
        search="fast",
        report=report,
    )
    assert ranks and all(ranks[name] in report["grids"][name] for name in ranks)
    for name in [n for n in ranks if not n.endswith("attention.self")]:
        out_features, in_features = model.get_submodule(name).weight.shape
        assert ranks[name] <= breakeven_rank(out_features, in_features) // 2  # the measured, not the FLOP, break-even
    from drone_hf.candidates import Candidates

    candidates = Candidates(
        model, None, method="svd", attention=True, target_modules=None, rank_grid=None, rank_multiple=8,
        seq_len=128, kernel_costs=costs,
    )  # fmt: skip
    up = "bert.encoder.layer.0.intermediate.dense"
    assert candidates.cost(up, 8) == _half_speed_factored("linear", (256, 64), 8)
    assert candidates.cost(up, None) == 256 * 64
    block = "bert.encoder.layer.0.attention.self"
    assert candidates.cost(block, 2) == 2 * _half_speed_factored("qk", (64, 4, 16), 2)


_DEPLOYMENT_FORMS = {
    "int8": (
        {"quantize": "int8"},
        KernelCosts(quantize="int8", seconds_fn=_half_speed_factored),
        "int8 dynamic (float32 activations)",
    ),
    "bfloat16": ({"dtype": torch.bfloat16}, KernelCosts(torch.bfloat16, seconds_fn=_half_speed_factored), "bfloat16"),
}


@pytest.mark.parametrize("search", ["exhaustive", "fast"])
@pytest.mark.parametrize("form", list(_DEPLOYMENT_FORMS))
def test_a_budget_in_a_deployment_form_is_joint_checked_in_that_form(form, search):
    """With `quantize="int8"` (`dtype=torch.bfloat16`) each joint check scores the assignment quantised (cast) as it
    will ship, against the float32 model as given: the drop reported for the chosen ranks is that of the model
    `compress_model` builds from them in that form, not the float one's; the float32 working copy (and the model)
    come back bit for bit after every check."""
    from drone_hf.calibration import model_inputs

    options, costs, description = _DEPLOYMENT_FORMS[form]
    model = _model()
    stats = _stats(model)
    batches = tiny_batches(num_rows=24, num_labels=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def mean_logit(logits, labels):  # smooth: int8 / bfloat16 rounding moves it where accuracy would not
        return 1e4 * float(np.mean(logits[:, 0]))

    def score(m):
        with torch.no_grad():
            return mean_logit(torch.cat([m(**model_inputs(m, b)).logits.float() for b in batches]).numpy(), None)

    report = {}
    ranks = allocate_ranks(
        model,
        stats,
        max_accuracy_drop=1e6,
        eval_dataloader=batches,
        metric_fn=mean_logit,
        kernel_costs=costs,
        screening_samples=None,
        safety_margin=0.0,
        refine_steps=2,
        search=search,
        report=report,
        **options,
    )
    assert ranks and report["joint_check_form"] == description
    deployed = drone_hf.compress_model(model, stats, ranks=ranks, **options)
    float_model = drone_hf.compress_model(model, stats, ranks=ranks)
    assert report["heldout_base_metric"] == pytest.approx(score(model), rel=1e-6)
    assert report["heldout_drop"] == pytest.approx(score(model) - score(deployed), rel=1e-6)
    assert abs(score(deployed) - score(float_model)) > 1e-3 * abs(report["heldout_drop"])  # the forms differ
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_swap_in_dtype_casts_in_place_and_restores_bit_for_bit():
    from drone_hf.deployment import swap_in_dtype

    model = _model()
    model.tie_weights()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        restore = swap_in_dtype(model, "bfloat16")
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        cast = model(input_ids=ids).logits
        restore()
        again = model(input_ids=ids).logits
    assert cast.dtype == torch.bfloat16 and not torch.equal(cast.float(), reference)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and torch.equal(again, reference)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_speed_target_the_measured_grids_cannot_meet_says_they_were_measured():
    model = _model()
    costs = KernelCosts(torch.bfloat16, seconds_fn=_half_speed_factored)
    expected = (
        r"`target_speedup=20.0` cannot be met with these candidates and rank grids \(the grids keep only ranks "
        r"measured faster than the dense module in this deployment form \(seconds measured in bfloat16"
    )
    with pytest.raises(ValueError, match=expected):
        allocate_ranks(model, _stats(model), target_speedup=20.0, kernel_costs=costs)
