"""Hostile-but-realistic use of the `drone-hf` CLI, of saving and of loading, as one probe table.

Each row of `PROBES` is `(probe id, argv or callable, expected outcome, phrase)`:

- argv: the `drone-hf` arguments, with `{model}`, `{glue}`, `{st}`, `{sentences}`, `{ws}` (the shared workspace),
  `{tmp}` (an empty folder of this probe) and `{copy:NAME}` (a fresh copy of `{ws}/NAME` in `{tmp}`) filled in;
  `compress(...)`, `evaluate(...)` and `embed(...)` give a working command that the extra arguments override.
- callable: `fn(ws, tmp)`; what it returns is the outcome's message.
- expected outcome: `"ok"` (exit code 0, or the callable returned), `"error"` (exit code 2 with a message on stderr,
  or argparse's usage error) or, for a callable, the exception type it must raise.
- phrase: a string the message (stderr, the exception, or what the callable returned) must contain.

On top of its own row, every probe is checked for the invariant that matters most: the shared inputs (models,
data, earlier outputs) are left exactly as they were, and a probe that fails leaves its `{tmp}` as it was (an
`--output` it refused is not created). A successful `--output` must hold a whole drone-hf output.

Adding a probe is adding a line. `python -m tests.test_adversarial_cli` prints every probe's outcome, classified as
correct / clear error / unclear error / deep crash / silent (a wrong or surprising result without a word).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import drone_hf
from drone_hf.architecture import supported_model_types
from drone_hf.cli import main

from .testing_utils import CLI_WORDS, cli_tokenizer, tiny_classifier_folder, write_sst2_glue


SOURCE = Path(drone_hf.__file__).resolve().parents[1]  # the drone_hf under test, for the fresh interpreters
WORDS = CLI_WORDS


AUTO, STOCK = "AutoModelForSequenceClassification", "BertForSequenceClassification"
FAMILIES = supported_model_types()


class Silent(Exception):
    """Raised by a probe's callable when the call "worked" but left a wrong or surprising result."""


class ChildError(Exception):
    """A probe run in a fresh interpreter failed; the message is the end of its stderr."""


# ------------------------------------------------------------------------------------------------- workspace


def build_workspace(root: Path) -> SimpleNamespace:
    """Tiny models, data and an earlier output in `root` (created), shared by all probes (which must not change them;
    a probe that does is reported, and the inputs are restored from a copy beside `root`)."""
    root.mkdir(parents=True)
    tokenizer = cli_tokenizer()
    classifier = tiny_classifier_folder
    classifier(root / "model")
    classifier(root / "my model")  # a path with a space
    classifier(root / "three_labels", num_labels=3)
    classifier(root / "short", positions=16)  # max_position_embeddings below the CLI's default --max-length
    classifier(root / "no_tokenizer", with_tokenizer=False)
    classifier(root / "runs" / "dense")  # a model inside a folder that a careless --output names
    classifier(root / "foreign")  # somebody else's model, not drone-hf's output
    (root / "foreign" / "notes.txt").write_text("my notes\n")
    (root / "model-link").symlink_to(root / "model")
    (root / "file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    write_sst2_glue(root / "glue")
    (root / "glue_header_only" / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "glue_header_only" / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n")
    (root / "glue_no_label" / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "glue_no_label" / "SST-2" / f"{split}.tsv").write_text("sentence\nthe movie\na plot\n")
    ws = SimpleNamespace(root=root, model=root / "model", glue=root / "glue")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main([*(_fill(a, ws, root) for a in compress(output=str(root / "previous")))])
    assert code == 0, "could not make the earlier output"
    teacher = BertForSequenceClassification.from_pretrained(root / "model")
    drone_hf.compress_model(teacher, None, method="svd", rank=4).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    _build_sentence_transformer(root)
    ws.pristine = root.parent / f"{root.name}-pristine"
    shutil.copytree(root, ws.pristine, symlinks=True)
    return ws


def _build_sentence_transformer(root: Path) -> None:
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        return
    transformer = Transformer(str(root / "model"), max_seq_length=32)
    SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()]).save(str(root / "st"))
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(160)]
    (root / "sentences.txt").write_text("\n".join(lines) + "\n")
    (root / "st-link").symlink_to(root / "st")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main([_fill(arg, SimpleNamespace(root=root), root) for arg in embed(output=str(root / "previous_st"))])
    assert code == 0, "could not make the earlier sentence-transformers output"


