"""How much narrower can attention get on a task? DRONE attention alone (every other layer dense) at several per-head
query/key widths, the data-free SVD of `W_Q W_Kᵀ` at the same widths, and each layer alone at one width.

It backs the README's explanation of the MRPC collapse in the benchmark report: sentence-pair matching needs wide
attention, so an evaluation-free FLOP budget that narrows it can break the classifier. Writes
benchmarks/results/attention_widths_<task>.json.

    python benchmarks/attention_widths.py --task mrpc --teacher-steps 350 --max-length 128
    python benchmarks/attention_widths.py --task sst2 --teacher-steps 300 --max-length 64
"""

from __future__ import annotations

from common import (
    add_teacher_arguments,
    add_threads_argument,
    calibration_batches,
    command_line,
    dev_metric,
    load_teacher,
    machine_description,
    metric_description,
    print_table,
    script_parser,
    set_threads,
    write_json,
)

import drone_hf
from drone_hf.glue import get_glue_task


COLUMNS = [("name", "model", "s"), ("metric", "dev metric", ".2f"), ("delta", "Δ vs dense", "+.2f")]


def main():
    parser = script_parser(__doc__)
    add_teacher_arguments(parser)
    add_threads_argument(parser)
    parser.add_argument("--widths", nargs="+", type=int, default=[24, 16, 8], help="per-head query/key widths")
    parser.add_argument("--layer-width", type=int, default=16, help="width of the one-layer-at-a-time rows")
    parser.add_argument("--calibration-samples", type=int, default=512)
    args = parser.parse_args()
    set_threads(args.threads)
    info = get_glue_task(args.task)
    teacher, tokenizer, teacher_path, dev, _ = load_teacher(
        info, steps=args.teacher_steps, max_length=args.max_length, stages=3
    )
    print(f"[2/3] calibrating on {args.calibration_samples} training rows", flush=True)
    batches = calibration_batches(info.name, tokenizer, num_samples=args.calibration_samples)
    stats = drone_hf.collect_activation_stats(teacher, batches)
    dense = dev_metric(teacher, dev, tokenizer, info)
    rows = [{"name": "dense", "metric": dense}]
    print(f"[3/3] evaluating on {metric_description(info, dev)}", flush=True)
    for width in args.widths:
        for method in ("drone", "svd"):
            model = drone_hf.compress_model(
                teacher, stats if method == "drone" else None, method=method, attention_rank=width
            )
            rows.append(
                {
                    "name": f"{method.upper()} attention, every layer, width {width}",
                    "width": width,
                    "method": method,
                    "metric": dev_metric(model, dev, tokenizer, info),
                }
            )
    for layer in range(teacher.config.num_hidden_layers):
        block = f"bert.encoder.layer.{layer}.attention.self"
        model = drone_hf.compress_model(teacher, stats, attention_ranks={block: args.layer_width})
        rows.append(
            {
                "name": f"DRONE attention, layer {layer} only, width {args.layer_width}",
                "layer": layer,
                "width": args.layer_width,
                "method": "drone",
                "metric": dev_metric(model, dev, tokenizer, info),
            }
        )
    for row in rows:
        row["delta"] = row["metric"] - dense
    head_size = teacher.config.hidden_size // teacher.config.num_attention_heads
    print(f"\n{info.name}: {metric_description(info, dev)}; dense head width {head_size}; nothing else compressed\n")
    table = print_table(rows, COLUMNS)
    path = write_json(
        f"attention_widths_{info.name}",
        {
            "command": command_line(),
            "task": info.name,
            "metric": metric_description(info, dev),
            "teacher": str(teacher_path),
            "head_size": head_size,
            "machine": machine_description(),
            "rows": rows,
            "table": table,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
