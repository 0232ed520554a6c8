import pytest
import torch
from transformers import HfArgumentParser

from drone_hf import DroneCompressionArguments, DroneDistillationArguments

from .testing_utils import tiny_teacher, unsupported_classifier


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, r"Pass one budget .*got none"),
        ({"rank": 4, "param_ratio": 0.5}, r"Pass one budget.*\['rank', 'param_ratio'\]"),
        ({"target_speedup": 2.0, "max_accuracy_drop": 1.0}, r"Pass one budget"),
        (
            {"rank": 4, "method": "pca"},
            r"Unknown `method` 'pca'; expected one of \['drone', 'drone-bc', 'drone-act', 'svd'\]",
        ),
        ({"rank": 0}, r"`rank` must be an int >= 1 or None, got 0"),
        ({"rank": 4.0}, r"`rank` must be an int >= 1"),
        ({"rank": True}, r"`rank` must be an int >= 1"),
        ({"attention_rank": -1}, r"`attention_rank` must be an int >= 1"),
        ({"param_ratio": 1.0}, r"`param_ratio` must be a float in \(0, 1\), got 1.0"),
        ({"target_speedup": 1.0}, r"`target_speedup` must be a number > 1, got 1.0"),
        ({"max_accuracy_drop": -0.5}, r"`max_accuracy_drop` must be a positive number of points, got -0.5"),
        ({"max_accuracy_drop": 1.0, "heldout_samples": 0}, r"`heldout_samples` must be >= 1 with `max_accuracy_drop`"),
        (
            {"max_accuracy_drop": 1.0, "screening_samples": 0},
            r"`screening_samples` must be an int >= 1 or None, got 0",
        ),
        ({"max_accuracy_drop": 1.0, "safety_margin": -1.0}, r"`safety_margin` must be a number >= 0"),
        ({"max_accuracy_drop": 1.0, "refine_steps": -1}, r"`refine_steps` must be an int >= 0 or None, got -1"),
        (
            {"max_accuracy_drop": 1.0, "screening_dtype": "int8"},
            r"`screening_dtype` must be one of \['float32', 'bfloat16', 'float16'\].*got 'int8'",
        ),
        ({"rank": 4, "bias_correction": "yes"}, r"`bias_correction` must be True or False, got 'yes'"),
        ({"rank": 4, "method": "svd", "bias_correction": True}, r"`bias_correction=True` needs `method='drone'`"),
        ({"rank": 4, "num_calibration_samples": 0}, r"`num_calibration_samples` must be an int >= 1, got 0"),
        ({"rank": 4, "calibration_batch_size": 0}, r"`calibration_batch_size` must be an int >= 1"),
        ({"rank": 4, "seed": -1}, r"`seed` must be an int >= 0"),
        ({"ranks": "{not json"}, r"`ranks` must be a mapping or a JSON object string"),
        ({"ranks": {"re:.*": 0}}, r"`ranks` maps module names to positive ints"),
        ({"rank": 4, "target_modules": [3]}, r"`target_modules` must be a list of strings"),
    ],
)
def test_compression_arguments_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DroneCompressionArguments(**kwargs)


def test_compression_arguments_defaults_and_kwargs():
    args = DroneCompressionArguments(ranks='{"re:.*intermediate.*": 8}', attention_rank=2, target_modules="query")
    assert args.ranks == {"re:.*intermediate.*": 8} and args.target_modules == ["query"]
    assert (args.num_calibration_samples, args.heldout_samples, args.seed) == (512, 2048, 0)
    kwargs = args.compress_kwargs()
    assert kwargs == {
        "method": "drone",
        "target_modules": ["query"],
        "rank": None,
        "ranks": {"re:.*intermediate.*": 8},
        "param_ratio": None,
        "attention_rank": 2,
        "max_accuracy_drop": None,
        "target_speedup": None,
    }
    assert DroneCompressionArguments(target_speedup=1.5, attention=False).compress_kwargs()["attention"] is False
    assert DroneCompressionArguments(rank=4, bias_correction=True).compress_kwargs()["bias_correction"] is True


def test_accuracy_budget_kwargs_carry_the_search_options_and_the_task_metric():
    args = DroneCompressionArguments(max_accuracy_drop=1.0, screening_samples=64, safety_margin=0.5, refine_steps=3)
    assert args.compress_kwargs()["allocation_options"] == {
        "screening_samples": 64,
        "safety_margin": 0.5,
        "refine_steps": 3,
        "search": "exhaustive",
    }
    assert "screening_dtype" not in args.compress_kwargs()["allocation_options"]  # the model's own dtype
    # No screening_samples given: the search's own default ("auto"), not one number for both searches.
    default = DroneCompressionArguments(max_accuracy_drop=1.0, allocation_search="fast").compress_kwargs()
    assert default["allocation_options"]["screening_samples"] == "auto"
    for dtype in ("bfloat16", torch.bfloat16):
        bf16 = DroneCompressionArguments(max_accuracy_drop=1.0, screening_dtype=dtype)
        assert bf16.screening_dtype == "bfloat16"  # stored by name: the arguments stay JSON-serialisable
        assert bf16.compress_kwargs()["allocation_options"]["screening_dtype"] == "bfloat16"
    metric = args.compress_kwargs("cola")["allocation_options"]["metric_fn"]
    logits, labels = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], [0, 1, 1, 0]
    # CoLA's Matthews correlation, not accuracy (75): tp=2, tn=1, fp=1, fn=0 -> (2*1 - 1*0) / sqrt(3*2*1*2).
    assert metric(logits, labels) == pytest.approx(100 * 2 / 12**0.5)


