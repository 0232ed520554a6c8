"""Factorisation + feature distillation (docs/methods.md §2) on a fine-tuned MiniLM: dense vs DRONE vs
DRONE+distillation, with plain SVD (+distillation) at the same ranks beside them. One table, speed measured in one run
(round-robin, batch 8 x 128 tokens). Writes benchmarks/results/distillation_<task>.json.

    python benchmarks/distillation.py --task sst2 --teacher-steps 300 --max-length 64 --rank 64 --distill-steps 300
    python benchmarks/distillation.py --task mrpc --teacher-steps 350 --max-length 128 --target-speedup 2
"""

from __future__ import annotations

import copy
import time

import torch
from common import (
    add_distillation_arguments,
    add_teacher_arguments,
    add_threads_argument,
    calibration_batches,
    command_line,
    dev_metric,
    load_teacher,
    machine_description,
    measure_speedups,
    metric_description,
    print_table,
    run_distillation,
    script_parser,
    set_threads,
    write_json,
)

import drone_hf
from drone_hf import DroneDistillationArguments
from drone_hf.glue import get_glue_task
from drone_hf.profiling import count_parameters, flop_speedup_bound


COLUMNS = [
    ("name", "model", "s"),
    ("encoder_params_m", "encoder params (M)", ".2f"),
    ("metric", "dev metric", ".2f"),
    ("delta", "Δ vs dense", "+.2f"),
    ("speedup", "CPU speed-up (measured)", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
    ("distill_minutes", "distillation (min)", ".1f"),
]


def parse_args():
    parser = script_parser(__doc__)
    add_teacher_arguments(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--rank", type=int, help="one rank for every encoder linear")
    budget.add_argument("--target-speedup", type=float, help="multiply-add reduction target (closed-form allocation)")
    parser.add_argument("--attention-rank", type=int, help="with --rank: per-head query/key rank (DRONE attention)")
    parser.add_argument("--calibration-samples", type=int, default=512)
    add_distillation_arguments(parser, steps=300)
    parser.add_argument("--alpha-hidden", type=float, default=1.0)
    parser.add_argument("--alpha-kl", type=float, default=1.0)
    parser.add_argument("--alpha-task", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--skip-svd", action="store_true", help="DRONE rows only")
    parser.add_argument("--group-by-length", action="store_true", help="distillation batches of similar lengths")
    parser.add_argument("--output-name", help="results file name (default: distillation_<task>)")
    add_threads_argument(parser)
    return parser.parse_args()


def _distill(student, teacher, train, tokenizer, args):
    settings = DroneDistillationArguments(
        alpha_hidden=args.alpha_hidden,
        alpha_kl=args.alpha_kl,
        alpha_task=args.alpha_task,
        temperature=args.temperature,
        max_steps=args.distill_steps,
        learning_rate=args.distill_lr,
        per_device_train_batch_size=args.distill_batch_size,
        logging_steps=max(1, args.distill_steps // 5),
    )
    return run_distillation(student, teacher, train, tokenizer, settings, group_by_length=args.group_by_length)


def main():
    args = parse_args()
    set_threads(args.threads)
    info = get_glue_task(args.task)
    started = time.perf_counter()
    teacher, tokenizer, teacher_path, dev, train = load_teacher(
        info, steps=args.teacher_steps, max_length=args.max_length, stages=5
    )

    print(f"[2/5] calibrating on {args.calibration_samples} training rows and compressing", flush=True)
    batches = calibration_batches(info.name, tokenizer, num_samples=args.calibration_samples)
    stats = drone_hf.collect_activation_stats(teacher, batches)
    budget = (
        {"rank": args.rank, "attention_rank": args.attention_rank}
        if args.rank is not None
        else {"target_speedup": args.target_speedup}
    )
    drone = drone_hf.compress_model(teacher, stats, **budget)
    ranks = {**(drone.config.drone_ranks or {}), **(drone.config.drone_attention_ranks or {})}
    models = {"dense": teacher, "DRONE": drone}
    if not args.skip_svd:
        models["SVD (same ranks)"] = drone_hf.compress_model(teacher, None, method="svd", ranks=ranks)

    print(f"[3/5] evaluating, then distilling each compressed model for {args.distill_steps} steps", flush=True)
    rows = {name: {"name": name} for name in models}
    for name, model in list(models.items()):
        rows[name]["metric"] = dev_metric(model, dev, tokenizer, info)
        if name == "dense":
            continue
        student = copy.deepcopy(model)
        seconds = _distill(student, teacher, train, tokenizer, args)
        distilled = f"{name} + distillation"
        models[distilled] = student
        rows[distilled] = {
            "name": distilled,
            "distill_minutes": seconds / 60,
            "distill_steps": args.distill_steps,
            "metric": dev_metric(student, dev, tokenizer, info),
        }
        print(f"      {distilled}: {rows[distilled]['metric']:.2f} after {seconds / 60:.1f} min", flush=True)

    print(f"[4/5] timing round-robin (batch 8 x 128 tokens, {torch.get_num_threads()} threads)", flush=True)
    speed = measure_speedups(models, tokenizer, dev, seq_len=128, repeats=args.latency_repeats)
    ordered = [rows[name] for name in models]
    for row in ordered:
        model = models[row["name"]]
        row.update(
            **speed[row["name"]],
            flop_bound=flop_speedup_bound(teacher.config, model.config, 128),
            encoder_params_m=count_parameters(model, "bert.encoder.") / 1e6,
            delta=row["metric"] - rows["dense"]["metric"],
        )

    print("[5/5] results\n", flush=True)
    metric = metric_description(info, dev)
    budget_text = ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None)
    print(
        f"MiniLM-L6 fine-tuned on {info.name}, {metric}; compression: {budget_text} ({len(ranks)} modules); "
        f"distillation: {args.distill_steps} steps, batch {args.distill_batch_size}, lr {args.distill_lr:g}, "
        f"alpha hidden/kl/task = {args.alpha_hidden}/{args.alpha_kl}/{args.alpha_task}, T={args.temperature}\n"
    )
    table = print_table(ordered, COLUMNS)
    print(f"\nTotal time {(time.perf_counter() - started) / 60:.1f} min.")
    path = write_json(
        args.output_name or f"distillation_{info.name}",
        {
            "command": command_line(),
            "task": info.name,
            "metric": metric,
            "teacher": str(teacher_path),
            "budget": budget,
            "ranks": ranks,
            "arguments": vars(args),
            "machine": machine_description(),
            "rows": ordered,
            "table": table,
            "total_seconds": time.perf_counter() - started,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
