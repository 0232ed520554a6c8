"""`drone-hf compress` / `drone-hf evaluate` end to end on a tiny model, tokenizer and GLUE-layout folder."""

import json
import subprocess
import sys

import pytest
import torch

from drone_hf.cli import main

from .testing_utils import CLI_WORDS, tiny_classifier_folder, unsupported_classifier, write_sst2_glue


WORDS = CLI_WORDS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_classifier_folder(root / "model")
    write_sst2_glue(root / "glue")
    return root


def _speed_setting(folder) -> str:
    """The `setting` of the speed in the model card `drone-hf compress` wrote (its metadata)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data["drone_hf"]["speed"]["setting"]


def _compress(workspace, out, *budget, extra=()):
    return main(
        [
            "compress",
            "--model",
            str(workspace / "model"),
            "--task",
            "SST-2",
            "--data-dir",
            str(workspace / "glue"),
            "--calibration-samples",
            "32",
            "--heldout-samples",
            "32",
            "--latency-repeats",
            "2",
            "--output",
            str(out),
            *budget,
            *extra,
        ]
    )


def test_compress_with_rank_saves_a_reloadable_model_and_prints_the_table(workspace, tmp_path, capsys):
    assert _compress(workspace, tmp_path / "out", "--rank", "8") == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "FLOP bound" in printed and "| dense |" in printed and "| drone |" in printed
    from transformers import AutoModelForSequenceClassification

    import drone_hf  # noqa: F401

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert set(reloaded.config.drone_ranks.values()) == {8}
    summary = json.loads((tmp_path / "out" / "drone_results.json").read_text())
    assert summary["results"]["drone"]["flop_bound"] > 1.0 and summary["budget"] == {"rank": 8}
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "vocab.txt").is_file()
    setting = _speed_setting(tmp_path / "out")
    assert setting.startswith("batch 8 x ") and "tokens, float32," in setting and "compressed in" not in setting


def test_compress_with_target_speedup_factors_attention(workspace, tmp_path):
    assert _compress(workspace, tmp_path / "out", "--target-speedup", "1.5", extra=["--method", "svd"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["drone_attention_ranks"] and config["drone_method"] == "svd"
    assert json.loads((tmp_path / "out" / "drone_results.json").read_text())["results"]["svd"]["flop_bound"] >= 1.5


@pytest.mark.parametrize("search", [None, "fast", "exhaustive"])
def test_compress_with_accuracy_budget_reports_allocation(workspace, tmp_path, capsys, search):
    extra = ["--screening-samples", "16", *(["--allocation-search", search] if search else [])]
    assert _compress(workspace, tmp_path / "out", "--max-accuracy-drop", "100", extra=extra) == 0
    out = capsys.readouterr().out
    assert "screening / 32 joint-check train rows)" in out
    allocation = json.loads((tmp_path / "out" / "drone_results.json").read_text())["allocation"]
    assert allocation["evaluations"] > 0 and allocation["heldout_drop"] + allocation["heldout_standard_error"] <= 100
    assert allocation["search"] == (search or "exhaustive") and allocation["seconds"] > 0
    assert f"Allocation ({search or 'exhaustive'} search): " in out
    assert ("probes" in allocation) == (allocation["search"] == "fast") != ("curves" in allocation)


def test_compress_screens_in_bfloat16_when_asked(workspace, tmp_path, capsys):
    extra = ["--screening-samples", "16", "--allocation-search", "fast", "--screening-dtype", "bfloat16"]
    assert _compress(workspace, tmp_path / "out", "--max-accuracy-drop", "100", extra=extra) == 0
    assert "screening in bfloat16 / 32 joint-check train rows)" in capsys.readouterr().out
    allocation = json.loads((tmp_path / "out" / "drone_results.json").read_text())["allocation"]
    assert allocation["screening_dtype"] == "bfloat16" and allocation["heldout_drop"] <= 100


def test_compress_refuses_an_unknown_allocation_search(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _compress(workspace, tmp_path / "out", "--max-accuracy-drop", "100", extra=["--allocation-search", "quick"])
    assert "argument --allocation-search: invalid choice: 'quick'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate(workspace, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(workspace / "model"),
                "--task",
                "sst2",
                "--data-dir",
                str(workspace / "glue"),
                "--latency-repeats",
                "2",
            ]
        )
        == 0
    )
    assert "accuracy" in capsys.readouterr().out


def test_unknown_task_and_missing_folder_exit_with_usage_error(workspace, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--model", str(workspace / "model"), "--task", "imdb"])
    assert info.value.code == 2 and "Unknown GLUE task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(workspace / "model"), "--task", "sst2", "--data-dir", "/nonexistent"])
    assert "is not a folder" in capsys.readouterr().err


def test_an_unsupported_family(workspace, tmp_path, capsys):
    unsupported_classifier().save_pretrained(tmp_path / "gpt2")
    code = main(
        ["evaluate", "--model", str(tmp_path / "gpt2"), "--task", "sst2", "--data-dir", str(workspace / "glue")]
    )
    assert code == 2 and "does not support model_type 'gpt2'" in capsys.readouterr().err


def test_wrong_num_labels(workspace, capsys):
    code = main(
        ["evaluate", "--model", str(workspace / "model"), "--task", "mnli", "--data-dir", str(workspace / "glue")]
    )
    assert code == 2 and "num_labels=2 but task mnli has 3" in capsys.readouterr().err


def test_impossible_budget(workspace, tmp_path, capsys):
    assert _compress(workspace, tmp_path / "out", "--target-speedup", "1000") == 2
    assert "cannot be met" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_console_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "drone_hf.cli", "compress", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--max-accuracy-drop" in result.stdout and "--target-speedup" in result.stdout


def test_small_train_split_clips_the_held_out_rows(workspace, tmp_path, capsys):
    extra = ["--calibration-samples", "8", "--heldout-samples", "1000"]
    assert _compress(workspace, tmp_path / "out", "--max-accuracy-drop", "100", extra=extra) == 0
    assert "holding out the 72 after the calibration rows" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "drone_results.json").read_text())["allocation"]["heldout_examples"] == 72
    extra = ["--calibration-samples", "40", "--heldout-samples", "1000"]
    assert _compress(workspace, tmp_path / "out2", "--max-accuracy-drop", "100", extra=extra) == 2
    assert "needs at least 64 held-out rows" in capsys.readouterr().err


def test_the_default_method_is_defined_once_and_bias_correction_selects_drone_bc():
    from drone_hf.arguments import DroneCompressionArguments
    from drone_hf.cli import _parser
    from drone_hf.methods import DEFAULT_METHOD, resolve_method

    base = ["compress", "--model", "m", "--task", "sst2", "--rank", "8", "--output", "o"]
    args = _parser().parse_args(base)
    assert args.method == DEFAULT_METHOD == DroneCompressionArguments(rank=4).method
    assert args.bias_correction is None
    assert _parser().parse_args([*base, "--method", "drone-bc"]).method == "drone-bc"
    flag = _parser().parse_args([*base, "--bias-correction"])
    assert resolve_method(flag.method, flag.bias_correction) == "drone-bc"


@pytest.mark.parametrize(
    "budget, form, dense_row",
    [
        (["--target-speedup", "1.2"], ["--dtype", "bfloat16"], "dense-bfloat16"),
        (["--rank", "8"], ["--quantize", "int8"], "dense-int8"),
    ],
)
def test_compress_in_a_deployment_form_saves_it_and_times_dense_in_it_too(
    workspace, tmp_path, capsys, budget, form, dense_row
):
    code = _compress(workspace, tmp_path / "out", *budget, extra=form)
    if code == 2:  # the budget is measured in bfloat16: on some machines no factored pair of these tiny shapes pays,
        # or too few pay to reach the target (an AVX2-only CPU without bf16 units); either refusal names the form
        assert "faster than the dense module in this deployment form (seconds measured in bfloat16" in (
            capsys.readouterr().err
        )
        return
    assert code == 0
    from transformers import AutoModelForSequenceClassification

    import drone_hf  # noqa: F401

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "drone_results.json").read_text())
    assert set(summary["results"]) == {"dense", dense_row, "drone"}
    if form[0] == "--dtype":
        assert reloaded.dtype == torch.bfloat16 and summary["dtype"] == "bfloat16"
        assert summary["allocation"]["kernel_costs"]["description"].startswith("seconds measured in bfloat16")
    else:
        assert reloaded.config.drone_quantization["method"] == "int8-dynamic" and summary["quantize"] == "int8"
    form = "bfloat16" if form[0] == "--dtype" else "int8 dynamic (float32 activations)"
    assert f"tokens, compressed in {form}, dense in float32," in _speed_setting(tmp_path / "out")


def test_the_card_speed_names_the_deployment_form_timed(workspace, tmp_path):
    """`--rank` (no kernel timing, so no budget that can fail) with `--dtype bfloat16`: the compressed model is timed
    in bfloat16 against dense float32, and the card's speed setting says so rather than "fp32"."""
    assert _compress(workspace, tmp_path / "out", "--rank", "8", extra=["--dtype", "bfloat16"]) == 0
    setting = _speed_setting(tmp_path / "out")
    assert "tokens, compressed in bfloat16, dense in float32," in setting and "fp32" not in setting
    body = (tmp_path / "out" / "README.md").read_text().split("\n---\n", 1)[1]  # the text after the metadata
    assert f"({setting})" in body


def test_compress_refuses_an_unknown_dtype(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _compress(workspace, tmp_path / "out", "--rank", "8", extra=["--dtype", "int4"])
    assert "argument --dtype: invalid choice: 'int4'" in capsys.readouterr().err
