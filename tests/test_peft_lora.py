"""LoRA with peft on compressed models: the usual `LoraConfig(target_modules=["query", "value"])` adapts factored
layers as a whole (exact merge to rank k + r), LoRA on the factors keeps the ranks, and LoRA -> merge -> save ->
reload gives back the same DRONE model."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import drone_hf

from .testing_utils import tiny_batches, tiny_config, tiny_family_batches, tiny_teacher


peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

from drone_hf.lora_layers import DroneLoraLinear, DroneLoraQKLinear, merged_factors, unmerged_factors  # noqa: E402


# peft's get_peft_model calls a transformers method that transformers 5.x deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# (family, the usual LoRA role names of that family, the attention block of layer 0)
FAMILIES = [
    ("bert", ["query", "value"], "bert.encoder.layer.0.attention.self"),
    ("mpnet", ["q", "v"], "mpnet.encoder.layer.0.attention.attn"),
]


def _inputs():
    return {k: v for k, v in tiny_batches()[0].items() if k != "labels"}


@torch.no_grad()
def _logits(model, inputs=None):
    return model.eval()(**(inputs or _inputs())).logits


def _family(model_type: str, **compress):
    """A compressed tiny classifier of `model_type` and its batches (inputs, labels)."""
    from transformers import AutoModelForSequenceClassification as Auto

    torch.manual_seed(0)
    teacher = Auto.from_config(tiny_config(model_type, num_labels=2)).eval()
    small = drone_hf.compress_model(teacher, None, method="svd", **{"rank": 4, "attention": False, **compress})
    batches = tiny_family_batches(model_type)
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    return small, inputs, [b["labels"] for b in batches]


def _train(model, inputs, labels, steps=3):
    """A few SGD steps on the trainable (adapter and head) parameters, so that every LoRA B is non-zero."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        batch = step % len(inputs)
        loss = model(**inputs[batch], labels=labels[batch]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _factors(model) -> dict:
    return {  # keyed as in the compressed model, inside a peft adapter layer too
        name.removesuffix(".base_layer"): (module.down.weight.detach().clone(), module.up.weight.detach().clone())
        for name, module in model.named_modules()
        if isinstance(module, drone_hf.DroneLinear)
    }


# ----- the usual path: role names reach the factored layers -----
@pytest.mark.parametrize("model_type, roles, block", FAMILIES)
def test_role_names_lora_merge_save_reload(tmp_path, model_type, roles, block):
    small, inputs, labels = _family(model_type)
    ranks = dict(small.config.drone_ranks)
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=roles, r=2, lora_alpha=4, task_type="SEQ_CLS"))
    adapted = {n for n, m in tuned.named_modules() if isinstance(m, DroneLoraLinear)}
    assert len(adapted) == 4 and f"base_model.model.{block}.{roles[0]}" in adapted
    assert not any(isinstance(m, PeftLoraLinear) for m in tuned.modules())  # no factor was adapted on its own

    _train(tuned, inputs, labels)
    layer = tuned.get_submodule(f"base_model.model.{block}.{roles[1]}")
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert lora_b.abs().max() > 0 and layer.scaling["default"] == 2.0
    x = torch.randn(3, 5, layer.in_features)
    base = layer.get_base_layer()
    by_hand = (x @ base.down.weight.T) @ base.up.weight.T + base.up.bias + 2.0 * (x @ lora_a.T) @ lora_b.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)

    unmerged = _logits(tuned, inputs[0])
    merged = tuned.merge_and_unload()
    assert merged is small  # peft adapts and merges in place
    torch.testing.assert_close(_logits(merged, inputs[0]), unmerged, rtol=1e-5, atol=1e-5)
    targeted = {name.removeprefix("base_model.model.") for name in adapted}
    assert {n: m.rank for n, m in merged.drone_modules().items()} == {
        n: rank + 2 * (n in targeted) for n, rank in ranks.items()
    }

    merged.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["drone_ranks"]
    assert saved == {n: m.rank for n, m in merged.drone_modules().items()} and saved != ranks
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is type(small)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(_logits(reloaded, inputs[0]), _logits(merged, inputs[0]), rtol=0, atol=0)


