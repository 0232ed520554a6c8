import pytest
import torch

from drone_hf import (
    DroneBertForSequenceClassification,
    DroneLinear,
    allocate_ranks,
    collect_activation_stats,
    compress_model,
)
from drone_hf.calibration import split_stats
from drone_hf.factorize import data_weighted_error
from drone_hf.methods.drone import DroneMethod

from .testing_utils import tiny_batches, tiny_teacher, unsupported_classifier


INTER = "bert.encoder.layer.0.intermediate.dense"


@pytest.fixture(scope="module")
def teacher_and_stats():
    model = tiny_teacher()
    return model, collect_activation_stats(model, tiny_batches())


def test_returns_new_model_and_leaves_input_untouched(teacher_and_stats):
    model, stats = teacher_and_stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = compress_model(model, stats, rank=4)
    assert isinstance(compressed, DroneBertForSequenceClassification) and compressed is not model
    assert type(model.get_submodule(INTER)).__name__ == "Linear"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(compressed.get_submodule(INTER), DroneLinear)
    assert compressed.config.drone_ranks[INTER] == 4 and len(compressed.config.drone_ranks) == 12
    assert compressed.config.drone_calibration["num_tokens"] == int(split_stats(stats[INTER])[2])
    assert compressed.training == model.training
    # Untouched modules are copied exactly.
    torch.testing.assert_close(compressed.classifier.weight, model.classifier.weight, rtol=0, atol=0)


def test_layers_hold_the_drone_optimum(teacher_and_stats):
    model, stats = teacher_and_stats
    drone = compress_model(model, stats, rank=3)
    svd = compress_model(model, None, method="svd", rank=3)
    assert svd.config.drone_method == "svd" and svd.config.drone_calibration is None
    for name in stats:
        weight = model.get_submodule(name).weight.detach()
        c = split_stats(stats[name])[0]
        d_err = data_weighted_error(weight, drone.get_submodule(name).to_dense().weight.detach(), c)
        s_err = data_weighted_error(weight, svd.get_submodule(name).to_dense().weight.detach(), c)
        assert d_err <= s_err * (1 + 1e-5) + 1e-6


def test_full_span_rank_reproduces_logits():
    # With hidden 32 and FFN 37, rank 15/17 is below break-even yet the calibration span of Q/K/V/AO is tiny:
    # use few tokens so rank >= data rank and DRONE must be exact on that data.
    model = tiny_teacher(intermediate_size=64, hidden_size=64, num_attention_heads=4)
    ids = torch.randint(1, 99, (1, 6))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    stats = collect_activation_stats(model, batches)
    compressed = compress_model(model, stats, rank=7)  # 7 > 6 tokens + the constant direction
    with torch.no_grad():
        torch.testing.assert_close(compressed(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_ranks_mapping_and_patterns(teacher_and_stats):
    model, stats = teacher_and_stats
    compressed = compress_model(model, stats, ranks={"re:.*intermediate.dense": 5, INTER: 6})
    assert compressed.config.drone_ranks == {INTER: 6, "bert.encoder.layer.1.intermediate.dense": 5}
    assert isinstance(compressed.get_submodule("bert.encoder.layer.0.output.dense"), torch.nn.Linear)


def test_param_ratio_meets_budget(teacher_and_stats):
    model, stats = teacher_and_stats
    targets = list(stats)
    dense = sum(model.get_submodule(n).weight.numel() for n in targets)
    for ratio in (0.55, 0.8):
        compressed = compress_model(model, stats, param_ratio=ratio, rank_multiple=2)
        kept = sum(
            p.numel() for n in targets for k, p in compressed.get_submodule(n).named_parameters() if "bias" not in k
        )
        assert kept <= ratio * dense
        assert kept >= (ratio - 0.1) * dense  # the budget is used, not wasted


def test_non_compressing_rank_is_left_dense_with_one_warning(teacher_and_stats):
    model, stats = teacher_and_stats
    # 32x32 breaks even at 16, 37x32 at 17: rank 16 only helps the FFN layers.
    with pytest.warns(UserWarning, match=r"Leaving 8 modules dense .*k\*\(in\+out\) >= in\*out"):
        compressed = compress_model(model, stats, rank=16)
    ffn = [n for n in stats if n.endswith(("intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"))]
    assert sorted(compressed.config.drone_ranks) == sorted(ffn)


def test_compressing_a_compressed_model_factors_remaining_layers(teacher_and_stats):
    model, stats = teacher_and_stats
    first = compress_model(model, stats, target_modules="intermediate", rank=4)
    stats2 = collect_activation_stats(first, tiny_batches(), target_modules="output")
    second = compress_model(first, stats2, target_modules="output", rank=4)
    assert len(second.config.drone_ranks) == 4
    torch.testing.assert_close(second.get_submodule(INTER).down.weight, first.get_submodule(INTER).down.weight)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"rank": 0},
            ValueError,
            r"Rank for `bert.encoder.layer.0.attention.self.query` \(32x32\) .*\[1, 31\], got 0",
        ),
        ({"rank": 32}, ValueError, r"\[1, 31\], got 32"),
        ({"rank": 2.5}, TypeError, "`rank` must be an int"),
        ({"ranks": {"bert.encoder.layer.0.intermediat.dense": 4}}, ValueError, "Unknown module in `ranks`.*Close"),
        (
            {"ranks": {"bert.pooler.dense": 4}},
            ValueError,
            r"`bert.pooler.dense` in `ranks` is not a compression target \(the pooler/classifier head is kept dense\)",
        ),
        (
            {"method": "pca", "rank": 4},
            ValueError,
            r"Unknown `method` 'pca'; expected one of \['drone', 'drone-bc', 'drone-act', 'svd'\]",
        ),
        ({}, ValueError, "Pass one of `rank`"),
        ({"rank": 4, "param_ratio": 0.5}, ValueError, "cannot be combined"),
        ({"param_ratio": 1.5}, ValueError, r"`param_ratio` must be a float in \(0, 1\), got 1.5"),
        ({"param_ratio": 0.01}, ValueError, "cannot be met"),
        ({"target_modules": "ffn", "rank": 4}, ValueError, "Unknown target module `ffn`"),
    ],
)
def test_bad_arguments(teacher_and_stats, kwargs, error, match):
    model, stats = teacher_and_stats
    with pytest.raises(error, match=match):
        compress_model(model, stats, **kwargs)