def test_compression_arguments_parse_from_the_command_line():
    (args,) = HfArgumentParser(DroneCompressionArguments).parse_args_into_dataclasses(
        ["--ranks", '{"re:.*": 8}', "--target_modules", "query", "value", "--num_calibration_samples", "64"]
    )
    assert args.ranks == {"re:.*": 8} and args.target_modules == ["query", "value"]
    assert args.num_calibration_samples == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 32}, r"Rank for `bert.encoder.layer.0.attention.self.query` \(32x32\) must be an int in \[1, 31\]"),
        ({"rank": 4, "target_modules": ["ffn"]}, r"Unknown target module `ffn`"),
        ({"ranks": {"bert.encoder.layer.7.output.dense": 4}}, r"Unknown module in `ranks`"),
        ({"attention_rank": 8}, r"attention"),  # d_h = 8: rank must be < 8
        ({"rank": 18}, r"Every target would stay dense"),  # break-evens: 15 (32x32), 17 (37x32)
        ({"param_ratio": 0.01}, r"`param_ratio=0.01` cannot be met"),
        ({"target_speedup": 50.0}, r"`target_speedup=50.0` cannot be met"),
    ],
)
def test_validate_for_model_rejects_what_would_fail_after_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DroneCompressionArguments(**kwargs).validate_for_model(tiny_teacher())


def test_validate_for_model_accepts_feasible_settings_and_leaves_the_model_alone():
    model = tiny_teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs in (
        {"rank": 4},
        {"attention_rank": 2, "rank": 4},
        {"param_ratio": 0.5},
        {"target_speedup": 1.3},
        {"max_accuracy_drop": 1.0},
    ):
        DroneCompressionArguments(**kwargs).validate_for_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_validate_for_model_rejects_an_unsupported_family():
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2'.*supported: \[.*'bert'"):
        DroneCompressionArguments(rank=4).validate_for_model(unsupported_classifier())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha_hidden": -1.0}, r"`alpha_hidden` must be a finite number >= 0, got -1.0"),
        ({"alpha_kl": float("nan")}, r"`alpha_kl` must be a finite number >= 0"),
        ({"alpha_hidden": 0.0, "alpha_kl": 0.0, "alpha_task": 0.0}, r"At least one of"),
        ({"temperature": 0.0}, r"`temperature` must be a number > 0, got 0.0"),
        ({"learning_rate": -1e-5}, r"`learning_rate` must be a number > 0"),
        ({"hidden_layers": "last"}, r"`hidden_layers` must be 'all' or a list of ints, got 'last'"),
        ({"hidden_layers": []}, r"`hidden_layers` must be 'all' or a non-empty list"),
        ({"hidden_layers": [0, -1]}, r"`hidden_layers` must be 'all' or a non-empty list of ints >= 0"),
        ({"max_steps": 0}, r"`max_steps` must be an int >= 1, got 0"),
        ({"per_device_train_batch_size": 0}, r"`per_device_train_batch_size` must be an int >= 1"),
        ({"gradient_accumulation_steps": 0}, r"`gradient_accumulation_steps` must be an int >= 1, got 0\."),
        ({"gradient_accumulation_steps": 2.5}, r"`gradient_accumulation_steps` must be an int >= 1, got 2\.5\."),
        ({"warmup_steps": -0.1}, r"`warmup_steps` must be a finite number >= 0"),
    ],
)
def test_distillation_arguments_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DroneDistillationArguments(**kwargs)


def test_distillation_arguments_split_into_loss_and_schedule():
    args = DroneDistillationArguments(alpha_task=0.5, hidden_layers=[2, 0, 2], max_steps=7)
    assert args.hidden_layers == [0, 2]
    assert args.loss_kwargs() == {
        "alpha_hidden": 1.0,
        "alpha_kl": 1.0,
        "alpha_task": 0.5,
        "temperature": 2.0,
        "hidden_layers": [0, 2],
    }
    overrides = args.training_overrides()
    assert overrides["max_steps"] == 7 and overrides["report_to"] == "none"
    assert overrides["gradient_accumulation_steps"] == 1
    assert (
        DroneDistillationArguments(gradient_accumulation_steps=4).training_overrides()["gradient_accumulation_steps"]
        == 4
    )
    assert DroneDistillationArguments(report_to="tensorboard").training_overrides()["report_to"] == "tensorboard"


def test_distillation_arguments_parse_from_the_command_line():
    (args,) = HfArgumentParser(DroneDistillationArguments).parse_args_into_dataclasses(
        ["--hidden_layers", "0", "3", "--alpha_task", "0.25", "--max_steps", "5"]
    )
    assert args.hidden_layers == [0, 3] and args.alpha_task == 0.25 and args.max_steps == 5
    (default,) = HfArgumentParser(DroneDistillationArguments).parse_args_into_dataclasses([])
    assert default.hidden_layers == "all"