def test_get_peft_model_adapts_in_place_and_leaves_the_factors_alone():
    small, inputs, labels = _family("bert")
    before, factors = _logits(small, inputs[0]), _factors(small)
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query", "value"], r=2, task_type="SEQ_CLS"))
    assert tuned.base_model.model is small  # as peft does for any model: the adapter layers go into it
    torch.testing.assert_close(_logits(tuned, inputs[0]), before, rtol=0, atol=1e-6)  # B starts at zero
    _train(tuned, inputs, labels)
    assert not torch.allclose(_logits(tuned, inputs[0]), before)
    with tuned.disable_adapter():  # the adapters and the trained head copy off: the compressed model as it was
        torch.testing.assert_close(_logits(tuned, inputs[0]), before, rtol=0, atol=0)
    assert all(torch.equal(a, b) for name in factors for a, b in zip(_factors(small)[name], factors[name]))
    unloaded = tuned.unload()  # no merge: the factored layers come back as they were
    assert unloaded is small and not any(isinstance(m, DroneLoraLinear) for m in unloaded.modules())
    assert all(torch.equal(a, b) for name in factors for a, b in zip(_factors(unloaded)[name], factors[name]))


def test_a_saved_adapter_loads_onto_the_compressed_model(tmp_path):
    small, inputs, labels = _family("bert")
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query", "value"], r=2, task_type="SEQ_CLS"))
    _train(tuned, inputs, labels)
    tuned.save_pretrained(tmp_path / "adapter")  # the adapter alone, as peft saves it
    fresh, _, _ = _family("bert")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert sum(isinstance(m, DroneLoraLinear) for m in loaded.modules()) == 4
    torch.testing.assert_close(_logits(loaded, inputs[0]), _logits(tuned, inputs[0]), rtol=0, atol=0)


def test_a_mixed_batch_takes_each_row_adapter():
    small, inputs, labels = _family("bert")
    base = _logits(small, inputs[0])
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query", "value"], r=2, task_type="SEQ_CLS"))
    _train(tuned, inputs, labels)
    adapted = _logits(tuned, inputs[0])
    with torch.no_grad():
        mixed = tuned(**inputs[0], adapter_names=["default", "__base__", "default", "__base__"]).logits
    torch.testing.assert_close(mixed[0::2], adapted[0::2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1::2], base[1::2], rtol=1e-5, atol=1e-6)


def test_unmerge_restores_the_factors_exactly():
    small, inputs, labels = _family("bert")
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query", "value"], r=3, task_type="SEQ_CLS"))
    _train(tuned, inputs, labels)
    factors, unmerged = _factors(small), _logits(tuned, inputs[0])
    tuned.merge_adapter()
    query = small.bert.encoder.layer[0].attention.self.query.get_base_layer()
    assert query.rank == 7 and query.down.weight.shape == (7, 32) and query.up.weight.shape == (32, 7)
    torch.testing.assert_close(_logits(tuned, inputs[0]), unmerged, rtol=1e-5, atol=1e-5)
    tuned.unmerge_adapter()
    assert query.rank == 4 and query.down.out_features == query.up.in_features == 4
    assert all(torch.equal(a, b) for name in factors for a, b in zip(_factors(small)[name], factors[name]))
    torch.testing.assert_close(_logits(tuned, inputs[0]), unmerged, rtol=0, atol=0)


def test_lora_bias_merges_into_the_bias_of_up():
    import warnings

    small, inputs, _ = _family("bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = peft.LoraConfig(target_modules=["value"], r=2, lora_bias=True, init_lora_weights=False)
        tuned = peft.get_peft_model(small, config)
    assert not [w for w in caught if "lora_bias" in str(w.message)]  # the bias is there, in `up`
    layer = tuned.base_model.model.bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(0.25)
    bias, unmerged = layer.get_base_layer().up.bias.detach().clone(), _logits(tuned, inputs[0])
    merged = tuned.merge_and_unload()
    torch.testing.assert_close(_logits(merged, inputs[0]), unmerged, rtol=1e-5, atol=1e-5)
    value = merged.bert.encoder.layer[0].attention.self.value
    torch.testing.assert_close(value.up.bias, bias + 0.25 * layer.scaling["default"])


def test_merged_factors_are_the_exact_concatenation():
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 9, generator=generator), torch.randn(7, 4, generator=generator)
    lora_a, lora_b = torch.randn(2, 9, generator=generator), torch.randn(7, 2, generator=generator)
    new_down, new_up = merged_factors(down, up, lora_a, lora_b, 0.5)
    assert new_down.shape == (6, 9) and new_up.shape == (7, 6)
    torch.testing.assert_close(new_up @ new_down, up @ down + 0.5 * lora_b @ lora_a)
    assert all(torch.equal(a, b) for a, b in zip(unmerged_factors(new_down, new_up, 4), (down, up)))


