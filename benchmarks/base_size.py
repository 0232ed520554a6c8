"""DRONE's headline at base size (issue 13): a fine-tuned encoder (all-mpnet-base-v2: 12 layers, hidden 768; or
MiniLM) compressed on a GLUE task with no retraining at accuracy budgets (`drone-hf compress --max-accuracy-drop`:
DRONE, bias-corrected DRONE, SVD) and with distillation at FLOP budgets; every model timed on the CPU in one process
against the dense one; one table, one JSON and a Pareto plot (speed-up vs dev metric), with the paper's numbers.

Five resumable stages. Each finished piece is cached in `.cache/base_size/<model>-<task>[-smoke]/<stage>/<label>-<key>`
(`key`: a hash of every setting that makes it, the teacher's included), built in a scratch folder and renamed when
complete: a rerun skips what is finished, and a crash leaves no half-written entry.

  teacher  fine-tune the teacher, or find it in .cache/finetuned (`common.finetune`); CUDA when present; dense dev
           metric
  budget   `drone-hf compress --max-accuracy-drop B --method M --allocation-search S` per method and budget, as a
           subprocess (like allocation_cost.py; the CLI runs on the CPU): ranks searched on held-out TRAIN rows, the
           dev split read once at the end
  distill  DRONE at FLOP budgets (`target_speedup`, no evaluations), then feature distillation from the frozen
           teacher with `DroneDistillationTrainer` (Trainer, hence accelerate; gradient accumulation; CUDA when
           present); the curve (metric vs steps) on a slice of TRAIN rows held out of the distillation, the dev
           metric once before and once after
  time     every finished model against the dense one, round-robin in one process, on the CPU, batch 8 x 128 and
           batch 1 x 128 tokens (`--threads`); `--timing-processes N`: in N fresh processes, the median of their
           ratios (allocator and OpenMP variables such as `GLIBC_TUNABLES` and `OMP_WAIT_POLICY=ACTIVE` are part of
           the timing's key: common.py sets PASSIVE otherwise, which slows small factored models at batch 1)
  report   the table, benchmarks/results/base_size_<model>_<task>.json and .png, the paper's numbers beside ours

    python benchmarks/base_size.py --model minilm --task mrpc --smoke     # every stage on tiny settings (CPU)
    flock /tmp/drone_heavy.lock python benchmarks/base_size.py --model mpnet --task mrpc --stages teacher
    flock /tmp/drone_heavy.lock python benchmarks/base_size.py --model mpnet --task mrpc --stages budget distill
    flock /tmp/drone_heavy.lock python benchmarks/base_size.py --model mpnet --task mrpc --stages time report

On a CPU with AMX-bf16 tiles, `--teacher-bf16` and `--distill-bf16` train in bf16 mixed precision (float32 weights;
`TrainingArguments(bf16=True)`): MPNet at batch 32 on MRPC rows takes 2.2 s per step against 5.2 s in fp32 on 2
threads. Each is part of its entries' keys.

`--teacher-holdout N` keeps N train rows (a seeded draw, `common.split_glue_train`) out of the teacher's fine-tuning;
the budget stage then calibrates on the first `--calibration-samples` of them and checks the budget on the rest, rows
the teacher has never seen (without it the held-out rows are rows the teacher learnt, on which a compressed model's
drop is larger than on dev). Its teacher, entries and report (`..._holdout<N>.json`) are its own.

A smoke run writes its report into its cache folder, not benchmarks/results. Set $DRONE_HF_CACHE to share teachers
with another checkout (e.g. the all-mpnet-base-v2 SST-2 teacher of mpnet_glue.py has this script's SST-2 settings).
`--cache-teacher` runs the teacher once over the distillation rows and reuses its outputs
(`DroneDistillationArguments(cache_teacher_outputs=True)`; MPNet on MRPC's 3156 rows: 6.5 GB in float32, 141 s to
build, against about 1.5 s per step for the teacher's bf16 forward). `--distill-rows` bounds the rows (and the
cache) on SST-2. `--distill-augment COPIES` adds COPIES word-replaced copies of each distillation row that the teacher
alone teaches (augment.py: TinyBERT's augmentation, candidates from the teacher's embedding neighbours; with it the
teacher runs at every step, as caching 10x MRPC would take 65 GB). This script drives `DroneDistillationTrainer`
itself (written when `drone_hf.distill` pinned gradient accumulation to 1;
`DroneDistillationArguments(gradient_accumulation_steps=...)` now exists); one process only (not under `accelerate
launch`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import augment
import torch
from common import (
    BENCHMARK_ENV,
    CACHE,
    REPO,
    RESULTS,
    TIMING_ROWS,
    calibration_batches,
    command_line,
    glue_data_dir,
    machine_description,
    measure_speedups,
    minilm_path,
    print_table,
    set_threads,
    split_glue_train,
)
from mpnet_glue import describe, flop_bound, load_teacher, model_name, mpnet_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback, TrainingArguments

import drone_hf
from drone_hf.budget_search import SCREENING_SAMPLES, SEARCH_REVISION
from drone_hf.cli_checks import number
from drone_hf.evaluation import evaluate_glue
from drone_hf.glue import get_glue_task, load_glue
from drone_hf.methods import get_method
from drone_hf.profiling import count_parameters, cpu_name, load_average
from drone_hf.sequential import check_sequential_method
from drone_hf.speed import speed_flags


STAGES = ("teacher", "budget", "distill", "time", "report")
RESULT = "result.json"  # written last into an entry's scratch folder: an entry without it does not exist
ROWS_TEXT = {  # --timing-rows: how each of common.TIMING_ROWS builds its batch
    "padded": "train rows padded to that length",
    "full": "full-length rows: train text concatenated, no padding",
}
METHOD_LABELS = {
    "drone": "DRONE",
    "drone-bc": "DRONE (bias-corrected)",
    "svd": "SVD",
    "drone-seq": "DRONE + sequential refit",  # `drone-hf compress --method drone --sequential`
    "drone-act": "DRONE (activation-weighted)",
}
DEFAULT_METHODS = ("drone", "drone-bc", "svd", "drone-seq")  # the methods; drone-act on request
# Per (model, task): the teachers already cached by mpnet_glue.py (MPNet SST-2), common.py (MiniLM SST-2) and
# allocation_cost.py (MiniLM MRPC); MPNet MRPC: 3 epochs of its 3668 rows at batch 32. Batch 32, seed 0 for all.
TEACHER_DEFAULTS = {
    ("mpnet", "sst2"): {"teacher_steps": 300, "teacher_lr": 4e-5, "teacher_max_length": 64},
    ("mpnet", "mrpc"): {"teacher_steps": 350, "teacher_lr": 4e-5, "teacher_max_length": 128},
    ("minilm", "sst2"): {"teacher_steps": 300, "teacher_lr": 1e-4, "teacher_max_length": 64},
    ("minilm", "mrpc"): {"teacher_steps": 350, "teacher_lr": 1e-4, "teacher_max_length": 128},
}
# Options whose default depends on --smoke (the parser's default is None).
DEFAULTS = {
    "teacher_batch_size": 32,
    "dev_rows": None,
    "budgets": [1.0, 1.5],
    "refine_steps": None,  # the CLI's default
    "calibration_samples": 512,
    "heldout_samples": 2048,
    "screening_samples": None,  # the search's default (budget_search.SCREENING_SAMPLES: 256 fast, 512 exhaustive)
    "cli_latency_repeats": 3,
    "distill_steps": [600, 1200, 2000],
    "distill_batch_size": 16,
    "grad_accum": 2,
    "curve_rows": 512,
    "curve_points": 10,
    "latency_repeats": 20,
}
SMOKE = {
    "teacher_steps": 30,
    "teacher_batch_size": 16,
    "teacher_max_length": 64,
    "dev_rows": 64,
    "budgets": [1.0],
    "refine_steps": 0,
    "calibration_samples": 64,
    "heldout_samples": 128,
    "screening_samples": 64,
    "cli_latency_repeats": 1,
    "distill_steps": [6],
    "distill_batch_size": 8,
    "grad_accum": 2,
    "curve_rows": 64,
    "curve_points": 2,
    "latency_repeats": 3,
}
PAPER = {
    "source": "Chen et al., DRONE: Data-aware Low-rank Compression for Large NLP Models (NeurIPS 2021)",
    "no_retraining": "BERT-base, MRPC: 1.92x faster at -1.5 points, no retraining",
    "distillation": "BERT-base: > 12x faster combined with distillation",
    "speedup_no_retraining": 1.92,
    "drop_no_retraining": 1.5,
    "speedup_distillation": 12.0,
}
COLUMNS = [
    ("label", "model", "s"),
    ("retraining", "retraining", "s"),
    ("metric", "dev {metric}", ".2f"),
    ("accuracy", "dev accuracy", ".2f"),
    ("delta", "Δ vs dense", "+.2f"),
    ("speedup_b8", "CPU speed-up 8×128", ".2f"),
    ("speedup_b1", "CPU speed-up 1×128", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
    ("heldout_drop", "held-out drop", ".2f"),
    ("cost", "cost", "s"),
]


# ------------------------------------------------------------------------------------------------------ stage cache


def settings_key(settings: dict) -> str:
    """A short hash of `settings` (JSON, keys sorted): equal settings give equal keys, in any order."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def entry_path(root: Path, stage: str, label: str, settings: dict) -> Path:
    """Where the entry of `stage` made with `settings` lives: `root/stage/<label>-<key>`."""
    return root / stage / f"{label}-{settings_key(settings)}"


