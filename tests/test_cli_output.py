"""What `drone-hf` tells a new user: the card holds what the command measured, label names, `evaluate --baseline`,
`--version` / `--help` without torch, the extra a core install lacks, the offline hints, and a push without network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from drone_hf.cli import main

from .testing_utils import random_sentences, tiny_classifier_folder


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_output")
    tiny_classifier_folder(root / "model")
    glue = root / "glue" / "SST-2"
    glue.mkdir(parents=True)
    for split, count in (("train", 64), ("dev", 16)):
        lines = [f"{text} \t{i % 2}" for i, text in enumerate(random_sentences(count, seed=len(split)))]
        (glue / f"{split}.tsv").write_text("\n".join(["sentence\tlabel", *lines]) + "\n")
    return root


def _glue_args(workspace, *extra):
    return ["--model", str(workspace / "model"), "--task", "sst2", "--data-dir", str(workspace / "glue"), *extra]


@pytest.fixture(scope="module")
def compressed(workspace, tmp_path_factory):
    """`drone-hf compress` once: its folder, exit code and what it printed."""
    out = tmp_path_factory.mktemp("compressed") / "sst2-drone"
    args = ["compress", *_glue_args(workspace), "--rank", "8", "--calibration-samples", "32"]
    args += ["--latency-repeats", "3", "--base-model", "me/tiny-sst2", "--output", str(out)]
    return out, main(args)


def test_the_card_says_what_the_command_measured(compressed):
    out, code = compressed
    assert code == 0
    card = ModelCard.load(out / "README.md")
    summary = json.loads((out / "drone_results.json").read_text())
    assert card.data.base_model == "me/tiny-sst2" and card.data.datasets == ["nyu-mll/glue"]
    measured = {f"{name} ({variant})": value for variant, key in (("dense", "dense"), ("compressed", "drone"))
                for name, value in summary["results"][key]["metrics"].items()}  # fmt: skip
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == pytest.approx(measured, abs=1e-6)
    assert card.data.model_name == "sst2-drone" and "## Evaluation" in card.text
    assert "No speed-up was measured" not in card.text
    drone, speed = summary["results"]["drone"], card.data["drone_hf"]["speed"]
    assert speed["speedup"] == pytest.approx(drone["speedup"]) and speed["flop_bound"] == pytest.approx(
        drone["flop_bound"]
    )
    if drone["published"]:  # the card quotes what the terminal printed ...
        assert f"**{drone['speedup']:.2f}×** wall-clock ({drone['cpu_speedup']:.2f}× in CPU time)" in card.text
    else:  # ... or says why it does not
        assert speed["withheld"] == "; ".join(drone["flags"]) and "no speed-up is\nquoted" in card.text
    assert set(summary["timing"]) == {"load_average", "threads", "repeats", "cpu_count"}


def test_label_names_reach_the_config_and_pipelines(compressed):
    from transformers import pipeline

    out, _ = compressed
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    classifier = pipeline("text-classification", model=str(out))
    assert classifier("good movie")[0]["label"] in {"negative", "positive"}


def test_push_to_hub_sends_the_same_card(workspace, compressed, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from .test_hub import _FakeHub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the CLI refuses --push-to-hub offline, before any work
    monkeypatch.setenv("HF_TOKEN", "hf_fake")

    out, _ = compressed
    args = ["compress", *_glue_args(workspace), "--rank", "8", "--calibration-samples", "32", "--latency-repeats", "2"]
    with _FakeHub() as hub:
        assert main([*args, "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny-sst2-drone"]) == 0
    (upload,) = hub.uploads
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.base_model is None  # --model is a local folder and no --base-model was given
    assert {r.metric_name for r in card.data.eval_results} == {"accuracy (dense)", "accuracy (compressed)"}
    assert 'from_pretrained("me/tiny-sst2-drone")' in card.text


def test_a_push_without_network_says_what_to_do(workspace, tmp_path, capsys, monkeypatch):
    import httpx
    from huggingface_hub import HfApi, constants

    args = ["compress", *_glue_args(workspace), "--rank", "8", "--calibration-samples", "32", "--latency-repeats", "2"]
    # Offline mode on: refused before any work, nothing written.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main([*args, "--output", str(tmp_path / "first"), "--push-to-hub", "me/tiny-sst2-drone"]) == 2
    err = capsys.readouterr().err
    assert "offline mode is on (HF_HUB_OFFLINE)" in err and "Loading" not in err and not (tmp_path / "first").exists()
    # Online but the network is down: the output is saved, the upload fails with what to do.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: (_ for _ in ()).throw(httpx.ConnectError("no route")))
    code = main([*args, "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny-sst2-drone"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "Could not reach the Hugging Face Hub to push 'me/tiny-sst2-drone'" in err
    assert f"saved in {tmp_path / 'out'}; once the Hub is reachable" in err
    assert f"hf upload me/tiny-sst2-drone {tmp_path / 'out'}" in err and (tmp_path / "out" / "README.md").is_file()


def test_push_network_errors_are_wrapped(tmp_path):
    import httpx
    from huggingface_hub import HfApi

    from drone_hf import compress_model, push_compressed_to_hub

    from .testing_utils import tiny_teacher

    small = compress_model(tiny_teacher(), None, method="svd", rank=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", lambda *a, **k: (_ for _ in ()).throw(httpx.ConnectError("no route")))
        with pytest.raises(ConnectionError, match=r"Could not reach the Hugging Face Hub.*ConnectError: no route"):
            push_compressed_to_hub(small, "me/x")


def test_an_unknown_method_or_thread_count_fails_before_any_model_loads(workspace, capsys):
    code = main(["compress", *_glue_args(workspace), "--rank", "8", "--method", "drone-x", "--output", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and "`--method` 'drone-x' is not a factorisation method" in err and "Loading" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: the flag is refused while parsing, before any import
        main(["evaluate", *_glue_args(workspace), "--threads", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --threads: must be an integer >= 1, got 0" in err


def test_evaluate_alone_prints_no_speed_columns(workspace, capsys):
    assert main(["evaluate", *_glue_args(workspace), "--latency-repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "latency ms |" in out and "speed-up" not in out and "FLOP bound" not in out


def test_evaluate_against_a_baseline(workspace, compressed, capsys):
    out, _ = compressed
    args = ["evaluate", *_glue_args(workspace)[2:], "--model", str(out), "--baseline", str(workspace / "model")]
    assert main([*args, "--latency-repeats", "3", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| speed-up | CPU-time ratio | FLOP bound |" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| model |") or line.startswith("| sst2-drone |")]
    baseline, model = rows[-2:] if len(rows) > 2 else rows
    assert baseline.startswith("| model |") and baseline.endswith("1.00x | 1.00x | 1.00x |")
    assert float(model.split("|")[-2].strip().rstrip("x")) > 1.0  # the FLOP bound against the dense baseline
    assert "Timing: 3 rounds, order shuffled every round, 1 thread, load average" in printed


# ------------------------------------------------------------------------------------------- first contact
def _run(*args, code=None, env=None):
    command = [sys.executable, *(["-c", code] if code else []), *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, cwd=REPO)


def test_version_and_help_answer_without_torch():
    import drone_hf

    result = _run("-X", "importtime", "-m", "drone_hf", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"drone-hf {drone_hf.__version__}"
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {"torch", "transformers", "numpy"} & imported
    result = _run("-X", "importtime", "-m", "drone_hf", "compress", "--help")
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert result.returncode == 0 and "--train-file" in result.stdout and "torch" not in imported


def test_a_core_install_names_the_missing_extra(workspace, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood movie,1\nbad plot,0\n")
    blocked = "import sys\nfor name in ('datasets', 'pandas', 'sklearn', 'scipy'):\n    sys.modules[name] = None\n"
    run = "from drone_hf.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    args = ["compress", "--model", str(workspace / "model"), "--train-file", str(tmp_path / "train.csv")]
    args += ["--validation-file", str(tmp_path / "train.csv"), "--rank", "8", "--output", str(tmp_path / "out")]
    result = _run(*args, code=blocked + run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line == (
        "drone-hf compress: error: `datasets` is not installed; it comes with the `glue` extra: "
        "pip install -e '.[glue]' in your drone_hf clone."
    )


def test_the_offline_hint_reaches_the_terminal(workspace, capsys):
    code = main(["evaluate", "--model", str(workspace / "model"), "--task", "sst2", "--latency-repeats", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Offline, pass `data_dir=` (`--data-dir` on the command line)" in err


# ------------------------------------------------------------------------------------------------- no silent phase
@pytest.mark.parametrize(
    "budget, bars",
    [
        (["--target-speedup", "1.5"], ["Spectra", "Factorising"]),
        (["--max-accuracy-drop", "100", "--heldout-samples", "32", "--screening-samples", "16"],
         ["Allocating ranks", "Joint checks", "Factorising"]),
    ],
)  # fmt: skip
def test_every_phase_has_a_bar_with_a_total_or_a_line(workspace, tmp_path, capsys, budget, bars):
    args = ["compress", *_glue_args(workspace), *budget, "--calibration-samples", "32", "--latency-repeats", "2"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    for bar in ["Calibrating", *bars, "Evaluating dense", "Evaluating drone", "Timing"]:
        finished = [part for part in err.split("\r") if part.startswith(f"{bar}: 100%|")]
        assert finished and all("?" not in part.split("|")[2].split("[")[0] for part in finished), bar  # n/total
    for line in [
        "Loading",
        "Calibrating on 32 training rows",
        "Allocating ranks for",
        "Evaluating dense and",
        "Saving",
    ]:
        assert f"drone-hf: {line}" in err


def test_progress_follows_transformers_switches(workspace, tmp_path, capsys, monkeypatch):
    from transformers.utils import logging

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "warning")
    logging.disable_progress_bar()
    try:
        args = ["compress", *_glue_args(workspace), "--target-speedup", "1.5", "--calibration-samples", "32"]
        assert main([*args, "--latency-repeats", "2", "--output", str(tmp_path / "out")]) == 0
    finally:
        logging.enable_progress_bar()
    err = capsys.readouterr().err
    assert "drone-hf: " not in err and "Calibrating" not in err and "Spectra" not in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["python", "/venv/bin/drone-hf", "--help"], True),
        (["python", "-m", "drone_hf", "--help"], True),
        (["python", "-X", "importtime", "-mdrone_hf.cli"], True),
        (["python", "-m", "pytest", "-m", "drone_hf"], False),
        (["python", "script.py", "-m", "drone_hf"], False),
        (["python", "-c", "import drone_hf", "-m", "drone_hf"], False),
    ],
)
def test_only_the_command_defers_the_library(monkeypatch, argv, expected):
    import drone_hf

    monkeypatch.setattr(sys, "orig_argv", argv)
    monkeypatch.setattr(sys, "argv", argv[1:])
    assert drone_hf._started_as_command() is expected


def test_the_openmp_wait_policy_is_set_only_before_torch():
    # As in `python -m drone_hf`, where the package is imported without torch (see drone_hf._started_as_command).
    code = "import os, sys{}\nsys.orig_argv = ['python', '-m', 'drone_hf']\n"
    code += "from drone_hf.cli_setup import set_openmp_wait_policy\nset_openmp_wait_policy()\n"
    code += "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    run = lambda source: subprocess.run(  # noqa: E731
        [sys.executable, "-c", source], capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}
    )
    assert run(code.format("")).stdout.strip() == "PASSIVE False"
    assert run(code.format(", torch")).stdout.strip() == "None True"  # too late: libgomp has read it already
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert run(code.format("")).stdout.strip() == "ACTIVE False"  # an explicit choice wins
