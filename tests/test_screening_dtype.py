"""`screening_dtype`: the per-module screening of an accuracy budget under `torch.autocast`, the joint checks that
decide the budget still in the model's own dtype."""

import json

import pytest
import torch

from drone_hf import allocate_ranks, collect_activation_stats, compress_model
from drone_hf.heldout import LayerwiseEvaluator

from .testing_utils import measured_drop, self_labelled_case


@pytest.fixture(scope="module")
def case():
    """A tiny teacher whose labels are its own predictions and a metric that sees every small change of the logits
    (as in test_budget_path), so that the budget binds on a tiny model."""
    model, batches, reference, logit_metric = self_labelled_case()
    return model, batches, collect_activation_stats(model, batches), logit_metric, reference


def test_the_evaluator_runs_every_forward_under_autocast(case):
    model, batches, *_ = case
    seen = []
    handle = model.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        plain = LayerwiseEvaluator(model, batches)
        autocast = LayerwiseEvaluator(model, batches, autocast_dtype=torch.bfloat16)
        assert seen == [torch.float32] * len(batches) + [torch.bfloat16] * len(batches)  # the dense reference too
        exact, rounded = plain.logits(0), autocast.logits(0)
    finally:
        handle.remove()
    assert exact.dtype == rounded.dtype == "float32"  # rows are float32 whatever the compute dtype
    assert 0 < abs(exact - rounded).max() < 0.1  # bf16 rounding: visible, small
    assert next(model.parameters()).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("search", ["fast", "exhaustive"])
def test_bf16_screening_keeps_the_budget_checked_in_float32(case, search):
    model, batches, stats, metric, base = case
    report = {}
    ranks = allocate_ranks(
        model,
        stats,
        eval_dataloader=batches,
        max_accuracy_drop=0.01,
        metric_fn=metric,
        search=search,
        screening_samples=None,  # every row: still a separate evaluator, under autocast
        screening_dtype="bfloat16",
        refine_steps=2,
        report=report,
    )
    assert ranks and report["screening_dtype"] == "bfloat16"
    drop, error = measured_drop(model, stats, batches, ranks, metric, base)
    # The reported drop is the float32 one (a bf16 joint check would be off by the rounding, ~1e-3 of a logit).
    assert drop == pytest.approx(report["heldout_drop"], abs=1e-5)
    assert drop + error <= 0.01 + 1e-9


def test_float32_screening_is_the_default(case):
    model, batches, stats, metric, _ = case
    kwargs = {"eval_dataloader": batches, "max_accuracy_drop": 0.01, "metric_fn": metric, "search": "fast"}
    kwargs["refine_steps"] = 2
    default, given = {}, {}
    ranks = allocate_ranks(model, stats, report=default, **kwargs)
    assert allocate_ranks(model, stats, screening_dtype=torch.float32, report=given, **kwargs) == ranks
    assert default["screening_dtype"] is None and given["screening_dtype"] is None
    assert given["evaluations"] == default["evaluations"]


@pytest.mark.parametrize("value", ["int8", "bf16", torch.int8, 16])
def test_a_bad_screening_dtype_is_refused(case, value):
    model, batches, stats, metric, _ = case
    with pytest.raises(ValueError, match=r"`screening_dtype` must be one of \['float32', 'bfloat16', 'float16'\]"):
        allocate_ranks(
            model, stats, eval_dataloader=batches, max_accuracy_drop=0.01, metric_fn=metric, screening_dtype=value
        )


def test_compress_model_takes_it_as_an_allocation_option(case):
    model, batches, stats, metric, _ = case
    report = {}
    compress_model(
        model,
        stats,
        max_accuracy_drop=0.01,
        eval_dataloader=batches,
        allocation_options={"metric_fn": metric, "screening_dtype": "bfloat16", "search": "fast"},
        allocation_report=report,
    )
    assert report["screening_dtype"] == "bfloat16"
    json.dumps(report["screening_dtype"])  # the report (saved with the model) stays JSON
