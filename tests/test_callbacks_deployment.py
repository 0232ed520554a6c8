"""The deployment form through the Trainer callback: `DroneCompressionArguments(dtype=..., quantize="int8")` casts or
quantises the final model (after distillation, which trains in float32), saves it, and it reloads in that form with
identical outputs; bad values fail when the arguments are built."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, HfArgumentParser

import drone_hf
from drone_hf import DroneCompressionArguments, DroneCompressionCallback, DroneDistillationArguments
from drone_hf.deployment import is_quantized, quantize_model
from drone_hf.int8 import DroneInt8Linear
from drone_hf.layers import DroneLinear

from .test_callbacks import _logits, _run_glue_module, _trainer
from .testing_utils import one_torch_thread, tiny_batches, tiny_dataset, tiny_teacher


_one_thread = one_torch_thread()


def _reload(path):
    loaded, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


@pytest.mark.parametrize(
    "form, dtype",
    [({"dtype": "bfloat16"}, torch.bfloat16), ({"dtype": torch.float16}, torch.float16), ({"quantize": "int8"}, None)],
)
def test_callback_saves_the_deployment_form_and_it_reloads_identically(tmp_path, form, dtype):
    train, dev = tiny_dataset(24), tiny_dataset(12, seed=2)
    settings = DroneCompressionArguments(rank=4, num_calibration_samples=16, **form)
    drone = DroneCompressionCallback(settings, train_dataset=train, eval_dataset=dev)
    trainer = _trainer(tmp_path, [drone], train=train)
    trainer.train()

    compressed = drone.compressed_model
    config = json.loads((tmp_path / "run" / "drone" / "config.json").read_text())
    reloaded = _reload(drone.compressed_model_path)
    batch = tiny_batches()[0]
    expected = _logits(compressed, batch)
    assert torch.equal(_logits(reloaded, batch), expected)
    if dtype is not None:
        assert {p.dtype for p in compressed.parameters()} == {dtype} == {p.dtype for p in reloaded.parameters()}
        assert config["dtype"] == str(dtype).removeprefix("torch.") and expected.dtype == dtype
        assert "drone_quantization" not in config or config["drone_quantization"] is None
    else:
        assert is_quantized(compressed) and is_quantized(reloaded) and expected.dtype == torch.float32
        assert config["drone_quantization"]["method"] == "int8-dynamic"
        assert isinstance(reloaded.bert.encoder.layer[0].intermediate.dense.down, DroneInt8Linear)
    # The trainer's model is untouched (float32, dense) and the metrics score the saved form.
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert set(drone.metrics) == {"dense", "compressed"}
    # The card's speed-up compares dense and compressed in the same form.
    name = "int8 dynamic (float32 activations)" if dtype is None else str(dtype).removeprefix("torch.")
    assert drone.speed["setting"].startswith(f"batch 8 x 64 tokens, dense and compressed in {name}")


def test_distillation_trains_in_float32_then_quantises(tmp_path, monkeypatch):
    import drone_hf.distillation

    seen, distill = {}, drone_hf.distillation.distill

    def recording_distill(student, teacher, *args, **kwargs):
        seen["dtypes"] = {p.dtype for p in student.parameters() if p.requires_grad}
        seen["factored"] = isinstance(student.bert.encoder.layer[0].intermediate.dense, DroneLinear)
        seen["int8"] = is_quantized(student)
        result = distill(student, teacher, *args, **kwargs)
        seen["distilled"] = copy.deepcopy(result)
        return result

    monkeypatch.setattr(drone_hf.distillation, "distill", recording_distill)
    train, dev = tiny_dataset(24), tiny_dataset(12, seed=2)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(rank=4, num_calibration_samples=16, quantize="int8"),
        distillation_args=DroneDistillationArguments(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2),
        train_dataset=train,
        eval_dataset=dev,
        measure_speed=False,
    )
    _trainer(tmp_path, [drone], train=train).train()

    assert seen["dtypes"] == {torch.float32} and seen["factored"] and not seen["int8"]
    # The saved model is the distilled float32 model, quantised once after the last step.
    expected = quantize_model(seen["distilled"]).state_dict()
    assert is_quantized(drone.compressed_model) and drone.compressed_model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in drone.compressed_model.state_dict().items())
    batch = tiny_batches()[0]
    assert torch.equal(_logits(_reload(drone.compressed_model_path), batch), _logits(drone.compressed_model, batch))
    assert set(drone.metrics) == {"dense", "compressed", "compressed+distilled"}


def test_a_budget_is_measured_in_the_deployment_form(tmp_path, monkeypatch):
    import drone_hf.kernel_costs

    from .test_kernel_costs import _half_speed_factored

    class FakeCosts(drone_hf.kernel_costs.KernelCosts):  # a made-up machine instead of timings of tiny products
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "seconds_fn": _half_speed_factored})

    monkeypatch.setattr(drone_hf.kernel_costs, "KernelCosts", FakeCosts)
    settings = DroneCompressionArguments(target_speedup=1.2, num_calibration_samples=16, quantize="int8")
    drone = DroneCompressionCallback(settings, train_dataset=tiny_dataset(24), measure_speed=False)
    _trainer(tmp_path, [drone], train=tiny_dataset(24)).train()
    assert drone.allocation_report["kernel_costs"]["quantize"] == "int8"
    assert is_quantized(drone.compressed_model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "float64"}, r"`dtype` must be one of \['float32', 'bfloat16', 'float16'\].*got 'float64'"),
        ({"dtype": torch.int8}, r"`dtype` must be one of .*got torch.int8"),
        ({"quantize": "int4"}, r"`quantize` must be one of \['int8'\].*got 'int4'"),
        (
            {"quantize": "int8", "dtype": "bfloat16"},
            r"`quantize='int8'` cannot be combined with `dtype=torch.bfloat16`",
        ),
    ],
)
def test_bad_deployment_values_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DroneCompressionArguments(rank=4, **kwargs)


def test_deployment_values_are_normalised_and_parse_from_the_command_line():
    assert DroneCompressionArguments(rank=4, dtype=torch.bfloat16).dtype == "bfloat16"
    assert DroneCompressionArguments(rank=4, dtype="torch.float16", quantize=None).dtype == "float16"
    assert DroneCompressionArguments(rank=4, quantize="INT8").quantize == "int8"
    (parsed,) = HfArgumentParser(DroneCompressionArguments).parse_args_into_dataclasses(
        ["--rank", "4", "--quantize", "int8"]
    )
    assert parsed.quantize == "int8" and parsed.dtype is None
    (parsed,) = HfArgumentParser(DroneCompressionArguments).parse_args_into_dataclasses(
        ["--rank", "4", "--dtype", "bfloat16"]
    )
    assert parsed.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"`dtype` must be one of"):
        HfArgumentParser(DroneCompressionArguments).parse_args_into_dataclasses(["--rank", "4", "--dtype", "half"])


def test_compress_model_takes_the_deployment_form_from_settings():
    model = tiny_teacher()
    stats = drone_hf.collect_activation_stats(model, tiny_batches())
    settings = DroneCompressionArguments(rank=4, dtype="bfloat16")
    assert drone_hf.compress_model(model, stats, settings=settings).dtype == torch.bfloat16
    assert drone_hf.compress_model(model, stats, settings=settings, dtype="float16").dtype == torch.float16


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--drone_dtype", "bfloat16"], r"--drone_dtype given without a compression budget: nothing would be"),
        (["--drone_rank", "4", "--drone_quantize", "int4"], r"`quantize` must be one of \['int8'\]"),
    ],
)
def test_run_glue_example_parses_the_deployment_form(tmp_path, monkeypatch, extra, match):
    run_glue = _run_glue_module(monkeypatch)
    argv = ["--model_name_or_path", str(tmp_path / "absent"), "--output_dir", str(tmp_path), "--task_name", "sst2"]
    with pytest.raises(ValueError, match=match):
        run_glue.main([*argv, "--do_train", *extra])