def load_entry(path: Path) -> dict | None:
    """The finished entry's result, or `None` if it is not there (never built, or its build crashed)."""
    result = path / RESULT
    return json.loads(result.read_text()) if result.is_file() else None


@contextlib.contextmanager
def building(path: Path, settings: dict):
    """Builds the entry `path`: yields `(scratch folder, result dict)` to fill (the folder need not exist yet); when
    the block ends, writes `settings.json` and then `result.json` into the scratch folder and renames it to `path`. If
    the block raises, the scratch folder is removed and `path` is left as it was."""
    scratch = path.with_name(path.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    result: dict = {}
    try:
        yield scratch, result
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
        (scratch / RESULT).write_text(json.dumps(result, indent=2, default=str))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(scratch, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- the settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mpnet", "minilm"], default="mpnet")
    parser.add_argument("--task", choices=["mrpc", "sst2"], default="mrpc")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], help="fine-tuning and distillation (default: CUDA if any)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny teacher, subsets and steps: the pipeline only")
    parser.add_argument("--threads", type=int, help="torch CPU threads, also the CLI's (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-rows", type=int, help="a seeded subset of the dev split (default: all; smoke: 64)")
    group = parser.add_argument_group("teacher (defaults per model and task: TEACHER_DEFAULTS)")
    group.add_argument("--teacher-steps", type=int)
    group.add_argument("--teacher-batch-size", type=int, help="default 32")
    group.add_argument("--teacher-lr", type=float)
    group.add_argument("--teacher-max-length", type=int)
    group.add_argument(
        "--teacher-bf16",
        action="store_true",
        help="fine-tune in bf16 mixed precision (float32 weights; MPNet, MRPC, batch 32: 2.2 s per step against 5.2 "
        "in fp32 on a 2-core AMX-bf16 Xeon)",
    )
    group.add_argument(
        "--teacher-holdout",
        type=int,
        default=0,
        help="keep this many train rows (a seeded draw) out of the teacher's fine-tuning; the budget stage then "
        "calibrates and checks on those rows only, which the teacher has never seen (default 0: the teacher trains "
        "on every row, and the budget's held-out rows are rows it has learnt). Needs the local GLUE folder",
    )
    group = parser.add_argument_group("budget: drone-hf compress --max-accuracy-drop")
    group.add_argument("--budgets", type=float, nargs="+", help="metric points (default 1.0 1.5; smoke: 1.0)")
    group.add_argument("--methods", nargs="+", choices=list(METHOD_LABELS), default=list(DEFAULT_METHODS))
    group.add_argument("--allocation-search", choices=["fast", "exhaustive"], default="fast")
    group.add_argument("--calibration-samples", type=int, help="train rows for the statistics (default 512)")
    group.add_argument("--heldout-samples", type=int, help="train rows for the joint checks (default 2048)")
    group.add_argument(
        "--screening-samples",
        type=int,
        help="of those, rows for per-module probes (default: 256 fast, 512 exhaustive)",
    )
    group.add_argument("--refine-steps", type=int, help="the CLI's --refine-steps (default: its own; smoke: 0)")
    group.add_argument(
        "--screening-dtype",
        choices=["bfloat16", "float16"],
        help="the CLI's --screening-dtype: per-module probes under autocast (default: float32)",
    )
    group.add_argument(
        "--budget-costs",
        nargs="+",
        choices=["flops", "float32"],
        default=["flops"],
        help="what a budget's time shares count: flops (multiply-adds) or float32 (the CLI's --dtype float32: kernels "
        "timed on this machine, and only ranks measured faster than the dense layer); one entry each",
    )
    group.add_argument("--cli-latency-repeats", type=int, help="the CLI's own timing rounds (default 3)")
    group.add_argument(
        "--sequential-checks",
        type=int,
        default=4,
        help="method drone-seq: the CLI's --sequential-checks (refitted joint checks after the fast search's result)",
    )
    group = parser.add_argument_group("distill: FLOP budgets + feature distillation")
    group.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="target_speedup values")
    group.add_argument(
        "--distill-steps", type=int, nargs="+", help="one per --speedups, or one for all (default 600 1200 2000)"
    )
    group.add_argument(
        "--distill-method",
        choices=["drone", "drone-act", "drone-bc", "svd"],
        default="drone",
        help="the factors distillation starts from (drone-act: activation-weighted DRONE; not with "
        "--distill-sequential)",
    )
    group.add_argument(
        "--distill-ranks",
        type=int,
        nargs="+",
        help="uniform ranks of every encoder linear instead of --speedups (one distilled model each; the "
        "--distill-steps pair with these)",
    )
    group.add_argument(
        "--distill-no-attention",
        action="store_true",
        help="allocate the FLOP budget over the linears only (compress_model(attention=False)): DRONE attention's "
        "narrowed query/key are zero-padded back to the head size at run time, so the score product it removes from "
        "the multiply-add count still runs",
    )
    group.add_argument(
        "--distill-sequential",
        action="store_true",
        help="start distillation from the sequentially refitted student (compress_model(sequential=True) on the "
        "calibration rows): each factored layer refitted on the inputs the compressed model itself feeds it (its "
        "factors are much larger than plain DRONE's; the MPNet MRPC rank-112 student collapsed under the default "
        "recipe: README)",
    )
    group.add_argument(
        "--distill-dense-weight",
        type=number(0),
        default=0.0,
        help="with --distill-sequential: the anchored refit (compress_model(sequential_dense_weight=...)): the dense "
        "model's own inputs join each refit with this weight, which bounds the refitted factors; default 0: none",
    )
    group.add_argument("--distill-batch-size", type=int, help="per device (default 16)")
    group.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 2: batch 32)")
    group.add_argument("--distill-lr", type=float, default=1e-4)
    group.add_argument("--distill-max-length", type=int, default=128)
    group.add_argument(
        "--distill-bf16",
        action="store_true",
        help="distil in bf16 mixed precision (float32 weights; see --teacher-bf16)",
    )
    group.add_argument(
        "--distill-rows",
        type=int,
        help="a seeded subset of the train rows (after the curve rows) to distil on (default: all); with "
        "--cache-teacher on SST-2 (67k rows) this bounds the cache's memory",
    )
    group.add_argument(
        "--distill-augment",
        type=int,
        default=0,
        metavar="COPIES",
        help="add COPIES word-replaced copies of each distillation row, taught by the teacher alone (augment.py: "
        "TinyBERT's augmentation with the teacher's embedding neighbours as candidates); default 0: none",
    )
    group.add_argument(
        "--augment-prob", type=float, default=0.4, help="probability of replacing each word (TinyBERT's 0.4)"
    )
    group.add_argument("--augment-neighbours", type=int, default=15, help="candidates per word (TinyBERT's K = 15)")
    group.add_argument(
        "--cache-teacher",
        action="store_true",
        help="run the teacher once over the distillation rows and reuse its outputs "
        "(DroneDistillationArguments(cache_teacher_outputs=True))",
    )
    group.add_argument(
        "--teacher-cache-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="storage dtype of the cached hidden states (with --cache-teacher)",
    )
    group.add_argument("--alpha-hidden", type=float, default=1.0)
    group.add_argument("--alpha-kl", type=float, default=1.0)
    group.add_argument("--alpha-task", type=float, default=0.0)
    group.add_argument("--temperature", type=float, default=2.0)
    group.add_argument("--curve-rows", type=int, help="train rows held out of distillation for the curve (512)")
    group.add_argument("--curve-points", type=int, help="evaluations along the way, besides step 0 (default 10)")
    group = parser.add_argument_group("time (CPU, round-robin against the dense model)")
    group.add_argument("--latency-repeats", type=int, help="timed rounds (default 20)")
    group.add_argument("--seq-len", type=int, default=128)
    group.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    group.add_argument(
        "--timing-rows",
        choices=list(TIMING_ROWS),
        default="padded",
        help="padded: the first train rows padded to --seq-len (the default, as before); full: sequences of exactly "
        "--seq-len real tokens (train text concatenated, no padding, all-ones mask); a timing and report of its own",
    )
    group.add_argument(
        "--timing-processes",
        type=int,
        default=1,
        help="time in this many fresh processes, one after the other, and report the median of their speed-ups "
        "(each process's own round-robin ratio; its spread across processes beside it): the ratio moves by ~10%% "
        "from one process to the next on a shared VM, more than within one; default 1: this process",
    )
    group = parser.add_argument_group("report")
    group.add_argument(
        "--report-name",
        help="file name (no suffix) of the report's JSON and plot in benchmarks/results/ (default: "
        "base_size_<model>_<task>[_holdoutN][_fullrows]); give one per run that should not replace an earlier report",
    )
    args = parser.parse_args(argv)
    if args.report_name is not None and (
        not args.report_name or Path(args.report_name).name != args.report_name or args.report_name.startswith(".")
    ):
        parser.error(
            f"--report-name must be a plain file name (not empty, no folders, not starting with '.'), got "
            f"{args.report_name!r}."
        )
    heldout_given = args.heldout_samples is not None
    defaults = {**TEACHER_DEFAULTS[args.model, args.task], **DEFAULTS, **(SMOKE if args.smoke else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.screening_samples is None:  # resolved here: budget entries are keyed by the number of rows
        args.screening_samples = SCREENING_SAMPLES[args.allocation_search]
    budgets = args.distill_ranks or args.speedups
    if len(args.distill_steps) == 1:
        args.distill_steps = args.distill_steps * len(budgets)
    if len(args.distill_steps) != len(budgets):
        parser.error(f"--distill-steps: one value or one per distillation budget {budgets}, got {args.distill_steps}.")
    if args.timing_processes < 1:
        parser.error(f"--timing-processes must be >= 1, got {args.timing_processes}.")
    if args.distill_ranks and min(args.distill_ranks) < 1:
        parser.error(f"--distill-ranks must be >= 1, got {args.distill_ranks}.")
    if args.distill_rows is not None and args.distill_rows < 1:
        parser.error(f"--distill-rows must be >= 1, got {args.distill_rows}.")
    if args.distill_dense_weight and not args.distill_sequential:
        parser.error(f"--distill-dense-weight {args.distill_dense_weight:g} needs --distill-sequential.")
    if args.distill_sequential:  # the library's own rule, checked before any work instead of after calibration
        try:
            check_sequential_method(get_method(args.distill_method))
        except ValueError as error:
            parser.error(f"--distill-method {args.distill_method} with --distill-sequential: {error}")
    if args.distill_augment < 0:
        parser.error(f"--distill-augment must be >= 0 (copies per row), got {args.distill_augment}.")
    if not 0.0 < args.augment_prob <= 1.0:
        parser.error(f"--augment-prob must be in (0, 1], got {args.augment_prob}.")
    if args.augment_neighbours < 1:
        parser.error(f"--augment-neighbours must be >= 1, got {args.augment_neighbours}.")
    if args.teacher_holdout:
        if args.teacher_holdout < 0 or glue_data_dir(args.task) is None:
            parser.error(
                f"--teacher-holdout {args.teacher_holdout}: must be >= 0, and > 0 needs the task's train.tsv in "
                "../shared/glue (the local GLUE folder)."
            )
        spare = args.teacher_holdout - args.calibration_samples
        if not heldout_given:
            args.heldout_samples = spare  # every held-out row the calibration leaves
        if spare < 64 or args.heldout_samples > spare:
            parser.error(
                f"--teacher-holdout {args.teacher_holdout} leaves {spare} rows after --calibration-samples "
                f"{args.calibration_samples}; the budget needs >= 64 held-out rows and --heldout-samples "
                f"({args.heldout_samples}) at most that."
            )
    if min(args.speedups) <= 1 or min(args.budgets) <= 0:
        parser.error("--speedups must be > 1 and --budgets > 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


@dataclass
class Run:
    """The settings of one invocation and where its entries live."""

    args: argparse.Namespace
    model_path: str
    name: str  # the teacher cache's model name
    root: Path

    @classmethod
    def create(cls, args) -> Run:
        model_path = mpnet_path() if args.model == "mpnet" else minilm_path()
        name = model_name(model_path) if args.model == "mpnet" else "minilm"
        root = CACHE / "base_size" / f"{args.model}-{args.task}{'-smoke' if args.smoke else ''}"
        return cls(args, model_path, name, root)

    @property
    def info(self):
        return get_glue_task(self.args.task)

    def teacher_settings(self) -> dict:
        a = self.args
        return {
            "model": self.name,
            "task": a.task,
            "steps": a.teacher_steps,
            "batch_size": a.teacher_batch_size,
            "lr": a.teacher_lr,
            "max_length": a.teacher_max_length,
            "seed": a.seed,
            "dev_rows": a.dev_rows,
            **({"bf16": True} if a.teacher_bf16 else {}),  # absent when off: older entries keep their keys
            **({"holdout": a.teacher_holdout} if a.teacher_holdout else {}),
        }

    def data_dirs(self) -> tuple[str | None, str | None]:
        """`(teacher's, budget's)` GLUE-layout folders: with `--teacher-holdout N`, the two halves of
        `common.split_glue_train` (cached in this run's folder); else both the default (`glue_data_dir`)."""
        a = self.args
        if not a.teacher_holdout:
            return glue_data_dir(a.task), glue_data_dir(a.task)
        dest = self.root / "data" / f"holdout{a.teacher_holdout}-seed{a.seed}"
        split_glue_train(a.task, glue_data_dir(a.task), a.teacher_holdout, a.seed, dest)
        return str(dest / "teacher"), str(dest / "holdout")

    def teacher_entry(self) -> Path:
        return entry_path(self.root, "teacher", self.name, self.teacher_settings())

    def teacher(self) -> dict:
        """The finished teacher entry's result (with `path`); exits when the teacher stage has not run."""
        path = self.teacher_entry()
        result = load_entry(path)
        if result is None:
            raise SystemExit(f"No finished teacher at {path}: run `--stages teacher` first (same options).")
        return {**result, "entry": path.name}

    def budget_entries(self) -> list[tuple[str, str, float, Path, dict]]:
        """`(name, method, budget, path, settings)` per budget, budget cost (`--budget-costs`) and method."""
        a, teacher = self.args, self.teacher_entry().name
        entries = []
        for budget, cost, method in itertools.product(a.budgets, a.budget_costs, a.methods):
            deployment_dtype = None if cost == "flops" else cost
            settings = {
                "teacher": teacher,
                "method": method,
                "max_accuracy_drop": budget,
                "allocation_search": a.allocation_search,
                "calibration_samples": a.calibration_samples,
                "heldout_samples": a.heldout_samples,
                "screening_samples": a.screening_samples,
                "refine_steps": a.refine_steps,
                "dev_rows": a.dev_rows,
                "seed": a.seed,
                **({"screening_dtype": a.screening_dtype} if a.screening_dtype else {}),  # absent: older keys
                **({"deployment_dtype": deployment_dtype} if deployment_dtype else {}),
                **({"sequential_checks": a.sequential_checks} if method.endswith("-seq") else {}),
                # the fast search's revision (absent for revision 1 and for the exhaustive search: older keys)
                **(
                    {"search_revision": SEARCH_REVISION}
                    if a.allocation_search == "fast" and SEARCH_REVISION > 1
                    else {}
                ),
            }
            screening = f"-screen-{a.screening_dtype}" if a.screening_dtype else ""
            deployment = f"-timed-{deployment_dtype}" if deployment_dtype else ""
            name = f"{method}-drop{budget:g}-{a.allocation_search}{screening}{deployment}"
            entries.append((name, method, budget, entry_path(self.root, "budget", name, settings), settings))
        return entries

    def distill_entries(self) -> list[tuple[str, str, int, Path, dict]]:
        """`(name, budget label, steps, path, settings)` per FLOP budget (or uniform rank, `--distill-ranks`)."""
        a, teacher = self.args, self.teacher_entry().name
        entries = []
        budgets = (
            [("rank", r) for r in a.distill_ranks] if a.distill_ranks else [("target_speedup", s) for s in a.speedups]
        )
        for (kind, value), steps in zip(budgets, a.distill_steps):
            settings = {
                "teacher": teacher,
                "method": a.distill_method,
                kind: value,
                "calibration_samples": a.calibration_samples,
                "steps": steps,
                "batch_size": a.distill_batch_size,
                "grad_accum": a.grad_accum,
                "lr": a.distill_lr,
                "max_length": a.distill_max_length,
                "loss": [a.alpha_hidden, a.alpha_kl, a.alpha_task, a.temperature],
                "curve_rows": a.curve_rows,
                "curve_points": a.curve_points,
                "dev_rows": a.dev_rows,
                "seed": a.seed,
                **({"bf16": True} if a.distill_bf16 else {}),  # absent when off: older entries keep their keys
                # the cache changes how long it takes, not what is learnt; keyed all the same, as the run it names
                **({"teacher_cache": a.teacher_cache_dtype} if a.cache_teacher else {}),
                **({"distill_rows": a.distill_rows} if a.distill_rows else {}),
                **({"attention": False} if a.distill_no_attention else {}),  # absent when on: older keys
                **(
                    {"augment": [a.distill_augment, a.augment_prob, a.augment_neighbours]} if a.distill_augment else {}
                ),
                "balanced_factors": True,  # DroneDistillationArguments.balance_factors (default since it exists)
                **({"sequential": True} if a.distill_sequential else {}),  # absent when off: older keys
                **({"sequential_dense_weight": a.distill_dense_weight} if a.distill_dense_weight else {}),
            }
            tag, label = (f"rank{value}", f"rank {value}") if kind == "rank" else (f"{value:g}x", f"{value:g}× FLOPs")
            if a.distill_no_attention:
                tag, label = f"{tag}-linears", f"{label}, linears only"
            if a.distill_augment:
                tag, label = f"{tag}-aug{a.distill_augment}", f"{label}, augmented ×{a.distill_augment + 1}"
            if a.distill_sequential:
                tag, label = f"{tag}-seq", f"{label}, refitted"
            if a.distill_dense_weight:
                tag, label = (
                    f"{tag}-dw{a.distill_dense_weight:g}",
                    f"{label} (dense weight {a.distill_dense_weight:g})",
                )
            name = f"{a.distill_method}-{tag}-distilled"
            entries.append((name, label, steps, entry_path(self.root, "distill", name, settings), settings))
        return entries

    def finished_models(self) -> dict[str, Path]:
        """Name -> folder of every finished compressed model (an unmet budget has none)."""
        models = {}
        for name, _, _, path, _ in self.budget_entries():
            if (load_entry(path) or {}).get("status") == "done":
                models[name] = path
        for name, _, _, path, _ in self.distill_entries():
            if load_entry(path) is not None:
                models[name] = path
        return models

    def time_entry(self, models: dict[str, Path]) -> tuple[Path, dict]:
        a = self.args
        settings = {
            "teacher": self.teacher_entry().name,
            "models": sorted(path.name for path in models.values()),
            "repeats": a.latency_repeats,
            "threads": torch.get_num_threads(),
            "seq_len": a.seq_len,
            "batch_sizes": a.batch_sizes,
            **({"rows": a.timing_rows} if a.timing_rows != "padded" else {}),  # the padded entries keep their keys
            **({"processes": a.timing_processes} if a.timing_processes > 1 else {}),  # absent for one: older keys
            **({"env": env} if (env := timing_environment()) else {}),
        }
        return entry_path(self.root, "time", "cpu", settings), settings

    def dev(self, tokenizer):
        """The dev split (or its seeded `--dev-rows` subset, the same rows the CLI's `--max-eval-samples` takes)."""
        info = self.info
        return load_glue(
            info.name,
            tokenizer,
            split=info.dev_splits[0],
            data_dir=glue_data_dir(info.name),
            max_length=128,
            max_samples=self.args.dev_rows,
            seed=self.args.seed,
        )


def points(metrics: dict) -> dict[str, float]:
    """GLUE metrics (fractions) in points."""
    return {name: 100 * value for name, value in metrics.items()}


def load_model(path) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


# ----------------------------------------------------------------------------------------------------------- stages


def stage_teacher(run: Run) -> None:
    path, settings = run.teacher_entry(), run.teacher_settings()
    if load_entry(path) is not None:
        print(f"[teacher] finished: {path}", flush=True)
        return
    a = run.args
    options = argparse.Namespace(
        steps=a.teacher_steps,
        batch_size=a.teacher_batch_size,
        lr=a.teacher_lr,
        max_length=a.teacher_max_length,
        seed=a.seed,
        device=a.device,
        bf16=a.teacher_bf16,
        data_dir=run.data_dirs()[0],
    )
    name = f"{run.name}-holdout{a.teacher_holdout}" if a.teacher_holdout else run.name
    with building(path, settings) as (_, result):
        teacher, tokenizer, folder, seconds, trained = load_teacher(
            options, run.model_path, name, run.info, step="[teacher]"
        )
        dev = run.dev(tokenizer)
        metrics = points(evaluate_glue(teacher.to(a.device), dev, tokenizer, run.info.name))
        result.update(
            path=str(folder),
            description=describe(teacher.config, count_parameters(teacher)),
            fine_tune={**settings, "seconds": trained.get("seconds"), "machine": trained.get("machine")},
            trained_now=bool(seconds),
            device=a.device,
            dev=metrics,
            dev_rows=len(dev),
        )
    print(f"[teacher] {folder}: dev {run.info.main_metric} {metrics[run.info.main_metric]:.2f} -> {path}", flush=True)


def _compress_command(
    run: Run, teacher: dict, method: str, budget: float, output: Path, dtype: str | None = None
) -> list[str]:
    """`drone-hf compress` with an accuracy budget, this run's settings, `--dtype dtype` (a budget timed in that
    dtype) if given, and its output in `output`."""
    a, info = run.args, run.info
    data_dir = run.data_dirs()[1]
    sequential = method.endswith("-seq")
    options = {
        "--model": teacher["path"],
        "--task": info.name,
        "--data-dir": Path(data_dir) / info.local_dir if data_dir else None,
        "--max-accuracy-drop": f"{budget:g}",
        "--method": method.removesuffix("-seq"),
        "--sequential-checks": a.sequential_checks if sequential else None,
        "--allocation-search": a.allocation_search,
        "--calibration-samples": a.calibration_samples,
        "--heldout-samples": a.heldout_samples,
        "--screening-samples": a.screening_samples,
        "--screening-dtype": a.screening_dtype,
        "--dtype": dtype,
        "--refine-steps": a.refine_steps,
        "--max-eval-samples": a.dev_rows,
        "--latency-repeats": a.cli_latency_repeats,
        "--threads": torch.get_num_threads(),
        "--seed": a.seed,
        "--output": output,
    }
    given = [[option, str(value)] for option, value in options.items() if value is not None]
    flags = ["--sequential"] if sequential else []
    return [sys.executable, "-m", "drone_hf", "compress", *(word for pair in given for word in pair), *flags]


def _budget_summary(record: dict, method: str) -> dict:
    """What the report needs from the CLI's `drone_results.json`."""
    allocation, results = record["allocation"], record["results"]
    return {
        "status": "done",
        "dev": points(results[method]["metrics"]),
        "dev_dense": points(results["dense"]["metrics"]),
        "compress_seconds": record["compress_seconds"],
        "allocation": {
            key: allocation.get(key)
            for key in (
                "search",
                "evaluations",
                "joint_check_count",
                "seconds",
                "evaluation_seconds",
                "heldout_examples",
                "screening_examples",
                "screening_dtype",
                "heldout_row_passes",
                "heldout_drop",
                "heldout_standard_error",
                "safety_margin",
                "sequential",
            )
        },
        "cli_speed": {key: results[method].get(key) for key in ("flop_bound", "speedup", "flags")},
        "cli_timing": record.get("timing"),
    }


def stage_budget(run: Run) -> None:
    teacher = run.teacher()
    for name, method, budget, path, settings in run.budget_entries():
        if load_entry(path) is not None:
            print(f"[budget] {name}: finished ({path})", flush=True)
            continue
        log = path.with_name(path.name + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with building(path, settings) as (scratch, result):
            command = _compress_command(run, teacher, method, budget, scratch, settings.get("deployment_dtype"))
            print(f"[budget] {name}: {' '.join(command)} (log: {log})", flush=True)
            started = time.perf_counter()
            with open(log, "w") as out:
                code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
            text = log.read_text(errors="replace")
            if code and "The budget cannot be met" in text:  # a result, not a crash: nothing compresses within B
                result.update(status="unmet", message=text.strip().splitlines()[-1])
            elif code:
                raise SystemExit(f"[budget] {name} failed (exit {code}); the end of {log}:\n{text[-3000:]}")
            else:
                record = json.loads((scratch / "drone_results.json").read_text())
                result.update(_budget_summary(record, method.removesuffix("-seq")))
            result.update(method=method, budget=budget, wall_seconds=time.perf_counter() - started)
            scratch.mkdir(parents=True, exist_ok=True)
            shutil.move(log, scratch / "compress.log")
        done = load_entry(path)
        if done["status"] == "done":
            main = run.info.main_metric
            print(
                f"[budget] {name}: dev {main} {done['dev'][main]:.2f} (dense {done['dev_dense'][main]:.2f}), "
                f"allocation {done['allocation']['seconds'] / 60:.1f} min -> {path}",
                flush=True,
            )
        else:
            print(f"[budget] {name}: unmet ({done['message']})", flush=True)


class CurveCallback(TrainerCallback):
    """Evaluates the student at step 0 and every `every` steps (and the last) with `evaluate(model) -> dict`; the
    training seconds of each point leave out the evaluations."""

    def __init__(self, evaluate, every: int):
        self.evaluate, self.every = evaluate, every
        self.points: list[dict] = []
        self.eval_seconds = 0.0
        self.start = 0.0

    def _record(self, step: int, model) -> None:
        now = time.perf_counter()
        train_seconds = now - self.start - self.eval_seconds
        metrics = self.evaluate(model)
        self.eval_seconds += time.perf_counter() - now
        self.points.append({"step": step, "train_seconds": train_seconds, **metrics})
        shown = ", ".join(f"{key} {value:.2f}" for key, value in metrics.items())
        print(f"[distill]   step {step}: {shown} ({train_seconds / 60:.1f} min training)", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = time.perf_counter()
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step, model)


def distillation_arguments(args: argparse.Namespace, steps: int, output_dir: str):
    """The distillation stage's `(DroneDistillationArguments, TrainingArguments)` for `steps` optimiser steps: the
    loss weights, batch, gradient accumulation and learning rate of `args`, bf16 with `--distill-bf16`, no
    checkpoints, logging at each curve point."""
    from drone_hf import DroneDistillationArguments

    a = args
    every = max(1, steps // a.curve_points)
    settings = DroneDistillationArguments(
        alpha_hidden=a.alpha_hidden,
        alpha_kl=a.alpha_kl,
        alpha_task=a.alpha_task,
        temperature=a.temperature,
        max_steps=steps,
        learning_rate=a.distill_lr,
        per_device_train_batch_size=a.distill_batch_size,
        gradient_accumulation_steps=a.grad_accum,
        logging_steps=every,
        seed=a.seed,
        cache_teacher_outputs=a.cache_teacher,
        teacher_cache_dtype=a.teacher_cache_dtype,
    )
    training = TrainingArguments(
        output_dir=output_dir,
        **settings.training_overrides(),
        bf16=a.distill_bf16,
        save_strategy="no",
        use_cpu=a.device == "cpu",
        disable_tqdm=True,
    )
    return settings, training


def _distil(run: Run, student, teacher, train, curve_rows, tokenizer, steps: int) -> dict:
    """Distils `student` in place for `steps` optimiser steps; returns the curve, wall time and loss log."""
    from drone_hf import DroneDistillationTrainer

    with tempfile.TemporaryDirectory() as tmp:
        settings, training = distillation_arguments(run.args, steps, tmp)
        every = training.logging_steps
        curve = CurveCallback(lambda model: points(evaluate_glue(model, curve_rows, tokenizer, run.info.name)), every)
        trainer = DroneDistillationTrainer(
            model=student,
            args=training,
            teacher_model=teacher,
            distillation_args=settings,
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[curve],
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    cache = trainer.teacher_cache
    return {
        "teacher_cache": None
        if cache is None
        else {"rows": len(cache), "mib": cache.nbytes / 2**20, "seconds": trainer.teacher_cache_seconds},
        "curve": curve.points,
        "wall_seconds": wall,
        "train_seconds": wall - curve.eval_seconds,
        "curve_eval_seconds": curve.eval_seconds,
        "losses": [entry for entry in trainer.state.log_history if "loss" in entry],
    }


def augmented(train, teacher, tokenizer, a: argparse.Namespace):
    """`train` and `--distill-augment` word-replaced copies of each row (augment.py), the candidates being the
    `--augment-neighbours` nearest words in the teacher's input embeddings."""
    started = time.perf_counter()
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = augment.word_ids(tokens, tokenizer.all_special_ids)
    seen = {token for row in train["input_ids"] for token in row}
    table = augment.neighbour_table(teacher.get_input_embeddings().weight, words, seen, a.augment_neighbours)
    rows = augment.augment(
        train, table, augment.continuation_ids(tokens), a.distill_augment, a.augment_prob, seed=a.seed
    )
    print(
        f"[distill] augmented {len(train)} rows to {len(rows)} (x{a.distill_augment + 1}, p {a.augment_prob}, "
        f"K {a.augment_neighbours}) in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return rows


def stage_distill(run: Run) -> None:
    a, info = run.args, run.info
    todo = [entry for entry in run.distill_entries() if load_entry(entry[3]) is None]
    for name, _, _, path, _ in run.distill_entries():
        if load_entry(path) is not None:
            print(f"[distill] {name}: finished ({path})", flush=True)
    if not todo:
        return
    teacher_entry = run.teacher()
    teacher = load_model(teacher_entry["path"])
    tokenizer = AutoTokenizer.from_pretrained(teacher_entry["path"])
    rows = load_glue(
        info.name, tokenizer, split="train", data_dir=glue_data_dir(info.name), max_length=a.distill_max_length
    ).shuffle(seed=a.seed)
    curve_rows, train = rows.select(range(a.curve_rows)), rows.select(range(a.curve_rows, len(rows)))
    if a.distill_rows:
        train = train.select(range(min(a.distill_rows, len(train))))
    real_rows = len(train)
    if a.distill_augment:
        train = augmented(train, teacher, tokenizer, a)
    dev = run.dev(tokenizer)
    print(f"[distill] calibrating on {a.calibration_samples} train rows (CPU)", flush=True)
    calibration = calibration_batches(info.name, tokenizer, num_samples=a.calibration_samples, seed=a.seed)
    stats = drone_hf.collect_activation_stats(teacher, calibration)
    provenance = {"dataset": f"glue/{info.name}", "split": "train", "num_samples": a.calibration_samples}
    curve_dense = points(evaluate_glue(teacher, curve_rows, tokenizer, info.name))  # the curve's ceiling
    for name, _, steps, path, settings in todo:
        with building(path, settings) as (scratch, result):
            teacher.to("cpu")
            kind = "rank" if "rank" in settings else "target_speedup"
            student = drone_hf.compress_model(
                teacher,
                None if a.distill_method == "svd" else stats,
                method=a.distill_method,
                **{kind: settings[kind]},
                attention=not a.distill_no_attention,
                calibration_info=provenance,
                **(
                    {
                        "sequential": True,
                        "calibration_dataloader": calibration,
                        "sequential_dense_weight": a.distill_dense_weight,
                    }
                    if a.distill_sequential
                    else {}
                ),
            )
            bound = flop_bound(teacher, student, a.seq_len)
            before = points(evaluate_glue(student.to(a.device), dev, tokenizer, info.name))
            print(
                f"[distill] {name}: FLOP bound {bound:.2f}, dev {info.main_metric} {before[info.main_metric]:.2f} "
                f"before; {steps} steps x batch {a.distill_batch_size} x {a.grad_accum} accumulated on {a.device}, "
                f"curve on {len(curve_rows)} held-out train rows every {max(1, steps // a.curve_points)} steps",
                flush=True,
            )
            trained = _distil(run, student, teacher, train, curve_rows, tokenizer, steps)
            after = points(evaluate_glue(student, dev, tokenizer, info.name))
            student.to("cpu").save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            result.update(
                trained,
                speedup_target=settings.get("target_speedup"),
                rank=settings.get("rank"),
                flop_bound=bound,
                steps=steps,
                batch_size=a.distill_batch_size,
                grad_accum=a.grad_accum,
                effective_batch=a.distill_batch_size * a.grad_accum,
                train_rows=len(train),
                **({"real_train_rows": real_rows} if a.distill_augment else {}),
                curve_rows=len(curve_rows),
                curve_dense=curve_dense,
                device=a.device,
                machine=machine_description(),
                dev_before=before,
                dev=after,
            )
            del student
        print(
            f"[distill] {name}: dev {info.main_metric} {before[info.main_metric]:.2f} -> "
            f"{after[info.main_metric]:.2f} in {trained['train_seconds'] / 60:.1f} min -> {path}",
            flush=True,
        )


# Environment variables that change how the allocator or the threads behave, and so the timings: recorded with them.
TIMING_ENV = (
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "OMP_WAIT_POLICY",
)


def timing_environment() -> dict[str, str]:
    """The `TIMING_ENV` variables of this process that differ from what common.py sets unless told otherwise
    (`common.BENCHMARK_ENV`: not recorded, so that older timings keep their keys), e.g.
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` or `OMP_WAIT_POLICY=ACTIVE`."""
    return {
        name: os.environ[name]
        for name in TIMING_ENV
        if os.environ.get(name) and os.environ[name] != BENCHMARK_ENV.get(name)
    }


def time_models(spec: dict) -> dict:
    """One process's timing: loads the dense teacher and the finished models of `spec` (folders as strings, so that
    it can run in a fresh process) and times them round-robin against the dense one at each batch size.

    Returns:
        `dict`: `speeds` (batch -> name -> [`measure_speedups`]'s entry), `flop_bounds`, `load_average`, `threads`.
    """
    set_threads(spec["threads"])
    models = {"dense": load_model(spec["teacher"])}
    models.update({name: load_model(folder) for name, folder in spec["models"].items()})
    tokenizer = AutoTokenizer.from_pretrained(spec["teacher"])
    full = spec["rows"] == "full"
    rows = load_glue(
        spec["task"],
        tokenizer,
        split="train",
        data_dir=glue_data_dir(spec["task"]),
        max_length=spec["seq_len"],
        # full rows: enough text for the largest batch even if every row held one token
        max_samples=max(spec["batch_sizes"]) * (spec["seq_len"] if full else 1),
        seed=spec["seed"],
    )
    bounds = {name: flop_bound(models["dense"], model, spec["seq_len"]) for name, model in models.items()}
    speeds, loads = {}, [load_average()]
    for batch in spec["batch_sizes"]:
        print(
            f"[time] {len(models)} models round-robin on the CPU, batch {batch} x {spec['seq_len']} tokens "
            f"({ROWS_TEXT[spec['rows']]}), {torch.get_num_threads()} threads, median of {spec['repeats']}",
            flush=True,
        )
        speeds[str(batch)] = measure_speedups(
            models,
            tokenizer,
            rows,
            seq_len=spec["seq_len"],
            repeats=spec["repeats"],
            flop_bounds=bounds,
            batch_size=batch,
            rows=spec["rows"],
        )
        loads.append(load_average())
    return {"speeds": speeds, "flop_bounds": bounds, "load_average": loads, "threads": torch.get_num_threads()}


TIME_WORKER = "--time-worker"  # `base_size.py --time-worker SPEC.json OUT.json`: one process of --timing-processes


def time_in_fresh_process(spec: dict) -> dict:
    """[`time_models`] in a new interpreter (`python base_size.py --time-worker SPEC OUT`, this one waiting), started
    as a plain `python` run starts, with this process's environment (allocator and OpenMP variables included)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), TIME_WORKER, str(spec_path), str(out_path)], check=True
        )
        return json.loads(out_path.read_text())


def _median(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine_processes(runs: Sequence[dict]) -> dict[str, dict]:
    """Batch -> name -> entry over several processes' [`time_models`] results: the medians of their latencies and
    speed-ups, each process's speed-up (`processes`), and the flags of `drone_hf.speed.speed_flags` for the median
    speed-up (against the FLOP bound, with the median within-process spread)."""
    combined = {}
    for batch in runs[0]["speeds"]:
        combined[batch] = {}
        for name in runs[0]["speeds"][batch]:
            entries = [run["speeds"][batch][name] for run in runs]
            entry = {
                "latency_ms": _median([e["latency_ms"] for e in entries]),
                "cpu_ms": _median([e.get("cpu_ms") for e in entries]),
                "processes": [e["speedup_measured"] for e in entries],
            }
            if name == "dense":
                entry.update(speedup=1.0, speedup_measured=1.0, cpu_speedup=1.0, flags=[])
            else:
                measured = _median(entry["processes"])
                cpu_speedup = _median([e.get("cpu_speedup") for e in entries])
                spread = _median([e.get("spread") or 0.0 for e in entries])
                flags = speed_flags(measured, runs[0]["flop_bounds"].get(name), cpu_speedup=cpu_speedup, spread=spread)
                entry.update(
                    speedup=None if flags else measured,
                    speedup_measured=measured,
                    cpu_speedup=cpu_speedup,
                    spread=spread,
                    process_range=[min(entry["processes"]), max(entry["processes"])],
                    flags=flags,
                )
            combined[batch][name] = entry
    return combined


def load_over(runs: Sequence[dict]) -> list[float]:
    """The load average before the first of several timing processes and after the last (each process's own pair
    stays in the entry's `processes`)."""
    return [runs[0]["load_average"][0], runs[-1]["load_average"][-1]]


def stage_time(run: Run) -> None:
    a = run.args
    teacher_entry = run.teacher()
    found = run.finished_models()
    path, settings = run.time_entry(found)
    if load_entry(path) is not None:
        print(f"[time] finished for these {len(found)} models: {path}", flush=True)
        return
    spec = {
        "teacher": str(teacher_entry["path"]),
        "models": {name: str(folder) for name, folder in found.items()},
        "task": run.info.name,
        "seq_len": a.seq_len,
        "batch_sizes": a.batch_sizes,
        "repeats": a.latency_repeats,
        "rows": a.timing_rows,
        "threads": torch.get_num_threads(),
        "seed": a.seed,
    }
    with building(path, settings) as (_, result):
        if a.timing_processes == 1:
            timing = time_models(spec)
            speeds = timing["speeds"]
        else:
            runs = []
            for i in range(a.timing_processes):
                print(f"[time] process {i + 1} of {a.timing_processes}", flush=True)
                runs.append(time_in_fresh_process(spec))
            timing, speeds = {**runs[0], "load_average": load_over(runs)}, combine_processes(runs)
            for batch, entries in speeds.items():
                for name, entry in entries.items():
                    if name != "dense":
                        per = ", ".join(f"{value:.2f}" for value in entry["processes"])
                        print(f"[time] batch {batch}, {name}: median {entry['speedup_measured']:.2f}x ({per})")
            result["processes"] = [{"speeds": r["speeds"], "load_average": r["load_average"]} for r in runs]
        result.update(
            models={name: folder.name for name, folder in found.items()},
            speeds=speeds,
            flop_bounds=timing["flop_bounds"],
            threads=timing["threads"],
            cpu=cpu_name(),
            load_average=timing["load_average"],
            machine=machine_description(),
            processes_count=a.timing_processes,
            env=timing_environment(),
        )
    print(f"[time] -> {path}", flush=True)


# ----------------------------------------------------------------------------------------------------------- report


def pareto_front(pairs: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the `(speed-up, metric)` pairs no other pair dominates (at least as fast and as good, better in
    one), ordered by speed-up."""
    front = [
        i
        for i, (speed, metric) in enumerate(pairs)
        if not any(s >= speed and m >= metric and (s > speed or m > metric) for s, m in pairs)
    ]
    return sorted(front, key=lambda i: pairs[i])


def headline(rows: list[dict], budgets: Sequence[float]) -> dict[str, dict | None]:
    """The row with the best measured speed-up (batch 8) within each budget of the dense dev metric with no
    retraining (accuracy-budget rows), and within 1 point with distillation; `None` where no timed row is within."""

    def best(kind: str, drop: float) -> dict | None:
        kept = [r for r in rows if r["kind"] == kind and r.get("speedup_b8") and r["delta"] >= -drop]
        return max(kept, key=lambda r: r["speedup_b8"]) if kept else None

    found = {f"no_retraining_within_{budget:g}": best("budget", budget) for budget in budgets}
    return {**found, "distilled_within_1": best("distilled", 1.0)}


def _speed_columns(row: dict, name: str, timing: dict | None) -> None:
    if timing is None or name not in timing["speeds"][next(iter(timing["speeds"]))]:
        return
    for batch, speeds in timing["speeds"].items():
        entry = speeds[name]
        row[f"speedup_b{batch}"] = entry["speedup"]  # None when flagged (above the FLOP bound, wide spread, ...)
        row[f"speedup_b{batch}_measured"] = entry["speedup_measured"]
        row[f"latency_b{batch}_ms"] = entry["latency_ms"]
        row[f"flags_b{batch}"] = entry["flags"]
        if "processes" in entry:  # --timing-processes: each process's own speed-up
            row[f"speedup_b{batch}_processes"] = entry["processes"]


def report_rows(run: Run, teacher: dict, timing: dict | None) -> list[dict]:
    """The table's rows: dense, the accuracy-budget compressions, the FLOP budgets before and after distillation."""
    main = run.info.main_metric
    dense = teacher["dev"]
    rows = [{"name": "dense", "label": "dense", "kind": "dense", "retraining": "–", "dev": dense, "flop_bound": 1.0}]
    _speed_columns(rows[0], "dense", timing)
    for name, method, budget, path, settings in run.budget_entries():
        entry = load_entry(path)
        if entry is None:
            continue
        timed = f", {settings['deployment_dtype']} timed" if settings.get("deployment_dtype") else ""
        row = {
            "name": name,
            "label": f"{METHOD_LABELS[method]} ≤{budget:g} pt{timed}",
            "short": f"{method} ≤{budget:g}{timed}",
            "kind": "budget",
            "retraining": "none",
            "budget": budget,
            "status": entry["status"],
        }
        if entry["status"] == "done":
            allocation = entry["allocation"]
            row.update(
                dev=entry["dev"],
                heldout_drop=allocation["heldout_drop"],
                cost=f"allocation {allocation['seconds'] / 60:.1f} min",
                allocation=allocation,
            )
            if abs(entry["dev_dense"][main] - dense[main]) > 1e-6:
                row["warning"] = f"the CLI's dense dev {main} {entry['dev_dense'][main]:.2f} is not the teacher's"
        else:
            row.update(dev=None, cost=f"unmet: {entry['message']}")
        _speed_columns(row, name, timing)
        if timing and name in timing["flop_bounds"]:
            row["flop_bound"] = timing["flop_bounds"][name]
        rows.append(row)
    for name, budget, steps, path, _ in run.distill_entries():
        entry = load_entry(path)
        if entry is None:
            continue
        method = METHOD_LABELS[run.args.distill_method]
        before = {
            "name": f"{name}:before",
            "label": f"{method} {budget}",
            "kind": "flop",
            "retraining": "none",
            "dev": entry["dev_before"],
            "flop_bound": entry["flop_bound"],
            "cost": "no evaluations (speed: its distilled twin's)",
            "note": "the same ranks as the distilled row: timed as that model",
        }
        after = {
            "name": name,
            "label": f"{method} {budget}",
            "kind": "distilled",
            "retraining": f"distilled {steps} steps",
            "dev": entry["dev"],
            "flop_bound": entry["flop_bound"],
            "cost": f"distillation {entry['train_seconds'] / 60:.1f} min ({entry['device']})",
            "short": f"{budget} +KD",
            "curve": entry["curve"],
            "curve_dense": entry["curve_dense"],
            "steps": steps,
            "effective_batch": entry["effective_batch"],
            "distill_seconds": entry["train_seconds"],
        }
        _speed_columns(before, name, timing)
        _speed_columns(after, name, timing)
        rows += [before, after]
    for row in rows:
        if row.get("dev"):
            row["metric"] = row["dev"][main]
            row["accuracy"] = row["dev"].get("accuracy") if main != "accuracy" else None
            row["delta"] = row["metric"] - dense[main]
    return rows


def plot(rows: list[dict], front: list[int], path: Path, title: str, xlabel: str, metric: str) -> None:
    """Left: dev metric vs measured speed-up (batch 8), one marker per kind, the Pareto front circled and joined, the
    paper's no-retraining point placed at its drop below our dense model. Right: the distillation curves (metric on
    held-out train rows vs step) with the teacher's value on those rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {
        "dense": ("k", "*"),
        "budget": ("tab:blue", "o"),
        "flop": ("tab:gray", "s"),
        "distilled": ("tab:red", "D"),
    }
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for kind, (color, marker) in markers.items():
        chosen = [r for r in rows if r["kind"] == kind and r.get("speedup_b8") and r.get("metric") is not None]
        if chosen:
            ax.scatter(
                [r["speedup_b8"] for r in chosen], [r["metric"] for r in chosen], c=color, marker=marker, label=kind
            )
        for r in chosen:
            if kind != "flop":  # a FLOP row sits at its distilled twin's speed
                ax.annotate(
                    r.get("short", r["label"]),
                    (r["speedup_b8"], r["metric"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    if front:
        x, y = [rows[i]["speedup_b8"] for i in front], [rows[i]["metric"] for i in front]
        ax.plot(x, y, "k--", lw=0.8)
        ax.scatter(x, y, s=160, facecolors="none", edgecolors="k", lw=0.8, label="Pareto front")
    dense = rows[0]["metric"]
    for drop, style in ((1.0, ":"), (1.5, "-.")):
        ax.axhline(dense - drop, color="gray", ls=style, lw=0.8, label=f"dense − {drop:g}")
    ax.scatter(
        [PAPER["speedup_no_retraining"]],
        [dense - PAPER["drop_no_retraining"]],
        marker="x",
        c="tab:green",
        label="paper, BERT-base MRPC (its drop)",
    )
    ax.set(title=title, xlabel=xlabel, ylabel=f"dev {metric}")
    ax.legend(fontsize=7)
    for r in rows:
        if r["kind"] == "distilled":
            steps = [point["step"] for point in r["curve"]]
            curves.plot(steps, [point[metric] for point in r["curve"]], marker=".", label=r["short"])
    teacher = next((r["curve_dense"][metric] for r in rows if r["kind"] == "distilled"), None)
    if teacher is not None:
        curves.axhline(teacher, color="k", lw=0.8, label="teacher")
    curves.set(title="distillation curves", xlabel="optimiser step", ylabel=f"{metric} on held-out TRAIN rows")
    if teacher is not None:  # the panel is empty without a distilled row
        curves.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def timing_text(timing: dict) -> str:
    """How a time entry's speed-ups were measured, in words (its processes and environment)."""
    processes = timing.get("processes_count", 1)
    text = (
        "dense / model median latency, round-robin in one process"
        if processes == 1
        else f"median over {processes} fresh processes of dense / model median latency, round-robin within each"
    )
    env = timing.get("env") or {}
    return text + "".join(f", {name}={value}" for name, value in env.items())


def report_stem(a: argparse.Namespace, task: str) -> str:
    """The report's file name without suffix: `--report-name`, else
    `base_size_<model>_<task>[_holdoutN][_fullrows]`."""
    if a.report_name:
        return a.report_name
    stem = f"base_size_{a.model}_{task}" + (f"_holdout{a.teacher_holdout}" if a.teacher_holdout else "")
    return stem + ("_fullrows" if a.timing_rows == "full" else "")


def stage_report(run: Run) -> None:
    a, info = run.args, run.info
    teacher = run.teacher()
    found = run.finished_models()
    time_path, _ = run.time_entry(found)
    timing = load_entry(time_path)
    rows = report_rows(run, teacher, timing)
    timed = [i for i, r in enumerate(rows) if r.get("speedup_b8") and r.get("metric") is not None]
    front = [timed[i] for i in pareto_front([(rows[i]["speedup_b8"], rows[i]["metric"]) for i in timed])]
    for i in front:
        rows[i]["pareto"] = True
    main = info.main_metric
    threads = timing["threads"] if timing else None
    speed = (
        f"speed-up = {timing_text(timing)}, {timing['cpu']}, {threads} threads, {a.latency_repeats} rounds, batch 8 x "
        f"{a.seq_len} and 1 x {a.seq_len} tokens ({ROWS_TEXT[a.timing_rows]})"
        if timing
        else "not timed: run `--stages time` (for this set of finished models)"
    )
    dev_rows = teacher["dev_rows"]
    print(
        f"\n{run.name} ({teacher['description']}) fine-tuned on {info.name}; dev {main} on {dev_rows} rows; {speed}; "
        f"FLOP bound = dense / model multiply-adds at {a.seq_len} tokens; budgets on held-out TRAIN rows "
        f"({a.heldout_samples}, {a.allocation_search} search)\n",
        flush=True,
    )
    columns = [(k, h.format(metric=main), f) for k, h, f in COLUMNS if k != "accuracy" or main != "accuracy"]
    table = print_table(rows, columns)
    keep = ("name", "label", "speedup_b8", "speedup_b1", "flop_bound", "delta")
    comparison = {
        "paper": PAPER,
        "ours": {key: {k: r.get(k) for k in keep} if r else None for key, r in headline(rows, a.budgets).items()},
        "differences": [
            f"model: {run.name} ({teacher['description']}), not BERT-base",
            f"hardware: {timing['cpu'] if timing else 'not timed'}, {threads} threads, wall-clock ratios",
            f"budget: measured on {a.heldout_samples} held-out TRAIN rows with a one-standard-error margin "
            f"({a.allocation_search} search), the dev split read only for the final numbers; "
            + (
                f"the teacher was fine-tuned without the {a.teacher_holdout} rows the budget calibrates and checks on"
                if a.teacher_holdout
                else "the teacher was fine-tuned on those rows too"
            ),
            f"calibration: {a.calibration_samples} train rows",
            f"distillation: {a.distill_steps} steps at batch {a.distill_batch_size} x {a.grad_accum}",
        ],
    }
    for row in rows:
        if row["kind"] == "distilled":
            curve = ", ".join(f"{point['step']}: {point[main]:.2f}" for point in row["curve"])
            print(
                f"Curve of {row['name']} ({main} on held-out train rows by step; teacher "
                f"{row['curve_dense'][main]:.2f}): {curve}; {row['steps']} steps x batch {row['effective_batch']} in "
                f"{row['distill_seconds'] / 60:.1f} min"
            )
    print(f"\nPaper: {PAPER['no_retraining']}; {PAPER['distillation']}.")
    for key, entry in comparison["ours"].items():
        text = f"{entry['label']}: {entry['speedup_b8']:.2f}x at {entry['delta']:+.2f} points" if entry else "none"
        print(f"Ours, best {key.replace('_', ' ')}: {text}")
    out = RESULTS if not a.smoke else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(a, info.name)
    png = out / f"{stem}.png"
    plot(
        rows,
        front,
        png,
        f"{run.name} on {info.name}: dev {main} ({dev_rows} rows) vs CPU speed-up"
        + (" (smoke: numbers meaningless)" if a.smoke else ""),
        f"CPU speed-up vs dense (measured, batch 8 x {a.seq_len}, {a.timing_rows} rows, {threads} threads)",
        main,
    )
    payload = {
        "command": command_line(),
        "smoke": a.smoke,
        "model": {"name": run.name, "path": run.model_path, "description": teacher["description"]},
        "task": info.name,
        "metric": main,
        "dev_rows": dev_rows,
        "settings": vars(a),
        "teacher": teacher,
        "timing": {k: timing[k] for k in ("threads", "cpu", "load_average", "machine")} if timing else None,
        "speed": speed,
        "rows": rows,
        "pareto": [rows[i]["name"] for i in front],
        "headline": comparison,
        "table": table,
        "plot": str(png),
        "cache": str(run.root),
    }
    path = out / f"{stem}.json"
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(scratch, path)
    print(f"Wrote {path} and {png}")


def check_one_process() -> None:
    """Exits (`SystemExit`) under a multi-process launch (`WORLD_SIZE` > 1: `accelerate launch`, `torchrun`), where
    every process would build and write the same cache entries."""
    world_size = os.environ.get("WORLD_SIZE", "").strip()
    if world_size.isdigit() and int(world_size) > 1:
        raise SystemExit(
            f"benchmarks/base_size.py runs in one process, but WORLD_SIZE={world_size} says this is one of "
            f"{world_size} launched processes (`accelerate launch` / `torchrun`), which would all write the same "
            "cache entries. Run it directly: `python benchmarks/base_size.py --model ... --task ...` (it fine-tunes "
            "and distils on one GPU when one is present, see --device)."
        )


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [TIME_WORKER]:  # one timing process of --timing-processes (time_in_fresh_process)
        spec_path, out_path = argv[1:3]
        timing = time_models(json.loads(Path(spec_path).read_text()))
        Path(out_path).write_text(json.dumps(timing, default=str))
        return
    check_one_process()
    args = parse_args(argv)
    set_threads(args.threads)
    run = Run.create(args)
    started = time.perf_counter()
    print(
        f"base_size: {args.model} ({run.model_path}) on {args.task}, stages {args.stages}, device {args.device}, "
        f"{torch.get_num_threads()} CPU threads, cache {run.root}" + (" (smoke)" if args.smoke else ""),
        flush=True,
    )
    stages = {"teacher": stage_teacher, "budget": stage_budget, "distill": stage_distill, "time": stage_time}
    for stage in STAGES:
        if stage in args.stages:
            (stages.get(stage) or stage_report)(run)
    print(f"Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