def test_narrowed_query_key_projections_take_lora_on_their_narrow_side(tmp_path):
    small, inputs, labels = _family("bert", attention_rank=3)
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query", "key"], r=2, task_type="SEQ_CLS"))
    assert sum(isinstance(m, DroneLoraQKLinear) for m in tuned.modules()) == 4
    _train(tuned, inputs, labels)
    layer = tuned.base_model.model.bert.encoder.layer[1].attention.self.key
    base = layer.get_base_layer()
    x = torch.randn(2, 5, 32)
    narrow = (
        x @ base.weight.T
        + base.bias
        + layer.scaling["default"] * (x @ layer.lora_A["default"].weight.T) @ layer.lora_B["default"].weight.T
    )
    by_hand = torch.nn.functional.pad(narrow.view(2, 5, 4, 3), (0, 5)).flatten(-2)  # head size 8, rank 3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)
    unmerged = _logits(tuned, inputs[0])
    merged = tuned.merge_and_unload()
    assert merged.config.drone_attention_ranks == {f"bert.encoder.layer.{i}.attention.self": 3 for i in range(2)}
    torch.testing.assert_close(_logits(merged, inputs[0]), unmerged, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, inputs[0]), _logits(merged, inputs[0]), rtol=0, atol=0)


# ----- what LoRA cannot adapt says so -----
def test_int8_modules_and_the_clustered_embedding_are_refused_with_the_way_out():
    small, _, _ = _family("bert")
    int8 = drone_hf.quantize_model(small)
    with pytest.raises(
        ValueError,
        match=r"query` is a factored layer with dynamic int8 factors.*then quantise \(`drone_hf.quantize_model",
    ):
        peft.get_peft_model(int8, peft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"value` is a factored layer with dynamic int8 factors"):
        drone_hf.lora_target_modules(int8, ["value"])
    dense_value = drone_hf.quantize_model(
        drone_hf.compress_model(tiny_teacher(), None, method="svd", ranks={"re:.*\\.query": 4})
    )
    with pytest.raises(ValueError, match=r"value` is a dynamic int8 module \(DroneInt8Linear\)"):
        peft.get_peft_model(dense_value, peft.LoraConfig(target_modules=["value"]))
    clustered, _, _ = _family("bert", embedding=(4, 8))
    with pytest.raises(ValueError, match=r"word_embeddings` is the projectively clustered word embedding"):
        peft.get_peft_model(clustered, peft.LoraConfig(target_modules=["word_embeddings"], task_type="SEQ_CLS"))


def test_unsupported_options_and_too_large_merges_are_refused():
    small, _, _ = _family("bert")
    with pytest.raises(ValueError, match=r"LoRA variants \['use_dora'\] are not supported on `.*query`"):
        peft.get_peft_model(small, peft.LoraConfig(target_modules=["query"], use_dora=True, task_type="SEQ_CLS"))
    small, _, _ = _family("bert")
    with pytest.raises(ValueError, match=r"`init_lora_weights='pissa'` is not supported"):
        peft.get_peft_model(small, peft.LoraConfig(target_modules=["query"], init_lora_weights="pissa"))
    small, _, _ = _family("bert")
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query"], r=28, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"gives rank 32, but a factored layer must stay below min\(in, out\) = 32"):
        tuned.merge_and_unload()


