"""Factorisation methods side by side at the same shapes: each method compresses one teacher at the same FLOP budgets
(`target_speedup`) or uniform ranks, with no evaluations in the loop, and every result is scored on held-out train
rows the teacher never saw (the rows a method is chosen on) and then on the dev split (final numbers only).

Per row: the metric's change against the teacher with a paired bootstrap error, the KL divergence from the teacher's
predictions and how many of them change, on both splits. One calibration (the same statistics) serves every method.

    python benchmarks/method_comparison.py --task mrpc --teacher <dense model folder> --data-dir <teacher's train rows>
        --heldout-dir <held-out rows> [--methods drone drone-act svd] [--speedups 2 3] [--ranks 256]
        [--heldout-samples 1024] [--calibration-samples 512] [--attention] [--threads 2] [--name NAME]

`--data-dir` and `--heldout-dir` are GLUE-layout folders whose `train.tsv` give the calibration rows and the held-out
rows (`benchmarks/base_size.py --teacher-holdout N` writes both, each with the task's dev files); the dev split is read
from `--data-dir`. Writes `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    command_line,
    machine_description,
    metric_points,
    print_table,
    script_parser,
    set_threads,
    write_json,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import drone_hf  # noqa: E402
from drone_hf.evaluation import iter_batches, predict  # noqa: E402
from drone_hf.glue import load_glue  # noqa: E402
from drone_hf.glue_tasks import get_glue_task  # noqa: E402
from drone_hf.heldout import paired_standard_error  # noqa: E402
from drone_hf.methods import method_names  # noqa: E402
from drone_hf.profiling import flop_speedup_bound  # noqa: E402


def kl_from_teacher(teacher_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean `KL(teacher || model)` of the predicted class distributions, in nats."""
    p = torch.from_numpy(teacher_logits).double().log_softmax(-1)
    q = torch.from_numpy(logits).double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def score(task: str, key: str, base, logits, labels) -> dict:
    """The metric `key` in points, its change against `base` with a paired bootstrap error, KL and changed rows."""

    metric = metric_points(task, key)
    value = metric(logits, labels)
    return {
        "value": value,
        "change": value - metric(base, labels),
        "standard_error": paired_standard_error(metric, base, logits, labels, samples=1000),
        "kl": kl_from_teacher(base, logits),
        "changed_predictions": int((logits.argmax(-1) != base.argmax(-1)).sum()),
    }


def main(argv=None) -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="the dense fine-tuned model")
    parser.add_argument("--data-dir", required=True, help="GLUE-layout folder: train rows calibrate, dev scores")
    parser.add_argument("--heldout-dir", required=True, help="GLUE-layout folder whose train rows are held out")
    parser.add_argument("--methods", nargs="+", default=["drone", "drone-act", "svd"], choices=method_names())
    parser.add_argument("--speedups", type=float, nargs="*", default=[2.0, 3.0], help="target_speedup values")
    parser.add_argument("--ranks", type=int, nargs="*", default=[], help="uniform ranks of every encoder linear")
    parser.add_argument("--attention", action="store_true", help="also factor the attention scores (FLOP budgets)")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--heldout-samples", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", help="results file name (default: method_comparison_<task>)")
    args = parser.parse_args(argv)
    if not args.speedups and not args.ranks:
        parser.error("give at least one of --speedups and --ranks.")
    if any(s <= 1 for s in args.speedups) or any(r < 1 for r in args.ranks):
        parser.error("--speedups must be > 1 and --ranks >= 1.")
    set_threads(args.threads)
    info = get_glue_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    rows = {"max_length": args.max_length, "seed": 0}
    calibration = load_glue(
        info.name, tokenizer, split="train", data_dir=args.data_dir, **rows, max_samples=args.calibration_samples
    )
    splits = {
        "heldout": load_glue(
            info.name, tokenizer, split="train", data_dir=args.heldout_dir, **rows, max_samples=args.heldout_samples
        ),
        "dev": load_glue(
            info.name, tokenizer, split=info.dev_splits[0], data_dir=args.data_dir, max_length=args.max_length
        ),
    }
    key = info.main_metric
    start = time.perf_counter()
    stats = drone_hf.collect_activation_stats(
        teacher, list(iter_batches(calibration, tokenizer, batch_size=32, sort_by_length=True))
    )
    print(f"statistics of {len(calibration)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    base = {split: predict(teacher, data, tokenizer, batch_size=32) for split, data in splits.items()}
    budgets = [("target_speedup", s) for s in args.speedups] + [("rank", r) for r in args.ranks]
    results, table = [], []
    for budget, value in budgets:
        for method in args.methods:
            start = time.perf_counter()
            options = {"attention": args.attention} if budget == "target_speedup" else {"attention": False}
            model = drone_hf.compress_model(teacher, stats, method=method, **{budget: value}, **options)
            seconds = time.perf_counter() - start
            entry = {
                "budget": budget,
                "value": value,
                "method": method,
                "flop_bound": flop_speedup_bound(teacher.config, model.config, 128),
                "compress_seconds": seconds,
            }
            row = {"budget": f"{budget}={value:g}", "method": method, "bound": f"{entry['flop_bound']:.2f}"}
            for split, data in splits.items():
                logits, _ = predict(model, data, tokenizer, batch_size=32)
                base_logits, labels = base[split]
                entry[split] = score(info.name, key, base_logits, logits, labels)
                found = entry[split]
                row[split] = f"{found['change']:+.2f} ± {found['standard_error']:.2f}"
                row[f"{split}_kl"] = f"{found['kl']:.4f}"
                row[f"{split}_changed"] = found["changed_predictions"]
            results.append(entry)
            table.append(row)
            print(row, flush=True)
    print(f"\n{info.name}: {key} change against the teacher (paired bootstrap s.e.), KL(teacher || model)")
    columns = [("budget", "budget", "s"), ("method", "method", "s"), ("bound", "FLOP bound", "s")]
    for split, data in splits.items():
        columns += [
            (split, f"{split} Δ{key} ({len(data)} rows)", "s"),
            (f"{split}_kl", f"{split} KL", "s"),
            (f"{split}_changed", f"{split} changed", "d"),
        ]
    print_table(table, columns)
    path = write_json(
        args.name or f"method_comparison_{info.name}",
        {
            "command": command_line(),
            "machine": machine_description(),
            "task": info.name,
            "metric": key,
            "teacher": args.teacher,
            "rows": {split: len(data) for split, data in splits.items()},
            "calibration_rows": len(calibration),
            "results": results,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