def _fill(arg: str, ws: SimpleNamespace, tmp: Path) -> str:
    if arg.startswith("{copy:"):
        name = arg[len("{copy:") : arg.index("}")]
        target = tmp / name
        if not target.exists():
            shutil.copytree(ws.root / name, target, symlinks=True)
        return str(target) + arg[arg.index("}") + 1 :]
    return arg.format(
        ws=ws.root,
        tmp=tmp,
        model=ws.root / "model",
        glue=ws.root / "glue",
        st=ws.root / "st",
        sentences=ws.root / "sentences.txt",
    )


# ----------------------------------------------------------------------------------------------- commands


def compress(*extra: str, budget=("--rank", "8"), output: str = "{tmp}/out", model: str = "{model}") -> tuple:
    """A working `drone-hf compress` command on the tiny model; `extra` arguments override (argparse: last wins)."""
    return (
        "compress", "--model", model, "--task", "sst2", "--data-dir", "{glue}", "--calibration-samples", "32",
        "--heldout-samples", "64", "--screening-samples", "16", "--refine-steps", "2", "--latency-repeats", "1",
        "--output", output, *budget, *extra,
    )  # fmt: skip


def evaluate(*extra: str, model: str = "{model}") -> tuple:
    return ("evaluate", "--model", model, "--task", "sst2", "--data-dir", "{glue}", "--latency-repeats", "1", *extra)


def embed(*extra: str, budget=("--rank", "8"), output: str = "{tmp}/out", model: str = "{st}") -> tuple:
    """A working `drone-hf compress-embeddings` command on the tiny sentence-transformers model."""
    return (
        "compress-embeddings", "--model", model, "--sentences", "{sentences}", "--latency-repeats", "1",
        "--refine-steps", "2", "--output", output, *budget, *extra,
    )  # fmt: skip


def export(*extra: str, output: str = "{tmp}/out", model: str = "{model}") -> tuple:
    """A working `drone-hf export --onnx` command on the tiny model; `extra` arguments override."""
    return ("export", "--model", model, "--onnx", "--output", output, *extra)


# Flags that take a count or an amount, with values that must be refused (each probe must name the flag).
COMPRESS_NUMBERS = {
    "--calibration-samples": ("0", "-1"),
    "--heldout-samples": ("0", "-1"),
    "--screening-samples": ("0", "-1"),
    "--refine-steps": ("-1",),
    "--safety-margin": ("-1", "nan"),
    "--latency-repeats": ("0", "-1"),
    "--batch-size": ("0", "-1"),
    "--max-eval-samples": ("0", "-1"),
    "--max-length": ("0", "-1"),
    "--seed": ("-1",),
}
BUDGETS = {
    "--rank": ("0", "-1"),
    "--target-speedup": ("0", "-1", "0.5", "nan", "inf"),
    "--param-ratio": ("0", "-1", "1.5", "nan"),
    "--max-accuracy-drop": ("-1", "nan"),
}
EMBED_NUMBERS = {
    "--batch-size": ("0", "-1"),
    "--latency-repeats": ("0", "-1"),
    "--refine-steps": ("-1",),
    "--safety-margin": ("-1",),
}
EMBED_BUDGETS = {
    "--rank": ("0", "-1"),
    "--target-speedup": ("0", "0.5"),
    "--param-ratio": ("0", "1.5"),
    "--min-cosine-similarity": ("1.5", "-2", "nan"),
}


