"""End-to-end demo (`make demo`): fine-tune the embedded MiniLM on SST-2, compress it with SVD and DRONE at a few
uniform ranks, and print one table measured in one run. Writes benchmarks/results/demo.json.

    python benchmarks/demo.py [--task sst2] [--steps 400] [--ranks 96 128 160] [--calibration-samples 512]
"""

from __future__ import annotations

import os
import time


# Before torch loads libgomp, which reads it once: no spin-waiting threads on a shared machine (see the README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    calibration_batches,
    dev_metric,
    finetune,
    glue_data_dir,
    machine_description,
    measure_speedups,
    metric_description,
    print_table,
    script_parser,
    write_json,
)
from transformers import AutoModelForSequenceClassification  # noqa: E402

import drone_hf  # noqa: E402
from drone_hf.evaluation import predict  # noqa: E402
from drone_hf.glue import get_glue_task, load_glue  # noqa: E402
from drone_hf.profiling import checkpoint_size_mb, count_parameters, flop_speedup_bound  # noqa: E402


COLUMNS = [
    ("method", "method", "s"),
    ("ranks", "ranks", "s"),
    ("encoder_params_m", "encoder params (M)", ".2f"),
    ("checkpoint_mb", "checkpoint MB", ".1f"),
    ("metric", "dev metric", ".2f"),
    ("delta", "Δ vs dense", "+.2f"),
    ("speedup", "CPU speed-up (measured, wall clock)", ".2f"),
    ("cpu_speedup", "CPU-time ratio", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
]


def parse_args():
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 32)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[96, 128, 160])
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the timing batch (batch 8)")
    parser.add_argument("--output", default="outputs/demo", help="where the reloadable DRONE checkpoint is saved")
    return parser.parse_args()


def main():
    args = parse_args()
    info = get_glue_task(args.task)
    started = time.perf_counter()
    print(f"[1/5] fine-tuning MiniLM on {info.name} ({args.steps} steps, cached after the first run)", flush=True)
    teacher, tokenizer, teacher_path, train_seconds = finetune(info.name, steps=args.steps, max_length=64)
    dev_split = info.dev_splits[0]
    dev = load_glue(info.name, tokenizer, split=dev_split, data_dir=glue_data_dir(info.name))

    print(f"[2/5] calibrating on {args.calibration_samples} training examples", flush=True)
    batches = calibration_batches(info.name, tokenizer, num_samples=args.calibration_samples)
    t0 = time.perf_counter()
    stats = drone_hf.collect_activation_stats(teacher, batches, show_progress=True)
    calibration_seconds = time.perf_counter() - t0
    provenance = {"dataset": f"glue/{info.name}", "split": "train", "num_samples": args.calibration_samples, "seed": 0}

    print("[3/5] compressing (SVD and DRONE at each rank) and evaluating on the dev split", flush=True)
    models = {"dense": teacher}
    rows = [{"name": "dense", "method": "dense", "ranks": "–"}]
    for rank in args.ranks:
        for method in ("svd", "drone"):
            name = f"{method}-{rank}"
            models[name] = drone_hf.compress_model(
                teacher, stats if method == "drone" else None, method=method, rank=rank, calibration_info=provenance
            )
            rows.append(
                {"name": name, "method": method.upper() if method == "svd" else "DRONE", "ranks": f"{rank} (all)"}
            )
    for row in rows:
        model = models[row["name"]]
        row["metric"] = dev_metric(model, dev, tokenizer, info)
        row["encoder_params_m"] = count_parameters(model, "bert.encoder.") / 1e6
        row["checkpoint_mb"] = checkpoint_size_mb(model)
        row["flop_bound"] = flop_speedup_bound(teacher.config, model.config, args.seq_len)

    print(
        f"[4/5] timing all models round-robin (batch 8, sequence {args.seq_len}, {torch.get_num_threads()} threads)",
        flush=True,
    )
    bounds = {row["name"]: row["flop_bound"] for row in rows}
    speed = measure_speedups(
        models, tokenizer, dev, seq_len=args.seq_len, repeats=args.latency_repeats, flop_bounds=bounds
    )
    for row in rows:
        row.update(speed[row["name"]])
        row["delta"] = row["metric"] - rows[0]["metric"]

    print(f"[5/5] saving DRONE rank {args.ranks[len(args.ranks) // 2]} to {args.output} and reloading it", flush=True)
    saved_name = f"drone-{args.ranks[len(args.ranks) // 2]}"
    models[saved_name].save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    reloaded, loading_info = AutoModelForSequenceClassification.from_pretrained(args.output, output_loading_info=True)
    before, _ = predict(models[saved_name], dev, tokenizer)
    after, _ = predict(reloaded, dev, tokenizer)
    reload_ok = bool(np.array_equal(before, after)) and not any(
        loading_info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    )
    if not reload_ok:
        raise SystemExit(f"Reloaded model differs from the saved one: {loading_info}")

    metric_name = metric_description(info, dev)
    print(
        f"\nMiniLM-L6 (all-MiniLM-L6-v2) fine-tuned on {info.name}, {metric_name}; speed-up = dense latency / model "
        f"latency, batch 8 x {args.seq_len} tokens, CPU, one run, order shuffled every round; a speed-up shown as – "
        "was withheld (see the timing note above):\n"
    )
    table = print_table(rows, COLUMNS)
    print(
        f"\nReload check: {type(reloaded).__name__} from {args.output}: identical logits on all {len(dev)} dev "
        f"examples, no missing/unexpected keys. Total time {time.perf_counter() - started:.0f} s."
    )
    path = write_json(
        "demo",
        {
            "task": info.name,
            "metric": metric_name,
            "teacher": str(teacher_path),
            "fine_tune_seconds": train_seconds,
            "calibration_seconds": calibration_seconds,
            "seq_len": args.seq_len,
            "machine": machine_description(),
            "rows": rows,
            "table": table,
            "reload_check": {"path": args.output, "identical_logits": reload_ok},
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
