import pytest
import torch

from drone_hf import ActivationStatsCollector, collect_activation_stats, load_activation_stats, save_activation_stats
from drone_hf.calibration import split_stats

from .testing_utils import tiny_batches, tiny_teacher


Q = "bert.encoder.layer.0.attention.self.query"
OUT = "bert.encoder.layer.1.output.dense"


def _reference_stats(model, batches, name):
    """Brute force: capture every input row of `name`, drop padding, build [x;1][x;1]^T by hand."""
    rows = []
    module = model.get_submodule(name)
    handle = module.register_forward_hook(lambda m, args, out: rows.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows[-1] = rows[-1][batch["attention_mask"].bool()]
    handle.remove()
    x = torch.cat(rows).double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return x.T @ x


def test_stats_equal_brute_force_and_exclude_padding():
    model, batches = tiny_teacher(), tiny_batches()
    stats = collect_activation_stats(model, batches)
    assert len(stats) == 12
    for name in (Q, OUT):
        torch.testing.assert_close(stats[name], _reference_stats(model, batches, name))
    num_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert split_stats(stats[OUT])[2] == num_tokens
    assert stats[OUT].dtype == torch.float64 and stats[OUT].shape == (38, 38)


def test_appending_padded_tokens_does_not_change_stats():
    model, batches = tiny_teacher(), tiny_batches()
    padded = []
    for batch in batches:
        extra = torch.zeros(batch["input_ids"].shape[0], 5, dtype=torch.long)
        padded.append(
            {
                "input_ids": torch.cat([batch["input_ids"], extra + 7], dim=1),
                "attention_mask": torch.cat([batch["attention_mask"], extra], dim=1),
            }
        )
    a, b = collect_activation_stats(model, batches), collect_activation_stats(model, padded)
    for name in a:
        # float32 forward passes over longer sequences differ in the last bits; one padded row would differ by O(1).
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_qkv_share_one_tensor_and_extra_keys_are_ignored():
    stats = collect_activation_stats(tiny_teacher(), tiny_batches())
    key = Q.replace("query", "key")
    assert stats[key] is stats[Q] and stats[Q.replace("query", "value")] is stats[Q]


def test_hooks_removed_even_on_error_and_model_mode_restored():
    model = tiny_teacher().train()
    bad = tiny_batches()
    bad[1] = {**bad[1], "input_ids": bad[1]["input_ids"].clone()}
    model.bert.embeddings.word_embeddings.weight.data[bad[1]["input_ids"][0, 0]] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in the inputs of `bert.encoder.layer.0.attention.self.query`"):
        collect_activation_stats(model, bad)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model.training


def test_max_batches_and_target_modules():
    model, batches = tiny_teacher(), tiny_batches()
    stats = collect_activation_stats(model, batches, target_modules="intermediate", max_batches=1)
    assert sorted(stats) == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]
    assert split_stats(stats["bert.encoder.layer.0.intermediate.dense"])[2] == int(batches[0]["attention_mask"].sum())


def test_collector_context_manager_direct_use():
    model, batches = tiny_teacher(), tiny_batches()
    with ActivationStatsCollector(model, [OUT]) as collector:
        assert model.get_submodule(OUT)._forward_pre_hooks
        for batch in batches:
            collector.set_attention_mask(batch["attention_mask"])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not model.get_submodule(OUT)._forward_pre_hooks
    torch.testing.assert_close(collector.stats[OUT], _reference_stats(model, batches, OUT))


def test_save_and_load_round_trip(tmp_path):
    stats = collect_activation_stats(tiny_teacher(), tiny_batches())
    path = tmp_path / "stats.safetensors"
    save_activation_stats(stats, path, metadata={"dataset": "tiny"})
    loaded = load_activation_stats(path)
    assert sorted(loaded) == sorted(stats) and all(torch.equal(loaded[k], stats[k]) for k in stats)


@pytest.mark.parametrize(
    "loader, kwargs, match",
    [
        ([], {}, "yielded no batch"),
        ([torch.ones(2, 3, dtype=torch.long)], {}, "must yield dicts with `input_ids`.*got Tensor"),
        ([{"attention_mask": torch.ones(2, 3)}], {}, r"must yield dicts with `input_ids`.*keys \['attention_mask'\]"),
        (
            [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3, dtype=torch.long)}],
            {},
            "all 0",
        ),
        (None, {"max_batches": 0}, "`max_batches` must be a positive int"),
    ],
)
def test_bad_input(loader, kwargs, match):
    with pytest.raises(ValueError, match=match):
        collect_activation_stats(tiny_teacher(), tiny_batches() if loader is None else loader, **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_model_inputs_reads_through_torch_compile():
    """A `torch.compile`d model's forward is `(*args, **kwargs)`: the keys come from the model it wraps."""
    from transformers import DistilBertModel

    from drone_hf.calibration import model_inputs

    from .testing_utils import tiny_config

    model = DistilBertModel(tiny_config("distilbert"))
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    batch["token_type_ids"] = torch.zeros(1, 3, dtype=torch.long)
    assert set(model_inputs(torch.compile(model), batch)) == {"input_ids", "attention_mask"}