# ------------------------------------------------------------------------------------------ callable probes


def _run_child(code: str, tmp: Path, without_drone_hf: bool) -> str:
    """Runs `code` in a fresh interpreter (with drone_hf unimportable when asked); raises `ChildError` on failure."""
    guard = "import sys\nsys.modules['drone_hf'] = None\n" if without_drone_hf else ""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "" if without_drone_hf else str(SOURCE),
    }
    result = subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=tmp
    )
    if result.returncode != 0:
        raise ChildError(result.stderr[-2000:])
    return result.stdout


def stock_class_load(cls: type) -> Callable:
    def probe(ws, tmp):
        model = cls.from_pretrained(ws.root / "ckpt")
        raise Silent(f"{type(model).__name__} loaded the drone_hf checkpoint with its factored layers re-initialised")

    return probe


def stock_family_load(model_type: str) -> Callable:
    """The family's stock bare-encoder class on a DRONE checkpoint of that family."""

    def probe(ws, tmp):
        from transformers import AutoModel

        from .testing_utils import tiny_config

        torch.manual_seed(0)
        dense = AutoModel.from_config(tiny_config(model_type)).eval()
        drone_hf.compress_model(dense, None, method="svd", rank=4).save_pretrained(tmp / "ckpt")
        model = type(dense).from_pretrained(tmp / "ckpt")
        raise Silent(f"{type(model).__name__} loaded the {model_type} DRONE checkpoint with random factored layers")

    return probe


def stock_class_load_without_drone_hf(ws, tmp):
    _run_child(
        f"""
        from transformers import BertForSequenceClassification
        BertForSequenceClassification.from_pretrained({str(ws.root / "ckpt")!r})
        """,
        tmp,
        without_drone_hf=True,
    )
    raise Silent("BertForSequenceClassification loaded the drone_hf checkpoint without drone_hf")


def auto_load_without_drone_hf(ws, tmp):
    checkpoint = str(ws.root / "ckpt")
    _run_child(f"import transformers as t\nt.{AUTO}.from_pretrained({checkpoint!r})", tmp, without_drone_hf=True)
    raise Silent("loaded without drone_hf")


def load_with(**kwargs) -> Callable:
    def probe(ws, tmp):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(ws.root / "ckpt", **kwargs)
        return f"num_labels={model.config.num_labels} classifier={tuple(model.classifier.weight.shape)}"

    return probe


def _killed_swap(ws, tmp: Path) -> Path:
    """A copy of the compressed checkpoint over which a save of another rank was killed (SIGKILL) while it moved the
    new files in (made once, beside the workspace, then copied)."""
    made = ws.root.parent / f"{ws.root.name}-killed-swap"
    if not made.exists():
        shutil.copytree(ws.root / "ckpt", made)
        code = f"""
            import os, signal
            import drone_hf
            from drone_hf import saving
            from transformers import BertForSequenceClassification
            teacher = BertForSequenceClassification.from_pretrained({str(ws.model)!r})
            model = drone_hf.compress_model(teacher, None, method="svd", rank=2)
            saving._STEP_HOOK = lambda step: step.startswith("in:") and os.kill(os.getpid(), signal.SIGKILL)
            model.save_pretrained({str(made)!r})
            """
        with contextlib.suppress(ChildError):  # killed, as intended
            _run_child(code, tmp, without_drone_hf=False)
    shutil.copytree(made, tmp / "ckpt", symlinks=True)
    return tmp / "ckpt"


def load_after_a_killed_swap(ws, tmp):
    """The Auto class, with drone_hf, on a folder whose save was killed half way: the new checkpoint, whole."""
    from transformers import AutoModelForSequenceClassification

    target = _killed_swap(ws, tmp)
    model = AutoModelForSequenceClassification.from_pretrained(target)
    ranks = set(model.config.drone_ranks.values())
    if ranks != {2}:
        raise Silent(f"loaded ranks {ranks} after the interrupted save of rank 2")
    return f"loaded the new checkpoint (ranks {ranks}): {sorted(p.name for p in target.iterdir())}"


