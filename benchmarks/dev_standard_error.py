"""The dev-split change of saved compressed models against their dense teacher, with a paired bootstrap standard error
per metric: the "Δ ± s.e." columns of the README's base-size MRPC budgets.

Each model scores the same dev rows as the teacher, and every bootstrap resample scores both on the same rows, so the
error is that of the *difference* (the rows' shared difficulty cancels): on MRPC's 408 dev rows about 0.9-1.0 F1 for
a budget model that changes 30 of the teacher's predictions. A drop within about one such error of a budget is not
evidence either way.

    python benchmarks/dev_standard_error.py --task mrpc --teacher <dense model folder> <compressed folder> [...]
        [--max-length 128] [--samples 2000] [--threads 2] [--name dev_standard_error_mrpc]

The dev split comes from `../shared/glue` when it holds the task, else the Hub (`--data-dir` overrides); writes
`benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    command_line,
    glue_data_dir,
    machine_description,
    metric_points,
    print_table,
    script_parser,
    set_threads,
    write_json,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import drone_hf  # noqa: E402, F401  (registers the drone_* model types for from_pretrained)
from drone_hf.evaluation import predict  # noqa: E402
from drone_hf.glue import load_glue  # noqa: E402
from drone_hf.glue_metrics import glue_metrics  # noqa: E402
from drone_hf.glue_tasks import get_glue_task  # noqa: E402
from drone_hf.heldout import paired_standard_error  # noqa: E402


def main(argv=None) -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--teacher", required=True, help="the dense fine-tuned model the others were compressed from")
    parser.add_argument("models", nargs="+", help="saved compressed models (folders loadable by from_pretrained)")
    parser.add_argument("--data-dir", help="a GLUE-layout folder (default: ../shared/glue when it has the task)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (the CLI's default: 128)")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", help="results file name (default: dev_standard_error_<task>)")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples must be >= 2, got {args.samples}.")
    set_threads(args.threads)
    info = get_glue_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    data_dir = args.data_dir or glue_data_dir(info.name)
    dev = load_glue(info.name, tokenizer, split=info.dev_splits[0], data_dir=data_dir, max_length=args.max_length)

    def logits_of(path):
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        return predict(model, dev, tokenizer, batch_size=32, show_progress=f"Dev rows: {Path(path).name}")

    base, labels = logits_of(args.teacher)
    keys = [key for key in glue_metrics(info.name, base, labels) if key != "combined_score"]
    dense = {key: metric_points(info.name, key)(base, labels) for key in keys}
    results, rows = {}, []
    for path in args.models:
        logits, _ = logits_of(path)
        entry = {"changed_predictions": int((logits.argmax(-1) != base.argmax(-1)).sum())}
        row = {"model": Path(path).name, "changed": entry["changed_predictions"]}
        for key in keys:
            metric = metric_points(info.name, key)
            value = metric(logits, labels)
            error = paired_standard_error(metric, base, logits, labels, samples=args.samples)
            entry[key] = {"value": value, "change": value - dense[key], "standard_error": error}
            row[key] = f"{value:.2f} ({value - dense[key]:+.2f} ± {error:.2f})"
        results[str(path)] = entry
        rows.append(row)
    print(
        f"\n{info.name} {info.dev_splits[0]} ({len(labels)} rows), dense: "
        + ", ".join(f"{key} {dense[key]:.2f}" for key in keys)
    )
    columns = [("model", "model", "s"), *[(key, f"{key} (Δ ± s.e.)", "s") for key in keys]]
    print_table(rows, [*columns, ("changed", "predictions changed", "d")])  # prints it
    name = args.name or f"dev_standard_error_{info.name}"
    path = write_json(
        name,
        {
            "command": command_line(),
            "machine": machine_description(),
            "task": info.name,
            "split": info.dev_splits[0],
            "rows": int(len(labels)),
            "bootstrap_samples": args.samples,
            "teacher": args.teacher,
            "dense": dense,
            "models": results,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
