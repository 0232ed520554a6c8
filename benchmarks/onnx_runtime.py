"""ONNX Runtime: dense vs DRONE MiniLM (SST-2) in PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime dynamic int8,
exported with `drone_hf.export_onnx(..., optimize=True, quantize="int8")`. Fused-op counts, dev accuracy of every
variant, and latency at batch 1 x 128 and batch 8 x 128, all timed round-robin in one process (2 threads by default).
Writes benchmarks/results/<--name>.json (onnx_runtime.json by default).

    python benchmarks/onnx_runtime.py [--teacher DIR] [--speedups 1.5 2] [--rank 96] [--budget-model DIR ...]
        [--threads 2] [--name onnx_runtime]

Without `--teacher`, the demo's MiniLM SST-2 teacher (`common.finetune`, cached in .cache/finetuned). Each
`--budget-model` (a `drone-hf compress --max-accuracy-drop B` output of the same teacher, or a distilled student)
adds rows of its own.
"""

from __future__ import annotations

import os
import tempfile
import time


# Before torch loads libgomp, which reads it once: no spin-waiting threads on a shared machine (see the README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from common import (  # noqa: E402
    calibration_batches,
    command_line,
    given_or_finetuned_teacher,
    glue_data_dir,
    latency_inputs,
    load_budget_models,
    machine_description,
    print_table,
    script_parser,
    write_json,
)

import drone_hf  # noqa: E402
from drone_hf.evaluation import iter_batches, predict  # noqa: E402
from drone_hf.glue import load_glue  # noqa: E402
from drone_hf.onnx_export import INT8_FILE, MODEL_FILE, export_onnx  # noqa: E402
from drone_hf.profiling import flop_speedup_bound, time_round_robin  # noqa: E402
from drone_hf.speed import compare_recorded  # noqa: E402


COLUMNS = [
    ("model", "model", "s"),
    ("runtime", "runtime", "s"),
    ("attention", "fused attention", "s"),
    ("nodes", "graph nodes", "d"),
    ("accuracy", "dev acc.", ".2f"),
    ("b1_ms", "b1×128 ms", ".1f"),
    ("b1_speedup", "b1 vs dense torch", ".2f"),
    ("b1_same", "b1 vs dense same runtime", ".2f"),
    ("b8_ms", "b8×128 ms", ".1f"),
    ("b8_speedup", "b8 vs dense torch", ".2f"),
    ("b8_same", "b8 vs dense same runtime", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
]


def parse_args():
    parser = script_parser(__doc__)
    parser.add_argument("--teacher", help="fine-tuned MiniLM SST-2 folder (default: the demo's, fine-tuned once)")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0], help="DRONE --target-speedup values")
    parser.add_argument("--rank", type=int, default=96, help="the uniform-rank DRONE model (every linear)")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats-b1", type=int, default=30)
    parser.add_argument("--repeats-b8", type=int, default=10)
    parser.add_argument(
        "--budget-model", nargs="*", default=[], help="models compressed from the same teacher: rows of their own"
    )
    parser.add_argument("--name", default="onnx_runtime", help="results file: benchmarks/results/NAME.json")
    return parser.parse_args()