def killed_swap_without_drone_hf(cls: str) -> Callable:
    """A stock transformers class, without drone_hf, on a folder whose save was killed half way."""

    def probe(ws, tmp):
        target = _killed_swap(ws, tmp)
        _run_child(f"import transformers\ntransformers.{cls}.from_pretrained({str(target)!r})", tmp, True)
        raise Silent(f"{cls} loaded a folder whose save was interrupted")

    return probe


def save_from_inside(kind: str) -> Callable:
    """`save(".")` from inside the target folder, over an earlier save there: the working directory must stay."""

    def probe(ws, tmp):
        target = tmp / "here"
        target.mkdir()
        inode = target.stat().st_ino
        before = os.getcwd()
        os.chdir(target)
        try:
            if kind == "model":
                teacher = BertForSequenceClassification.from_pretrained(ws.model)
                model = drone_hf.compress_model(teacher, None, method="svd", rank=4)
                model.save_pretrained(".")
                model.save_pretrained(".")
            elif kind == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                sentences = (ws.root / "sentences.txt").read_text().splitlines()
                dense = SentenceTransformer(str(ws.root / "st"))
                small = drone_hf.compress_sentence_transformer(dense, sentences, rank=4)
                small.save(".")
                small.save(".")
            else:  # the CLI
                with contextlib.redirect_stdout(io.StringIO()):
                    for _ in range(2):
                        if main([_fill(a, ws, tmp) for a in compress(output=".")]) != 0:
                            raise Silent("the CLI failed to save into '.'")
            cwd_ok = os.getcwd() == str(target) and Path(".").stat().st_ino == inode
            names = sorted(os.listdir("."))
        finally:
            os.chdir(before)
        if not cwd_ok or "config.json" not in names or any(name.startswith(".") for name in names):
            raise Silent(f"working directory moved or folder incomplete: {names}")
        return f"saved into the working directory: {names}"

    return probe


def ctrl_c_over_an_earlier_output(command: Callable, earlier: str) -> Callable:
    """Ctrl-C while the CLI writes its output over an earlier one: the earlier output must stay whole."""

    def probe(ws, tmp):
        return _ctrl_c(command, earlier, ws, tmp)

    return probe


def _ctrl_c(command: Callable, earlier: str, ws, tmp) -> str:
    import drone_hf.cli as cli

    target = Path(_fill(f"{{copy:{earlier}}}", ws, tmp))
    before = _snapshot(target)
    real = cli.write_results

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    cli.write_results = interrupt
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main([_fill(a, ws, tmp) for a in command(budget=("--rank", "4"), output=str(target))])
    except KeyboardInterrupt:
        code = "KeyboardInterrupt"
    finally:
        cli.write_results = real
    after = _snapshot(target)
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    if changed:
        raise Silent(f"interrupted (exit {code}), and the earlier output changed: {changed}")
    return f"exit {code}: {err.getvalue().strip()}"


