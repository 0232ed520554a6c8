"""Projective clustering of the word embedding (docs/methods.md §3) on a fine-tuned MiniLM: at one embedding budget
(default 60% of its parameters), SVD (k = 1) vs the (k, j) of lowest cost, with and without token-frequency row
weights, each evaluated as is and after a short distillation from the dense teacher; then the same embeddings on top
of DRONE on the encoder, with whole-model size and CPU speed (round-robin, batch 8 x 128 tokens) in one run.
Writes benchmarks/results/embedding_<task>.json.

    python benchmarks/embedding.py --task sst2 --teacher-steps 300 --max-length 64
    python benchmarks/embedding.py --task mrpc --teacher-steps 350 --max-length 128
"""

from __future__ import annotations

import copy
import json
import re
import time

import torch
from common import (
    CACHE,
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
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf import DroneDistillationArguments, token_frequencies
from drone_hf.glue import get_glue_task
from drone_hf.profiling import checkpoint_size_mb, count_parameters


EMB = "bert.embeddings.word_embeddings"
WEIGHTINGS = {"log": ("1+log1p(f)", torch.log1p), "sqrt": ("1+sqrt(f)", torch.sqrt), "linear": ("1+f", lambda c: c)}
EMBEDDING_COLUMNS = [
    ("name", "embedding", "s"),
    ("kj", "(k, j)", "s"),
    ("emb_params_m", "emb params (M)", ".2f"),
    ("rel_cost", "‖A−Â‖²/‖A‖² (%)", ".2f"),
    ("freq_rel_cost", "token-weighted (%)", ".2f"),
    ("metric", "dev metric", ".2f"),
    ("delta", "Δ vs dense", "+.2f"),
    ("metric_ft", "after distillation", ".2f"),
    ("delta_ft", "Δ after", "+.2f"),
    ("fit_s", "fit (s)", ".0f"),
]
MODEL_COLUMNS = [
    ("name", "model", "s"),
    ("params_m", "params (M)", ".2f"),
    ("emb_params_m", "emb params (M)", ".2f"),
    ("encoder_params_m", "encoder params (M)", ".2f"),
    ("checkpoint_mb", "checkpoint (MB)", ".1f"),
    ("metric", "dev metric", ".2f"),
    ("delta", "Δ vs dense", "+.2f"),
    ("metric_ft", "after distillation", ".2f"),
    ("delta_ft", "Δ after", "+.2f"),
    ("latency_ms", "CPU latency (ms)", ".1f"),
    ("speedup", "CPU speed-up", ".2f"),
]


def parse_args():
    parser = script_parser(__doc__)
    add_teacher_arguments(parser)
    parser.add_argument("--ratio", type=float, default=0.6, help="embedding parameters kept (0.6 = -40%%)")
    parser.add_argument("--k-grid", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--n-init", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=12)
    parser.add_argument("--rank", type=int, default=128, help="DRONE rank of every encoder linear (combined rows)")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument(
        "--weightings",
        nargs="*",
        default=["log", "sqrt"],
        choices=list(WEIGHTINGS),
        help="token-frequency row weights to try: 1+log1p(f), 1+sqrt(f), 1+f",
    )
    parser.add_argument(
        "--combined-weighting",
        default="sqrt",
        choices=list(WEIGHTINGS),
        help="the weighted embedding also shown on top of DRONE (needs it in --weightings)",
    )
    add_distillation_arguments(parser, steps=100, steps_help="0 skips the short distillation")
    parser.add_argument("--latency-repeats", type=int, default=20)
    add_threads_argument(parser)
    return parser.parse_args()


def _weights(counts: torch.Tensor, kind: str) -> torch.Tensor:
    # Every row keeps weight >= 1: tokens unseen in the training split still get embedded sensibly.
    return 1 + WEIGHTINGS[kind][1](counts)


def _relative_errors(model, teacher, counts: torch.Tensor) -> tuple[float, float]:
    """Plain and token-frequency-weighted relative squared reconstruction error of the word embedding."""
    dense = teacher.get_submodule(EMB).weight.detach().double()
    layer = model.get_submodule(EMB)
    with torch.no_grad():
        approx = layer(torch.arange(dense.shape[0])).double() if hasattr(layer, "bases") else layer.weight.double()
    rows = (approx - dense).square().sum(1)
    norms = dense.square().sum(1)
    return 100 * float(rows.sum() / norms.sum()), 100 * float((counts * rows).sum() / (counts * norms).sum())


def _distill(student, teacher, train, tokenizer, args) -> float:
    settings = DroneDistillationArguments(
        max_steps=args.distill_steps,
        learning_rate=args.distill_lr,
        per_device_train_batch_size=args.distill_batch_size,
        logging_steps=max(1, args.distill_steps // 4),
    )
    return run_distillation(student, teacher, train, tokenizer, settings, group_by_length=True)


def main():
    args = parse_args()
    set_threads(args.threads)
    info = get_glue_task(args.task)
    started = time.perf_counter()
    teacher, tokenizer, teacher_path, dev, train = load_teacher(
        info, steps=args.teacher_steps, max_length=args.max_length, stages=6
    )
    vocab = teacher.config.vocab_size
    # Token frequencies of the whole training split (no padding in the un-collated rows).
    counts = token_frequencies([{"input_ids": torch.tensor([i for row in train["input_ids"] for i in row])}], vocab)
    print(f"      {int(counts.sum())} training tokens, {int((counts > 0).sum())} of {vocab} ids seen", flush=True)

    def evaluate(model) -> float:
        return dev_metric(model, dev, tokenizer, info)

    dense_metric = evaluate(teacher)
    options = {"k_grid": tuple(args.k_grid), "n_init": args.n_init, "max_iter": args.max_iter}
    # Clusterings and distilled metrics are cached, so an interrupted run (the machine is shared) resumes.
    k_grid = "_".join(map(str, args.k_grid))
    run_dir = (
        CACHE / "embedding" / f"{teacher_path.name}-ratio{args.ratio:g}-k{k_grid}-n{args.n_init}-i{args.max_iter}"
    )

    def variant(name: str, build) -> tuple:
        folder = run_dir / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        if (folder / "fit.json").is_file():
            return AutoModelForSequenceClassification.from_pretrained(folder).eval(), json.loads(
                (folder / "fit.json").read_text()
            )["seconds"]
        start = time.perf_counter()
        model = build()
        seconds = time.perf_counter() - start
        model.save_pretrained(folder)
        (folder / "fit.json").write_text(json.dumps({"seconds": seconds}))
        return model, seconds

    print(f"[2/6] embedding at ratio {args.ratio}: SVD, projective clustering over k in {args.k_grid}", flush=True)
    variants, fit = {}, {}
    variants["SVD (k=1)"], fit["SVD (k=1)"] = variant(
        "SVD (k=1)",
        lambda: drone_hf.compress_model(
            teacher, None, method="svd", embedding=args.ratio, embedding_options={**options, "k_grid": (1,)}
        ),
    )
    variants["projective"], fit["projective"] = variant(
        "projective",
        lambda: drone_hf.compress_model(teacher, None, method="svd", embedding=args.ratio, embedding_options=options),
    )
    best = variants["projective"].config.drone_embedding
    for kind in args.weightings:
        name = f"projective, weights {WEIGHTINGS[kind][0]}"
        variants[name], fit[name] = variant(
            name,
            lambda kind=kind: drone_hf.compress_model(
                teacher,
                None,
                method="svd",
                embedding=(best["k"], best["j"]),
                embedding_options={**options, "weights": _weights(counts, kind)},
            ),
        )

    print("[3/6] evaluating the embedding-only models", flush=True)
    emb_rows = [
        {
            "name": "dense",
            "kj": "–",
            "emb_params_m": vocab * teacher.config.hidden_size / 1e6,
            "rel_cost": 0.0,
            "freq_rel_cost": 0.0,
            "metric": dense_metric,
            "delta": 0.0,
        }
    ]
    for name, model in variants.items():
        spec, report = model.config.drone_embedding, model.config.drone_calibration["embedding"]
        rel, freq_rel = _relative_errors(model, teacher, counts)
        row = {
            "name": name,
            "kj": f"({spec['k']}, {spec['j']})",
            "emb_params_m": report["parameters"] / 1e6,
            "rel_cost": rel,
            "freq_rel_cost": freq_rel,
            "metric": evaluate(model),
            "fit_s": fit[name],
            "report": report,
        }
        row["delta"] = row["metric"] - dense_metric
        emb_rows.append(row)
        print(f"      {name} {row['kj']}: {row['metric']:.2f} ({row['delta']:+.2f}), error {rel:.2f}%", flush=True)

    print(
        f"[4/6] DRONE rank {args.rank} on the encoder (+ each embedding), calibrated on "
        f"{args.calibration_samples} rows",
        flush=True,
    )
    stats = drone_hf.collect_activation_stats(
        teacher, calibration_batches(info.name, tokenizer, num_samples=args.calibration_samples)
    )
    drone = drone_hf.compress_model(teacher, stats, rank=args.rank)
    models = {"dense": teacher, f"DRONE r{args.rank}": drone}
    # Compressing the embedding-only models further gives the same factors as one call with both budgets
    # (compress_model(teacher, stats, rank=..., embedding=...)), without clustering again.
    models[f"DRONE r{args.rank} + SVD emb"] = drone_hf.compress_model(variants["SVD (k=1)"], stats, rank=args.rank)
    models[f"DRONE r{args.rank} + projective emb"] = drone_hf.compress_model(
        variants["projective"], stats, rank=args.rank
    )
    weighted = f"projective, weights {WEIGHTINGS[args.combined_weighting][0]}"
    if weighted in variants:
        models[f"DRONE r{args.rank} + {weighted} emb"] = drone_hf.compress_model(
            variants[weighted], stats, rank=args.rank
        )
    model_rows = {
        name: {"name": name, "metric": evaluate(m) if name != "dense" else dense_metric} for name, m in models.items()
    }

    if args.distill_steps:
        print(f"[5/6] distilling each compressed model for {args.distill_steps} steps", flush=True)
        targets = [*[("emb", name) for name in variants], *[("model", name) for name in list(models)[1:]]]
        done_path = run_dir / f"distilled-steps{args.distill_steps}-lr{args.distill_lr:g}.json"
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
        for kind, name in targets:
            if f"{kind}:{name}" not in done:
                student = copy.deepcopy(variants[name] if kind == "emb" else models[name]).train()
                seconds = _distill(student, teacher, train, tokenizer, args)
                done[f"{kind}:{name}"] = {"metric": evaluate(student), "seconds": seconds}
                done_path.write_text(json.dumps(done, indent=1))
            metric, seconds = done[f"{kind}:{name}"]["metric"], done[f"{kind}:{name}"]["seconds"]
            row = next(r for r in emb_rows if r["name"] == name) if kind == "emb" else model_rows[name]
            row.update(metric_ft=metric, delta_ft=metric - dense_metric, distill_s=seconds)
            print(f"      {name}: {metric:.2f} after {seconds / 60:.1f} min", flush=True)

    print(f"[6/6] size and CPU timing (batch 8 x 128 tokens, {torch.get_num_threads()} threads)", flush=True)
    timed = {**models, "projective emb only": variants["projective"]}
    projective = next(r for r in emb_rows if r["name"] == "projective")
    model_rows["projective emb only"] = {
        "name": "projective emb only",
        "metric": projective["metric"],
        "metric_ft": projective.get("metric_ft"),
    }
    speed = measure_speedups(timed, tokenizer, dev, seq_len=128, repeats=args.latency_repeats)
    for name, model in timed.items():
        row = model_rows[name]
        row.update(
            params_m=count_parameters(model) / 1e6,
            emb_params_m=count_parameters(model, EMB) / 1e6,
            encoder_params_m=count_parameters(model, "bert.encoder.") / 1e6,
            checkpoint_mb=checkpoint_size_mb(model),
            **speed[name],
            delta=row["metric"] - dense_metric,
        )
        if row.get("metric_ft") is not None:
            row["delta_ft"] = row["metric_ft"] - dense_metric

    metric = metric_description(info, dev)
    print(
        f"\nMiniLM-L6 fine-tuned on {info.name}, {metric}. Embedding budget {args.ratio:g} of "
        f"{vocab}x{teacher.config.hidden_size}; k grid {args.k_grid}, n_init {args.n_init}, "
        f"max_iter {args.max_iter}; distillation {args.distill_steps} steps (batch {args.distill_batch_size}, "
        f"lr {args.distill_lr:g}, hidden MSE + KL). Error columns: relative squared reconstruction error of the "
        "embedding rows, plain and weighted by training-token frequency.\n"
    )
    emb_table = print_table(emb_rows, EMBEDDING_COLUMNS)
    print()
    ordered = [model_rows[name] for name in timed]
    model_table = print_table(ordered, MODEL_COLUMNS)
    total = time.perf_counter() - started
    print(f"\nTotal time {total / 60:.1f} min.")
    path = write_json(
        f"embedding_{info.name}",
        {
            "command": command_line(),
            "task": info.name,
            "metric": metric,
            "teacher": str(teacher_path),
            "arguments": vars(args),
            "machine": machine_description(),
            "token_frequencies": "whole training split",
            "embedding_rows": emb_rows,
            "model_rows": ordered,
            "embedding_table": emb_table,
            "model_table": model_table,
            "total_seconds": total,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