def ort_session(path, threads: int):
    """A CPU session with `threads` intra-op threads that do not spin between ops (as torch's with
    OMP_WAIT_POLICY=PASSIVE): a spinning pool would bill its idle spinning to the next model of the round."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_accuracy(session, dev, tokenizer) -> float:
    names = {entry.name for entry in session.get_inputs()}
    correct = 0
    for batch in iter_batches(dev, tokenizer, batch_size=64, sort_by_length=True):
        feed = {key: value.numpy() for key, value in batch.items() if key in names}
        correct += int((session.run(None, feed)[0].argmax(-1) == batch["labels"].numpy()).sum())
    return 100 * correct / len(dev)


def torch_accuracy(model, dev, tokenizer) -> float:
    logits, labels = predict(model, dev, tokenizer)
    return 100 * float((logits.argmax(-1) == labels).mean())


def round_robin_calls(rows: list[dict], inputs: dict[str, torch.Tensor]) -> dict:
    """`"<model> | <runtime>"` -> a zero-argument call running the row's PyTorch model (`_torch`, under inference mode)
    or ONNX Runtime session (`_session`, fed the inputs it declares) on `inputs`: what `time_round_robin` times."""
    calls = {}
    for row in rows:
        if "_torch" in row:

            def call(model=row["_torch"]):
                with torch.inference_mode():
                    model(**inputs)

        else:
            session = row["_session"]
            wanted = {entry.name for entry in session.get_inputs()}
            feed = {key: value.numpy() for key, value in inputs.items() if key in wanted}

            def call(session=session, feed=feed):
                session.run(None, feed)

        calls[f"{row['model']} | {row['runtime']}"] = call
    return calls


def write_results(
    name: str, settings: dict, rows: list[dict], table: str, exports: dict, timing: dict, started: float
):
    """benchmarks/results/<name>.json: the command, `settings`, the rows (without their models and sessions), the
    table, the export reports, the timings and the machine."""
    payload = {
        "command": command_line(),
        **settings,
        "rows": [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows],
        "table": table,
        "exports": exports,
        "timing": timing,
        "machine": machine_description(),
        "ort_spinning": False,
        "seconds": time.perf_counter() - started,
    }
    print(f"Wrote {write_json(name, payload)}")


def add_same_runtime_ratios(rows: list[dict]) -> None:
    """`b1_same` / `b8_same`: the dense model's median latency in the row's runtime over the row's (same run)."""
    dense = {row["runtime"]: row for row in rows if row["model"] == "dense"}
    for row in rows:
        for batch in ("b1", "b8"):
            row[f"{batch}_same"] = dense[row["runtime"]][f"{batch}_ms"] / row[f"{batch}_ms"]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher, tokenizer, teacher_path = given_or_finetuned_teacher(args.teacher, "sst2", steps=300)
    dev = load_glue("sst2", tokenizer, split="validation", data_dir=glue_data_dir("sst2"))

    print(f"[1/4] calibrating on {args.calibration_samples} SST-2 train rows; compressing", flush=True)
    batches = calibration_batches("sst2", tokenizer, num_samples=args.calibration_samples)
    stats = drone_hf.collect_activation_stats(teacher, batches)
    models = {"dense": teacher}
    for speedup in args.speedups:
        models[f"DRONE ×{speedup:g}"] = drone_hf.compress_model(teacher, stats, target_speedup=speedup)
    models[f"DRONE r{args.rank}"] = drone_hf.compress_model(teacher, stats, rank=args.rank, attention=False)
    models.update(load_budget_models(args.budget_model))
    unfused = list(models)[1]  # also exported without the MultiHeadAttention route, to show what it buys

    print("[2/4] exporting (optimised fp32 + int8) and checking against PyTorch", flush=True)
    tmp = tempfile.TemporaryDirectory()
    rows, export, layers = [], {}, teacher.config.num_hidden_layers
    b1 = {k: v[:1] for k, v in latency_inputs(tokenizer, dev, batch_size=8, seq_len=128).items()}
    b8 = latency_inputs(tokenizer, dev, batch_size=8, seq_len=128)
    for name, model in models.items():
        variants = [(name, True)] + ([(f"{name} (attention unfused)", False)] if name == unfused else [])
        for label, fuse in variants:
            folder = os.path.join(tmp.name, f"m{len(export)}")
            report = export_onnx(model, folder, optimize=True, quantize="int8" if fuse else None, fuse_attention=fuse)
            export[label] = report
            bound = flop_speedup_bound(teacher.config, model.config, 128)
            if fuse:
                rows.append({"model": label, "runtime": "torch fp32", "flop_bound": bound, "_torch": model})
            for file, runtime in ((MODEL_FILE, "ORT fp32"), (INT8_FILE, "ORT int8")):
                if file in report["files"]:
                    ops = report["files"][file]["fused_ops"]
                    fused = ops["Attention"] + ops["QAttention"] + ops["MultiHeadAttention"]
                    kind = "MultiHeadAttention" if ops["MultiHeadAttention"] else "Attention"
                    rows.append(
                        {
                            "model": label,
                            "runtime": runtime,
                            "attention": f"{fused}/{layers} {kind}" if fused else f"0/{layers}",
                            "nodes": ops["nodes"],
                            "flop_bound": bound,
                            "max_abs_diff": report["files"][file]["max_abs_diff"],
                            "_session": ort_session(os.path.join(folder, file), args.threads),
                        }
                    )

    print(f"[3/4] dev accuracy of {len(rows)} variants on {len(dev)} SST-2 dev rows", flush=True)
    for row in rows:
        if "_torch" in row:
            row["accuracy"] = torch_accuracy(row["_torch"], dev, tokenizer)
        else:
            row["accuracy"] = ort_accuracy(row["_session"], dev, tokenizer)

    print(f"[4/4] timing round-robin, {args.threads} threads, batch 1 and 8 x 128 tokens", flush=True)
    timing = {}
    for batch_name, inputs, repeats in (("b1", b1, args.repeats_b1), ("b8", b8, args.repeats_b8)):
        calls = round_robin_calls(rows, inputs)
        record: dict = {}
        time_round_robin(calls, repeats=repeats, warmup=3, record=record)
        comparison = compare_recorded(record, reference="dense | torch fp32")
        timing[batch_name] = {
            "load_average": comparison.load_average,
            "repeats": repeats,
            "models": comparison.models,
        }
        for row in rows:
            entry = comparison.models[f"{row['model']} | {row['runtime']}"]
            row[f"{batch_name}_ms"] = entry["latency_ms"]
            row[f"{batch_name}_cpu_ms"] = entry["cpu_ms"]
            row[f"{batch_name}_speedup"] = entry.get("speedup", 1.0)
            row[f"{batch_name}_cpu_speedup"] = entry.get("cpu_speedup", 1.0)
            row[f"{batch_name}_spread"] = entry.get("spread", 0.0)

    print(
        f"\nMiniLM-L6 fine-tuned on SST-2; dev accuracy on {len(dev)} rows; latency: median of shuffled round-robin "
        f"rounds in one process, {args.threads} threads (torch and ONNX Runtime); speed-ups are ratios of wall-clock "
        "medians: dense torch fp32 / row, and dense in the row's runtime / row:\n"
    )
    add_same_runtime_ratios(rows)
    for row in rows:
        row.setdefault("attention", "–")
        row.setdefault("nodes", None)
    table = print_table(rows, COLUMNS)
    load = {name: entry["load_average"] for name, entry in timing.items()}
    print(f"\nLoad average (before, after): {load}. Total {time.perf_counter() - started:.0f} s.")
    settings = {
        "teacher": str(teacher_path),
        "calibration_samples": args.calibration_samples,
        "ranks": {name: dict(model.config.drone_ranks or {}) for name, model in models.items() if name != "dense"},
        "attention_ranks": {
            name: dict(getattr(model.config, "drone_attention_ranks", None) or {})
            for name, model in models.items()
            if name != "dense"
        },
    }
    write_results(args.name, settings, rows, table, export, timing, started)
    tmp.cleanup()


if __name__ == "__main__":
    main()