def test_stats_from_another_model(teacher_and_stats):
    model, _ = teacher_and_stats
    other = tiny_teacher(hidden_size=48, num_attention_heads=4)
    other_stats = collect_activation_stats(other, tiny_batches())
    with pytest.raises(ValueError, match=r"collected on a different model.*different names or shapes"):
        compress_model(model, other_stats, rank=4)
    with pytest.raises(ValueError, match=r"must have shape \(33, 33\) for this model, got \(49, 49\).*another model"):
        compress_model(model, dict(other_stats), rank=4)  # a plain dict has no fingerprint: the shapes still differ


def test_missing_or_bad_stats(teacher_and_stats):
    model, stats = teacher_and_stats
    with pytest.raises(TypeError, match="`stats` must be the dict"):
        compress_model(model, None, rank=4)
    partial = {k: v for k, v in stats.items() if "layer.1" not in k}
    with pytest.raises(ValueError, match="no statistics for 6 target modules"):
        compress_model(model, partial, rank=4)
    # Statistics are needed only for the modules that get factored.
    assert compress_model(model, partial, ranks={"re:.*layer\\.0.*": 4}).config.drone_ranks
    nan = {k: torch.full_like(v, float("nan")) for k, v in stats.items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress_model(model, nan, rank=4)


def test_an_unsupported_family_or_object():
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2' \(GPT2ForSequenceClassification\)"):
        compress_model(unsupported_classifier(), None, method="svd", rank=4)
    with pytest.raises(ValueError, match="must be a transformers encoder model"):
        compress_model(torch.nn.Linear(3, 3), None, method="svd", rank=4)


def test_settings_dataclass_is_the_same_as_keywords():
    from drone_hf import DroneCompressionArguments

    model = tiny_teacher()
    stats = collect_activation_stats(model, tiny_batches())
    via_settings = compress_model(model, stats, DroneCompressionArguments(target_speedup=1.3))
    via_keywords = compress_model(model, stats, target_speedup=1.3)
    assert via_settings.config.drone_ranks == via_keywords.config.drone_ranks
    assert via_settings.config.drone_attention_ranks == via_keywords.config.drone_attention_ranks
    override = compress_model(model, stats, DroneCompressionArguments(rank=4), method="svd")
    assert override.config.drone_method == "svd" and set(override.config.drone_ranks.values()) == {4}
    with pytest.raises(TypeError, match="`settings` must be a DroneCompressionArguments"):
        compress_model(model, stats, {"rank": 4})


def test_a_budget_factors_its_ranks_from_the_allocation_s_decompositions(teacher_and_stats, monkeypatch):
    # compress_model with a budget decomposes each candidate linear once, in the allocation, and factors the chosen
    # ranks from those decompositions: the same tensors as a rebuild from the ranks, without a second decomposition.
    model, stats = teacher_and_stats
    decompositions = {}
    ranks = allocate_ranks(model, stats, target_speedup=1.2, rank_multiple=2, decompositions=decompositions)
    linears = {name: rank for name, rank in ranks.items() if name in decompositions}
    blocks = {name: rank for name, rank in ranks.items() if name not in decompositions}
    assert linears and blocks and set(decompositions) > set(linears)  # candidates the budget left dense too
    calls = []
    original = DroneMethod.decompose
    monkeypatch.setattr(DroneMethod, "decompose", lambda self, *args: calls.append(1) or original(self, *args))
    compressed = compress_model(model, stats, target_speedup=1.2, rank_multiple=2)
    assert len(calls) == len(decompositions)  # the allocation's only
    calls.clear()
    rebuilt = compress_model(model, stats, ranks=linears, attention_ranks=blocks)
    assert len(calls) == len(linears)
    assert compressed.config.drone_ranks == rebuilt.config.drone_ranks == linears
    rebuilt_state = rebuilt.state_dict()
    for name, tensor in compressed.state_dict().items():
        assert torch.equal(tensor, rebuilt_state[name]), name
    with pytest.raises(TypeError, match=r"`decompositions` must be a dict to fill \(or None\), got list"):
        allocate_ranks(model, stats, target_speedup=1.5, decompositions=[])