def test_dense_layers_keep_peft_own_lora_and_registration_is_idempotent():
    from peft.tuners.lora.model import LoraModel

    from drone_hf.peft_lora import register_peft_dispatch

    assert register_peft_dispatch() and register_peft_dispatch()  # `import drone_hf` did it already
    original = LoraModel._create_new_module.__wrapped__
    assert not hasattr(original, "_drone_hf_dispatch") and not hasattr(original, "__wrapped__")
    small = drone_hf.compress_model(tiny_teacher(), None, method="svd", ranks={"re:.*\\.query": 4})
    tuned = peft.get_peft_model(small, peft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    value = tuned.base_model.model.bert.encoder.layer[0].attention.self.value  # still dense
    assert type(value) is PeftLoraLinear
    assert type(tuned.base_model.model.bert.encoder.layer[0].attention.self.query) is DroneLoraLinear


# ----- LoRA on the factors: the ranks stay -----
def test_lora_target_modules_names_the_factors():
    small = drone_hf.compress_model(tiny_teacher(), None, method="svd", ranks={"re:.*\\.query": 4})
    names = drone_hf.lora_target_modules(small, ["query", "value"])
    assert "bert.encoder.layer.0.attention.self.query.down" in names
    assert "bert.encoder.layer.0.attention.self.query.up" in names
    assert "bert.encoder.layer.0.attention.self.value" in names  # still dense: itself
    assert drone_hf.lora_target_modules(small, ["query"], factors=("up",)) == [
        "bert.encoder.layer.0.attention.self.query.up",
        "bert.encoder.layer.1.attention.self.query.up",
    ]
    with pytest.raises(ValueError, match="matches no linear"):
        drone_hf.lora_target_modules(small, ["ffn"])
    attention = drone_hf.compress_model(tiny_teacher(), None, method="svd", rank=4, attention_rank=4)
    assert "bert.encoder.layer.0.attention.self.query" in drone_hf.lora_target_modules(attention, ["query"])


def test_lora_on_the_factors_merges_at_the_same_ranks(tmp_path):
    small = drone_hf.compress_model(tiny_teacher(), None, method="svd", rank=4, attention=False)
    ranks = dict(small.config.drone_ranks)
    config = peft.LoraConfig(
        target_modules=drone_hf.lora_target_modules(small, ["query", "value"]), r=2, init_lora_weights=False
    )
    tuned = peft.get_peft_model(small, config)
    assert not any(isinstance(m, DroneLoraLinear) for m in tuned.modules())
    adapted = _logits(tuned)
    assert not torch.allclose(adapted, _logits(drone_hf.compress_model(tiny_teacher(), None, method="svd", rank=4)))
    merged = tuned.merge_and_unload()
    assert isinstance(merged, drone_hf.DroneBertForSequenceClassification)
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-5, atol=1e-6)  # exact merge, same ranks
    assert {n: m.rank for n, m in merged.drone_modules().items()} == ranks
    merged.save_pretrained(tmp_path)
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(_logits(reloaded), adapted, rtol=1e-5, atol=1e-6)


def test_add_adapter_takes_the_usual_role_names(monkeypatch):
    # transformers 5.25 asks for peft >= 0.22 in add_adapter, which is not released yet (0.21.2 is the newest on
    # PyPI); the version check is lifted so that the same dispatch is tested through transformers' integration.
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "check_peft_version", lambda **kwargs: None)
    small = drone_hf.compress_model(tiny_teacher(), None, method="svd", rank=4, attention=False)
    small.add_adapter(peft.LoraConfig(target_modules=["query", "value"], r=2))
    adapted = {name for name, module in small.named_modules() if isinstance(module, DroneLoraLinear)}
    assert "bert.encoder.layer.1.attention.self.value" in adapted and len(adapted) == 4


def test_a_save_refuses_a_config_that_lists_a_module_that_is_not_factored(tmp_path):
    small = drone_hf.compress_model(tiny_teacher(), None, method="svd", rank=4, attention=False)
    name = "bert.encoder.layer.0.output.dense"
    small.set_submodule(name, small.get_submodule(name).to_dense())
    with pytest.raises(ValueError, match=rf"lists `{name}` \(rank 4\) but that module is a Linear, not a DroneLinear"):
        small.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_import_without_peft_works_and_registers_nothing():
    import subprocess
    import sys

    code = "import sys\nsys.modules['peft'] = None\nimport drone_hf\nprint('ok', drone_hf.lora_target_modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok <function lora_target_modules")
