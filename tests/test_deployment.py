"""The deployment form of a compressed model: `dtype=` (bfloat16, float16) and `quantize="int8"` save as safetensors,
reload with stock `from_pretrained` in the same form and give identical outputs; bad values fail clearly."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf.deployment import check_deployment, int8_module_names, is_quantized, quantize_model
from drone_hf.int8 import DroneInt8Linear, DroneInt8QKLinear
from drone_hf.layers import DroneLinear
from drone_hf.profiling import model_macs

from .testing_utils import benchmark_module, tiny_config, tiny_family_batches


FAMILIES = ["bert", "mpnet", "roberta"]
_CLASSES = {
    "bert": "BertForSequenceClassification",
    "mpnet": "MPNetForSequenceClassification",
    "roberta": "RobertaForSequenceClassification",
}


def _teacher(model_type: str):
    torch.manual_seed(0)
    return getattr(transformers, _CLASSES[model_type])(tiny_config(model_type, num_labels=2)).eval()


def _setup(model_type: str):
    model = _teacher(model_type)
    batches = tiny_family_batches(model_type)
    loader = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in batches]
    stats = drone_hf.collect_activation_stats(model, loader)
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    return model, stats, inputs


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _reload(model, tmp_path, **kwargs):
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval(), json.loads((tmp_path / "config.json").read_text())


def _files(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_saves_and_reloads_in_that_dtype(model_type, dtype, tmp_path):
    model, stats, inputs = _setup(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = drone_hf.compress_model(model, stats, rank=4, dtype=dtype).eval()
    assert {p.dtype for p in compressed.parameters()} == {dtype}
    assert compressed.config.dtype == dtype
    expected = _logits(compressed, inputs)
    assert expected.dtype == dtype

    loaded, config = _reload(compressed, tmp_path)  # transformers 5: from_pretrained defaults to dtype="auto"
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert loaded.dtype == dtype and {p.dtype for p in loaded.parameters()} == {dtype}
    assert torch.equal(_logits(loaded, inputs), expected)
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype="auto").eval()
    assert torch.equal(_logits(auto, inputs), expected)
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in _files(tmp_path))

    # The input model is untouched: same weights, still float32.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_dtype_by_name_matches_dtype_object():
    model, stats, inputs = _setup("bert")
    by_name = drone_hf.compress_model(model, stats, rank=4, dtype="bfloat16").eval()
    by_object = drone_hf.compress_model(model, stats, rank=4, dtype=torch.bfloat16).eval()
    assert torch.equal(_logits(by_name, inputs), _logits(by_object, inputs))


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_int8_saves_as_safetensors_and_reloads_identically(model_type, tmp_path):
    model, stats, inputs = _setup(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = drone_hf.compress_model(model, stats, rank=4, attention_rank=4, quantize="int8").eval()
    expected = _logits(compressed, inputs)
    float_model = drone_hf.compress_model(model, stats, rank=4, attention_rank=4).eval()
    assert torch.allclose(expected, _logits(float_model, inputs), atol=0.05)  # int8 stays close to float

    loaded, config = _reload(compressed, tmp_path)
    assert config["drone_format_version"] == 2 and config["dtype"] == "float32"
    spec = config["drone_quantization"]
    assert spec["method"] == "int8-dynamic"
    assert spec["modules"] == int8_module_names(float_model)
    modules = dict(loaded.named_modules())
    for name in spec["modules"]:
        assert isinstance(modules[name], (DroneInt8Linear, DroneInt8QKLinear)), name
        assert modules[name].weight.dtype == torch.int8 and modules[name].weight_scale.dtype == torch.float32
    assert any(isinstance(m, DroneInt8QKLinear) for m in modules.values())
    assert any(isinstance(m, DroneLinear) and isinstance(m.down, DroneInt8Linear) for m in modules.values())
    assert torch.equal(_logits(loaded, inputs), expected)

    # Plain safetensors: int8 weights and float32 per-output-channel scales, nothing pickled.
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in _files(tmp_path))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        name = spec["modules"][0]
        assert handle.get_tensor(f"{name}.weight").dtype == torch.int8
        scale = handle.get_tensor(f"{name}.weight_scale")
        assert scale.dtype == torch.float32 and scale.shape == (modules[name].weight.shape[0],)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantize_model_on_a_dense_model_saves_and_reloads(tmp_path):
    model, _, inputs = _setup("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_model(model).eval()
    assert is_quantized(quantized) and not is_quantized(model)
    assert isinstance(quantized, drone_hf.DroneModelMixin) and quantized.config.drone_ranks is None
    assert model_macs(quantized) == model_macs(model)
    expected = _logits(quantized, inputs)
    loaded, config = _reload(quantized, tmp_path)
    assert config["drone_method"] == "none"
    assert torch.equal(_logits(loaded, inputs), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _quantize_dynamic_encoder(model):
    """`torch.ao.quantization.quantize_dynamic` (per-channel qconfig) on the encoder linears only (the same set)."""
    reference = copy.deepcopy(model)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(
            reference, dict.fromkeys(int8_module_names(model), qconfig), inplace=True
        )
    return reference


@pytest.mark.skipif(
    torch.backends.quantized.engine not in ("x86", "fbgemm"), reason="compares with the x86/fbgemm dynamic kernel"
)
def test_int8_matches_quantize_dynamic():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    reference = _quantize_dynamic_encoder_linear(linear)
    inputs = torch.randn(2, 5, 48)
    with torch.no_grad():
        assert torch.equal(DroneInt8Linear.from_linear(linear)(inputs), reference(inputs))

    model, _, inputs = _setup("bert")
    ours, theirs = _logits(quantize_model(model), inputs), _logits(_quantize_dynamic_encoder(model), inputs)
    assert torch.allclose(ours, theirs, atol=1e-5)


def _quantize_dynamic_encoder_linear(linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(copy.deepcopy(linear)),
            {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
        )


def test_int8_module_survives_deepcopy_and_buffer_edits():
    torch.manual_seed(0)
    layer = DroneInt8Linear.from_linear(torch.nn.Linear(16, 8))
    inputs = torch.randn(3, 16)
    first = layer(inputs)
    assert torch.equal(copy.deepcopy(layer)(inputs), first)
    layer.bias.add_(1.0)  # the packed weight is rebuilt when a buffer changes
    assert torch.allclose(layer(inputs), first + 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "int4"}, r"`dtype` must be one of \['float32', 'bfloat16', 'float16'\].*got 'int4'"),
        ({"dtype": torch.int8}, r"`dtype` must be one of .*got torch.int8"),
        ({"quantize": "int4"}, r"`quantize` must be one of \['int8'\].*got 'int4'"),
        ({"quantize": True}, r"`quantize` must be one of \['int8'\].*got True"),
        ({"quantize": "int8", "dtype": torch.bfloat16}, r"`quantize='int8'` cannot be combined with `dtype=torch.bf"),
    ],
)
def test_bad_deployment_values_raise_naming_the_argument(kwargs, match):
    model, stats, _ = _setup("bert")
    with pytest.raises(ValueError, match=match):
        drone_hf.compress_model(model, stats, rank=4, **kwargs)


def test_quantize_a_half_model_needs_an_explicit_float32_result():
    model, stats, inputs = _setup("bert")
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"`quantize='int8'` needs a float32 model.*torch.bfloat16"):
        drone_hf.compress_model(half, stats, rank=4, quantize="int8")
    with pytest.raises(ValueError, match=r"needs a float32 model"):
        quantize_model(half)
    quantized = drone_hf.compress_model(half, stats, rank=4, quantize="int8", dtype=torch.float32)
    assert is_quantized(quantized) and quantized.dtype == torch.float32


def test_quantize_refuses_a_model_off_the_cpu():
    model, stats, _ = _setup("bert")
    model.to("meta")  # stands for a GPU: any device but the CPU (compress_model refuses meta weights earlier)
    with pytest.raises(ValueError, match=r"`quantize='int8'` needs a model on the CPU.*on meta"):
        check_deployment(model, None, "int8")


def test_an_int8_model_cannot_be_compressed_again():
    model, stats, _ = _setup("bert")
    quantized = quantize_model(model)
    with pytest.raises(ValueError, match="already has int8 modules"):
        drone_hf.compress_model(quantized, stats, rank=4)
    with pytest.raises(ValueError, match="already has int8 modules"):
        quantize_model(quantized)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_refuses_cuda_clearly():
    model, stats, inputs = _setup("bert")
    with pytest.raises(ValueError, match=r"needs a model on the CPU.*cuda"):
        drone_hf.compress_model(model.cuda(), stats, rank=4, quantize="int8")
    layer = DroneInt8Linear.from_linear(torch.nn.Linear(16, 8)).cuda()
    with pytest.raises(RuntimeError, match="runs on CPU only"):
        layer(torch.randn(2, 16, device="cuda"))


def test_int8_without_the_quantized_engine_falls_back_to_the_dequantised_weights(monkeypatch):
    torch.manual_seed(0)
    layer = DroneInt8Linear.from_linear(torch.nn.Linear(32, 8))
    inputs = torch.randn(4, 32)
    with torch.no_grad():
        fast = layer(inputs)
        monkeypatch.setattr("drone_hf.int8._kernel_available", lambda: False)
        slow = layer(inputs)
    expected = torch.nn.functional.linear(inputs, layer.weight.float() * layer.weight_scale[:, None], layer.bias)
    assert torch.allclose(slow, expected, atol=1e-6) and torch.allclose(fast, slow, atol=0.05)


def test_deployment_table_names_budget_and_distilled_models_by_what_they_are(tmp_path):
    """`benchmarks/deployment.py --budget-model DIR`: a `drone-hf compress` budget reads "drone 1-pt budget (fast)"
    (", timed float32" when its ranks were costed by measured kernels, so two budgets of one teacher differ),
    a `base_size.py` distillation entry "drone rank 16 + 3000 steps distilled", anything else its folder name."""
    folders = {
        name: tmp_path / name for name in ("budget", "timed", "int8", "bf16", "act", "ranked", "flops", "other")
    }
    for folder in folders.values():
        folder.mkdir()
    (folders["budget"] / "drone_results.json").write_text(
        json.dumps(
            {
                "budget": {"max_accuracy_drop": 1.0},
                "allocation": {"search": "fast", "cost_model": "multiply-adds at 128 tokens", "refined_steps": 6},
            }
        )
    )
    timed = "seconds measured in float32 at 1024 tokens (AMD EPYC, 2 threads)"
    (folders["timed"] / "drone_results.json").write_text(
        json.dumps({"budget": {"max_accuracy_drop": 1.5}, "allocation": {"search": "fast", "cost_model": timed}})
    )
    int8 = {
        "search": "exhaustive",
        "cost_model": "seconds measured in dynamic int8 at 1024 tokens (AMD EPYC, 2 threads)",
        "joint_check_form": "int8 dynamic (float32 activations)",
    }
    (folders["int8"] / "drone_results.json").write_text(
        json.dumps({"budget": {"max_accuracy_drop": 1.0}, "allocation": int8})
    )
    bf16 = {
        "search": "fast",
        "refined_steps": 24,
        "sequential": {"steps": [238]},
        "cost_model": "seconds measured in bfloat16 at 1024 tokens (AMD EPYC, 2 threads)",
        "joint_check_form": "bfloat16",
        "safety_margin": 0.0,
    }
    (folders["bf16"] / "drone_results.json").write_text(
        json.dumps({"budget": {"max_accuracy_drop": 1.0}, "allocation": bf16})
    )
    (folders["act"] / "drone_results.json").write_text(
        json.dumps({"budget": {"max_accuracy_drop": 1.0}, "method": "drone-act", "allocation": {"search": "fast"}})
    )
    (folders["ranked"] / "result.json").write_text(json.dumps({"rank": 16, "speedup_target": None, "steps": 3000}))
    (folders["flops"] / "result.json").write_text(json.dumps({"rank": None, "speedup_target": 4.0, "steps": 600}))
    with benchmark_module("common") as common:
        labels = {name: common.budget_label(folder) for name, folder in folders.items()}
    assert labels == {
        "budget": "drone 1-pt budget (fast)",
        "timed": "drone 1.5-pt budget (fast, timed float32)",
        "int8": "drone 1-pt budget (exhaustive, timed dynamic int8, checked in int8 dynamic)",
        "bf16": (
            "drone 1-pt budget (fast, 24 refinement checks, sequential refit, timed bfloat16, checked in bfloat16, "
            "safety margin 0)"
        ),
        "act": "drone-act 1-pt budget (fast)",
        "ranked": "drone rank 16 + 3000 steps distilled",
        "flops": "drone 4x FLOPs + 600 steps distilled",
        "other": "drone other",
    }


def test_deployment_table_keeps_a_budget_model_saved_in_a_deployment_form_in_that_form(tmp_path):
    """`benchmarks/deployment.py --budget-model DIR` with DIR from `drone-hf compress --quantize int8` (or `--dtype
    bfloat16`): reloaded, the model is recognised as int8 (bf16), so it gets a row in that form only instead of being
    quantised or cast a second time; a float32 one enters every form."""
    model, stats, _ = _setup("bert")
    saved = {
        "fp32": drone_hf.compress_model(model, stats, rank=4),
        "int8": drone_hf.compress_model(model, stats, rank=4, quantize="int8"),
        "bf16": drone_hf.compress_model(model, stats, rank=4, dtype=torch.bfloat16),
    }
    with benchmark_module("deployment") as deployment:
        for form, compressed in saved.items():
            loaded, _ = _reload(compressed, tmp_path / form)
            assert deployment._saved_form(loaded) == form


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_dtype_on_a_cpu_without_its_units_is_warned_about(monkeypatch, caplog, dtype):
    """On an AVX2-only CPU bfloat16 runs emulated (8.5x slower than float32 on the Zen 2 of session 26), and so do a
    budget's timings and joint checks in it: `compress_model(dtype=)` says so up front, naming the dtype, and says
    nothing where oneDNN reports the units (or cannot say)."""
    import logging

    from drone_hf import deployment

    model, _, _ = _setup("bert")
    name = str(dtype).removeprefix("torch.")
    for has_units, warned in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(deployment, "cpu_has_half_units", lambda d, has=has_units: has)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="drone_hf.deployment"):
            assert check_deployment(model, name, None) == (dtype, None)
        assert (f"`dtype={name}` on a CPU without {dtype} matrix units" in caplog.text) is warned
        assert ("float32 or `quantize='int8'`" in caplog.text) is warned
    caplog.clear()
    monkeypatch.setattr(deployment, "cpu_has_half_units", lambda d: False)
    with caplog.at_level(logging.WARNING, logger="drone_hf.deployment"):
        check_deployment(model, None, "int8")  # float32 activations: nothing emulated
    assert caplog.text == ""


def test_cpu_has_half_units_answers_for_half_dtypes_only():
    from drone_hf.deployment import cpu_has_half_units

    assert cpu_has_half_units(torch.float32) is None
    assert cpu_has_half_units(torch.bfloat16) in (True, False, None)
    if hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"):
        assert cpu_has_half_units(torch.bfloat16) is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