def card_edits_survive(ws, tmp):
    """A new output into an earlier one merges its card into the earlier `README.md`: the user's notes stay."""
    target = Path(_fill("{copy:previous}", ws, tmp))
    with open(target / "README.md", "a") as card:
        card.write("\n## My notes\n\nkeep me\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main([_fill(a, ws, tmp) for a in compress(budget=("--rank", "4"), output=str(target))])
    card = (target / "README.md").read_text()
    if code != 0 or "keep me" not in card:
        raise Silent(f"exit {code}; the notes added to the earlier card are gone")
    return "the earlier card kept its notes"


# ------------------------------------------------------------------------------------------------- the table


IS_MODEL, IN_MODEL = "is the `--model` folder", "inside the `--model` folder"
HOLDS_MODEL = "inside the `--output` folder"


def numbers(command: Callable, table: dict, budget: bool = False) -> list[tuple]:
    """One probe per impossible value of each numeric flag in `table`; the error must name the flag."""
    rows = []
    for flag, values in table.items():
        for value in values:
            argv = command(budget=(flag, value)) if budget else command(flag, value)
            command_name = {"compress-embeddings": "embed"}.get(argv[0], argv[0])
            rows.append((f"{command_name}/{flag[2:]}={value}", argv, "error", flag))
    return rows


PROBES: list[tuple[str, tuple | Callable, str | type, str]] = [
    # --- data loss and inconsistent folders
    ("compress/output-is-model", compress(output="{model}"), "error", IS_MODEL),
    ("compress/output-is-model-spelled-otherwise", compress(output="{ws}/empty/../model/"), "error", IS_MODEL),
    ("compress/output-is-a-link-to-model", compress(output="{ws}/model-link"), "error", IS_MODEL),
    ("compress/output-inside-model", compress(output="{model}/drone"), "error", IN_MODEL),
    ("compress/model-inside-output", compress(model="{ws}/runs/dense", output="{ws}/runs"), "error", HOLDS_MODEL),
    ("compress/output-is-a-file", compress(output="{ws}/file.txt"), "error", "is a file"),
    ("compress/output-under-a-file", compress(output="{ws}/file.txt/out"), "error", "--output"),
    ("compress/output-not-writable", compress(output="/sys/drone-hf-out"), "error", "--output"),
    ("compress/output-is-someone-elses-model", compress(output="{ws}/foreign"), "error", "--overwrite"),
    ("compress/output-is-someone-elses-model-overwrite", compress("--overwrite", output="{copy:foreign}"), "ok", ""),
    ("compress/output-is-an-earlier-output", compress(output="{copy:previous}"), "ok", ""),
    ("compress/paths-with-spaces", compress(model="{ws}/my model", output="{tmp}/my out"), "ok", ""),
    ("compress/ctrl-c-over-an-earlier-output", ctrl_c_over_an_earlier_output(compress, "previous"), "ok", "left as"),
    ("embed/ctrl-c-over-an-earlier-output", ctrl_c_over_an_earlier_output(embed, "previous_st"), "ok", "left as"),
    ("compress/earlier-output-card-edits-kept", card_edits_survive, "ok", "kept its notes"),
    ("compress/output-dot-from-inside", save_from_inside("cli"), "ok", "config.json"),
    ("save/model-dot-from-inside", save_from_inside("model"), "ok", "config.json"),
    ("save/sentence-transformers-dot-from-inside", save_from_inside("sentence-transformers"), "ok", "config.json"),
    ("load/after-a-killed-swap", load_after_a_killed_swap, "ok", "loaded the new checkpoint"),
    ("load/after-a-killed-swap-auto-no-drone_hf", killed_swap_without_drone_hf(AUTO), ChildError, "interrupted_save"),
    ("load/after-a-killed-swap-stock-no-drone_hf", killed_swap_without_drone_hf(STOCK), ChildError, "recover_inter"),
    ("embed/output-is-model", embed(output="{st}"), "error", IS_MODEL),
    ("embed/output-inside-model", embed(output="{st}/drone"), "error", IN_MODEL),
    ("embed/output-is-a-file", embed(output="{ws}/file.txt"), "error", "is a file"),
    ("embed/output-is-someone-elses-model", embed(output="{ws}/foreign"), "error", "--overwrite"),
    ("embed/output-is-an-earlier-output", embed(output="{copy:previous_st}"), "ok", ""),
    ("embed/output-is-a-link-to-model", embed(output="{ws}/st-link"), "error", IS_MODEL),
    ("compress/output-is-an-earlier-embed-output", compress(output="{copy:previous_st}"), "ok", ""),
    ("compress/output-is-the-data-dir", compress(output="{glue}"), "error", "--overwrite"),
    # --- loading a drone_hf checkpoint the wrong way
    ("load/stock-class", stock_class_load(BertForSequenceClassification), Exception, f"Drone{STOCK}"),
    ("load/stock-bare-encoder", stock_class_load(BertModel), Exception, "import drone_hf"),
    *[(f"load/stock-{family}", stock_family_load(family), Exception, "import drone_hf") for family in FAMILIES],
    ("load/stock-class-without-drone_hf", stock_class_load_without_drone_hf, ChildError, "import drone_hf"),
    ("load/auto-without-drone_hf", auto_load_without_drone_hf, ChildError, "drone_bert"),
    ("load/other-num_labels", load_with(num_labels=5), ValueError, "num_labels=5"),
    ("load/other-id2label", load_with(id2label={i: str(i) for i in range(4)}), ValueError, "num_labels=4"),
    ("load/other-num_labels-reinit", load_with(num_labels=5, ignore_mismatched_sizes=True), "ok", "num_labels=5"),
    ("load/same-num_labels", load_with(num_labels=2), "ok", "num_labels=2"),
    # --- --model
    ("compress/model-missing-folder", compress(model="{ws}/no-such-model"), "error", "does not exist"),
    ("compress/model-missing-relative", compress(model="./no-such-model"), "error", "does not exist"),
    ("compress/model-hub-id-offline", compress(model="someone/some-model"), "error", "offline"),
    ("compress/model-is-a-file", compress(model="{ws}/file.txt"), "error", "is a file"),
    ("compress/model-empty-folder", compress(model="{ws}/empty"), "error", "config.json"),
    ("compress/model-without-tokenizer", compress(model="{ws}/no_tokenizer"), "error", "tokenizer"),
    ("compress/model-already-compressed", compress(model="{ws}/ckpt"), "error", "already compressed"),
    ("compress/output-is-an-empty-folder", compress(output="{copy:empty}"), "ok", ""),
    ("evaluate/model-missing-folder", evaluate(model="{ws}/no-such-model"), "error", "does not exist"),
    ("evaluate/compressed-model", evaluate(model="{ws}/previous"), "ok", "accuracy"),
    ("embed/model-missing-folder", embed(model="{ws}/no-such-model"), "error", "does not exist"),
    ("embed/model-is-a-file", embed(model="{ws}/file.txt"), "error", "is a file"),
    # --- --max-length against the model's positions
    ("compress/max-length-above-positions", compress("--max-length", "32", model="{ws}/short"), "error", "positions"),
    ("compress/default-max-length-short-model", compress(model="{ws}/short"), "ok", ""),
    ("evaluate/max-length-above-positions", evaluate("--max-length", "100000"), "error", "--max-length"),
    ("compress/max-length-1", compress("--max-length", "1"), "ok", ""),
    ("evaluate/model-is-a-file", evaluate(model="{ws}/file.txt"), "error", "is a file"),
    # --- task, labels and data
    ("compress/unknown-task", compress("--task", "imdb"), "error", "Unknown GLUE task"),
    ("compress/two-label-model-three-label-task", compress("--task", "mnli"), "error", "num_labels=2"),
    ("evaluate/three-label-model-two-label-task", evaluate(model="{ws}/three_labels"), "error", "num_labels=3"),
    ("compress/data-dir-missing", compress("--data-dir", "{ws}/nope"), "error", "--data-dir"),
    ("compress/data-dir-without-task", compress("--data-dir", "{ws}/empty"), "error", "SST-2"),
    ("compress/train-split-header-only", compress("--data-dir", "{ws}/glue_header_only"), "error", "no rows"),
    ("compress/train-split-without-label", compress("--data-dir", "{ws}/glue_no_label"), "error", "label"),
    ("compress/calibration-above-rows", compress("--calibration-samples", "100000"), "error", "--calibration-samples"),
    ("compress/unknown-method", compress("--method", "pca"), "error", "--method"),
    ("compress/rank-not-a-number", compress(budget=("--rank", "eight")), "error", "--rank"),
    ("compress/rank-above-the-widths", compress(budget=("--rank", "100000")), "error", "--rank"),
    ("compress/two-budgets", compress("--param-ratio", "0.5"), "error", "not allowed with"),
    ("compress/push-to-hub-offline", compress("--push-to-hub", "me/tiny"), "error", "--push-to-hub"),
    # --- numbers: every numeric flag, impossible values
    *numbers(compress, COMPRESS_NUMBERS),
    *numbers(compress, BUDGETS, budget=True),
    *numbers(evaluate, {"--batch-size": ("0",), "--latency-repeats": ("0",), "--max-eval-samples": ("0",)}),
    *numbers(embed, EMBED_NUMBERS),
    *numbers(embed, EMBED_BUDGETS, budget=True),
    ("embed/sentences-is-a-folder", embed("--sentences", "{ws}/empty"), "error", "--sentences"),
    # --- drone-hf export --onnx (only refusals here: an export folder holds no safetensors; tests/test_onnx_export.py
    # checks the successful ones)
    ("export/no-format", ("export", "--model", "{model}", "--output", "{tmp}/out"), "error", "--onnx"),
    ("export/output-is-model", export(output="{model}"), "error", IS_MODEL),
    ("export/output-inside-model", export(output="{model}/onnx"), "error", IN_MODEL),
    ("export/output-is-a-file", export(output="{ws}/file.txt"), "error", "is a file"),
    ("export/output-is-someone-elses-model", export(output="{ws}/foreign"), "error", "--overwrite"),
    ("export/model-missing-folder", export(model="{ws}/no-such-model"), "error", "does not exist"),
    ("export/model-without-tokenizer", export(model="{ws}/no_tokenizer"), "error", "tokenizer"),
    ("export/opset-too-high", export("--opset", "99"), "error", "--opset"),
    ("export/opset-too-low", export("--opset", "9"), "error", "--opset"),
    ("export/quantize-int4", export("--quantize", "int4"), "error", "--quantize"),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------- harness


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash (or link target) of everything under `folder`."""
    found = {}
    for path in sorted(folder.rglob("*")) if folder.exists() else ():
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = "-> " + os.readlink(path)
        elif path.is_file():
            found[name] = hashlib.sha1(path.read_bytes()).hexdigest()
        else:
            found[name] = "dir"
    return found


def run_probe(probe: tuple, ws: SimpleNamespace, tmp: Path) -> tuple[str, str]:
    """Runs one probe in `tmp`; returns `(kind, message)`: kind is `"ok"`, `"error"` (the expected kind of failure),
    `"other error"` (a `ValueError`, `TypeError` or `OSError` where another outcome was expected), `"crash"` (any
    other exception) or `"silent"` (a probe's `Silent`, or a changed input)."""
    _, run, expect, _ = probe
    inputs = _snapshot(ws.root)
    if callable(run):
        try:
            kind, message = "ok", str(run(ws, tmp))
        except Silent as error:
            kind, message = "silent", str(error)
        except BaseException as error:  # noqa: BLE001 - what kind of failure is the probe's result
            if isinstance(expect, type) and isinstance(error, expect):
                kind = "error"
            else:  # an ordinary error of another kind than expected, or a crash
                kind = "other error" if isinstance(error, (ValueError, TypeError, OSError)) else "crash"
            message = f"{type(error).__name__}: {error}"
    else:
        argv = [_fill(arg, ws, tmp) for arg in run]
        before = _snapshot(tmp)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except SystemExit as error:  # argparse's usage errors
            code = error.code
        except BaseException as error:  # noqa: BLE001
            code, message = None, f"{type(error).__name__}: {error}"
        kind = "crash" if code is None else "ok" if code == 0 else "error"
        if code is not None:  # an error's message is its own lines, not the usage text printed above them
            message = out.getvalue() if code == 0 else _error_lines(err.getvalue())
        if kind == "ok" and "--output" in argv:
            problem = _output_problem(Path(argv[argv.index("--output") + 1]))
            if problem:
                kind, message = "silent", problem
        elif kind == "error" and _snapshot(tmp) != before:
            kind, message = "silent", f"failed but changed its folder: {message}"
    after = _snapshot(ws.root)
    if after != inputs:
        changed = sorted(name for name in set(inputs) | set(after) if inputs.get(name) != after.get(name))
        kind, message = "silent", f"changed the inputs {changed[:6]}; {kind}: {message}"
        shutil.rmtree(ws.root)  # so that the next probes see the inputs as they were
        shutil.copytree(ws.pristine, ws.root, symlinks=True)
    return kind, message


def _error_lines(stderr: str) -> str:
    """What a failed command said, from its `error:` line on (argparse prints the usage text first)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if "error:" in line]
    return "\n".join(lines[starts[-1] :]) if starts else stderr


def _output_problem(folder: Path) -> str | None:
    """What is missing from a drone-hf output folder (`None` when it is whole)."""
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    config = json.loads((folder / "config.json").read_text()) if "config.json" in names else {}
    missing = [name for name in ("drone_results.json", "README.md") if name not in names]
    if not str(config.get("model_type", "")).startswith("drone_"):
        missing.append("a drone config.json")
    if not any(name.endswith(".safetensors") for name in names):
        missing.append("weights")
    if not names & {"tokenizer.json", "vocab.txt", "tokenizer_config.json"}:
        missing.append("tokenizer")
    hidden = [name for name in names if name.startswith(".")]
    try:  # model files of an earlier output that the new one did not write
        listed = json.loads((folder / "drone_results.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        listed = sorted(names)
    stale = [n for n in names - set(listed) if n.endswith((".safetensors", ".json", ".txt")) or n[:2] == "1_"]
    stale = [name for name in stale if name != "notes.txt"]  # the user's own file in the --overwrite probe
    if missing or hidden or stale:
        return f"incomplete output {folder}: missing {missing}, hidden {hidden}, stale {stale}"
    return None


def classify(probe: tuple, kind: str, message: str) -> str:
    """correct / clear error / unclear error / deep crash / silent, against the probe's expectation."""
    _, _, expect, phrase = probe
    if kind == "silent":
        return "silent"
    if kind == "crash":
        return "deep crash"
    if kind == "ok":
        return "correct" if expect == "ok" and phrase in message else "silent"
    return "clear error" if kind == "error" and expect != "ok" and phrase in message else "unclear error"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("adversarial") / "ws")


@pytest.mark.parametrize("probe", PROBES, ids=[probe[0] for probe in PROBES])
def test_probe(probe, workspace, tmp_path):
    if "sentence-transformers" in probe[0] or probe[0].startswith("embed/"):
        pytest.importorskip("sentence_transformers")
    kind, message = run_probe(probe, workspace, tmp_path)
    verdict = classify(probe, kind, message)
    expected = "correct" if probe[2] == "ok" else "clear error"
    assert verdict == expected, f"{probe[0]}: {verdict} ({kind}): {message[-1500:]}"


def test_probe_ids_are_unique():
    ids = [probe[0] for probe in PROBES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


if __name__ == "__main__":  # python -m tests.test_adversarial_cli [ID_SUBSTRING]: the classified outcomes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as root:
        ws = build_workspace(Path(root) / "ws")
        for number, probe in enumerate(p for p in PROBES if wanted in p[0]):
            tmp = Path(root) / f"probe{number}"
            tmp.mkdir()
            kind, message = run_probe(probe, ws, tmp)
            verdict = classify(probe, kind, message)
            counts[verdict] = counts.get(verdict, 0) + 1
            line = " ".join(message.strip().splitlines()[-1:] if kind == "ok" else message.strip().split())[-400:]
            print(f"{verdict:14s} | {probe[0]} | {line}", flush=True)
    print(json.dumps(counts))
