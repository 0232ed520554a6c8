"""GPU speed of DRONE models against the dense model, fp32 and bf16, batch 1 and 32, 128 and 512 tokens.

Speed on a GPU depends on the shapes alone (the ranks, not the values of the factors), so this benchmark runs in two
steps:

    python benchmarks/gpu.py prepare     # here, on the CPU: real models, real calibration, real allocations
    python benchmarks/gpu.py run         # on a CUDA machine: time what `prepare` wrote

`prepare` calibrates each model on 512 SST-2 training sentences and lets `drone_hf.compress_model` allocate ranks
under FLOP budgets of 1.5x, 2x and 3x (DRONE on the linears alone, and DRONE+attention), then writes each compressed
model's `config.json` (the ranks are in it: `config.json` is the structural truth of a DRONE checkpoint) under
`benchmarks/gpu_models/<model>/<variant>/`, with the dense model's config beside them. The models:

* `minilm`: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), the embedded model, with a 2-label classification head;
* `mpnet`: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768: base size) fine-tuned on SST-2 when
  `benchmarks/mpnet_glue.py` has cached that teacher, else the pretrained encoder with a 2-label head.

`run` builds every model from its config (`from_config`, weights drawn at random: identical shapes, identical kernels),
moves it to the GPU in fp32 and in bf16, and times a forward pass of all models round-robin in one process
(`torch.cuda.synchronize` around each call; median of the timed rounds) on full-length random token batches. fp32
runs with TF32 matmuls off (PyTorch's default). It also profiles each model once (bf16, batch 32 x 128) and reports
the share of GPU kernel time spent in matrix products. It prints one table per model and writes
`benchmarks/results/gpu.json` (or `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drone_hf.profiling import measure_latency  # noqa: E402


MODELS_DIR = REPO / "benchmarks" / "gpu_models"
RESULTS = REPO / "benchmarks" / "results"
BUDGETS = (1.5, 2.0, 3.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = (1, 32)
LENGTHS = (128, 512)
GEMM_KERNEL_MARKERS = ("gemm", "gemv", "xmma", "cutlass", "nvjet", "cublas", "matmul", "sm90_", "sm80_")


# ------------------------------------------------------------------------------------------------ prepare (CPU)


def _variants(model, stats, *, dense_config, out: Path, seq_len: int) -> list[dict]:
    from drone_hf import compress_model
    from drone_hf.profiling import flop_speedup_bound

    out.mkdir(parents=True, exist_ok=True)
    dense_dir = out / "dense"
    dense_dir.mkdir(exist_ok=True)
    dense_config.to_json_file(dense_dir / "config.json")
    rows = [{"variant": "dense", "budget": None, "attention": False}]
    for budget in BUDGETS:
        for attention in (False, True):
            name = f"drone{'+attention' if attention else ''}-{budget:g}x"
            started = time.perf_counter()
            compressed = compress_model(model, stats, target_speedup=budget, attention=attention)
            folder = out / name
            folder.mkdir(exist_ok=True)
            compressed.config.to_json_file(folder / "config.json")
            bounds = {
                str(length): round(float(flop_speedup_bound(model.config, compressed.config, seq_len=length)), 4)
                for length in LENGTHS
            }
            rows.append({"variant": name, "budget": budget, "attention": attention, "flop_bound": bounds})
            print(f"  {name}: FLOP bound {bounds} ({time.perf_counter() - started:.0f} s)", flush=True)
            del compressed
    (out / "manifest.json").write_text(json.dumps({"variants": rows, "calibration_seq_len": seq_len}, indent=2))
    return rows


def prepare(args) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from drone_hf import collect_activation_stats

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import CACHE, calibration_batches, minilm_path
    from mpnet_glue import mpnet_path

    teacher = sorted((CACHE / "finetuned").glob("all-mpnet-base-v2-sst2-*"))
    sources = {
        "minilm": (minilm_path(), "all-MiniLM-L6-v2 (pretrained sentence encoder, 2-label head)"),
        "mpnet": (
            (str(teacher[-1]), f"all-mpnet-base-v2 fine-tuned on SST-2 ({teacher[-1].name})")
            if teacher
            else (mpnet_path(), "all-mpnet-base-v2 (pretrained, 2-label head)")
        ),
    }
    for name in args.models:
        path, description = sources[name]
        print(f"=== {name}: {description} ===", flush=True)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        batches = calibration_batches("sst2", tokenizer, num_samples=args.calibration_samples)
        stats = collect_activation_stats(model, batches, show_progress=True)
        rows = _variants(model, stats, dense_config=model.config, out=MODELS_DIR / name, seq_len=128)
        manifest = json.loads((MODELS_DIR / name / "manifest.json").read_text())
        manifest.update(source=description, calibration="SST-2 train", calibration_samples=args.calibration_samples)
        (MODELS_DIR / name / "manifest.json").write_text(json.dumps(manifest, indent=2))
        print(f"  wrote {len(rows)} configs to {MODELS_DIR / name}", flush=True)


# ------------------------------------------------------------------------------------------------ run (GPU)


def build(folder: Path):
    """The model `folder/config.json` describes, weights drawn from N(0, 0.02) (biases zero), in eval mode."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import drone_hf  # noqa: F401  (registers the DRONE model types)

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
            elif "LayerNorm" in name or "layer_norm" in name or name.endswith("norm.weight"):
                parameter.fill_(1.0) if name.endswith("weight") else parameter.zero_()
            else:
                parameter.zero_()
    return model.eval()


def random_inputs(config, batch: int, length: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(5, config.vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device)}


@torch.inference_mode()
def gemm_share(model, inputs: dict) -> dict[str, float]:
    """One profiled forward pass: total GPU kernel time (ms) and the share spent in matrix-product kernels."""
    from torch.profiler import ProfilerActivity, profile

    model(**inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    total = gemm = 0.0
    for event in prof.key_averages():
        device_time = getattr(event, "self_device_time_total", None)
        if device_time is None:
            device_time = getattr(event, "self_cuda_time_total", 0.0)
        if not device_time:
            continue
        total += device_time
        if any(marker in event.key.lower() for marker in GEMM_KERNEL_MARKERS):
            gemm += device_time
    return {"kernel_ms": total / 1000.0, "gemm_share": gemm / total if total else float("nan")}


def run(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "`run` needs a CUDA device (torch.cuda.is_available() is False); `--device cpu` smoke-tests it."
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "models": {},
    }
    import transformers

    results["transformers"] = transformers.__version__
    for name in args.models:
        manifest = json.loads((MODELS_DIR / name / "manifest.json").read_text())
        variants = [row["variant"] for row in manifest["variants"]]
        cpu_models = {variant: build(MODELS_DIR / name / variant) for variant in variants}
        config = cpu_models["dense"].config
        entry = {"source": manifest.get("source"), "variants": manifest["variants"], "timings": []}
        for dtype_name in args.dtypes:
            models = {v: m.to(device=device, dtype=DTYPES[dtype_name]) for v, m in cpu_models.items()}
            for length in args.lengths:
                for batch in args.batches:
                    inputs = random_inputs(config, batch, length, device)
                    latency = measure_latency(models, inputs, repeats=args.repeats, warmup=args.warmup)
                    for variant in variants:
                        entry["timings"].append(
                            {
                                "variant": variant,
                                "dtype": dtype_name,
                                "batch": batch,
                                "seq_len": length,
                                "latency_ms": 1000 * latency[variant],
                                "speedup": latency["dense"] / latency[variant],
                            }
                        )
                    print(
                        f"{name} {dtype_name} b{batch} x {length}: dense {1000 * latency['dense']:.2f} ms; "
                        + ", ".join(f"{v} {latency['dense'] / latency[v]:.2f}x" for v in variants if v != "dense"),
                        flush=True,
                    )
            if dtype_name == "bf16" and device.type == "cuda":
                inputs = random_inputs(config, 32, 128, device)
                entry["profile_bf16_b32_128"] = {v: gemm_share(m, inputs) for v, m in models.items()}
            cpu_models = {v: m.to("cpu", torch.float32) for v, m in models.items()}
            del models
            torch.cuda.empty_cache()
        if args.compile and device.type == "cuda":
            entry["compiled"] = compiled_speedups(cpu_models, config, device, args)
        results["models"][name] = entry
        print(render(name, entry), flush=True)
        Path(args.output).write_text(json.dumps(results, indent=2))  # each finished model is kept
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"wrote {output}", flush=True)


COMPILED_VARIANTS = ("dense", "drone-2x", "drone+attention-2x")


def compiled_speedups(cpu_models: dict, config, device, args) -> list[dict]:
    """`torch.compile` (default mode) of the dense model and the 2x models, bf16, 128 tokens, batch 1 and 32: each
    compiled model's speed-up over the compiled dense model, and over the eager dense model."""
    rows = []
    try:
        eager = {
            v: cpu_models[v].to(device=device, dtype=torch.bfloat16) for v in COMPILED_VARIANTS if v in cpu_models
        }
        compiled = {f"{v} (compiled)": torch.compile(m) for v, m in eager.items()}
        for batch in args.batches:
            inputs = random_inputs(config, batch, 128, device)
            latency = measure_latency({**eager, **compiled}, inputs, repeats=args.repeats, warmup=args.warmup)
            for name, seconds in latency.items():
                rows.append(
                    {
                        "variant": name,
                        "dtype": "bf16",
                        "batch": batch,
                        "seq_len": 128,
                        "latency_ms": 1000 * seconds,
                        "speedup_vs_eager_dense": latency["dense"] / seconds,
                        "speedup_vs_compiled_dense": latency["dense (compiled)"] / seconds,
                    }
                )
            print(
                f"compiled bf16 b{batch} x 128: " + ", ".join(f"{n} {1000 * t:.2f} ms" for n, t in latency.items()),
                flush=True,
            )
    except Exception as error:  # compile needs a working Triton/C toolchain: report, keep the eager results
        print(f"torch.compile failed: {type(error).__name__}: {error}", flush=True)
        rows.append({"error": f"{type(error).__name__}: {error}"})
    for model in cpu_models.values():
        model.to("cpu", torch.float32)
    torch.cuda.empty_cache()
    return rows


def render(name: str, entry: dict) -> str:
    """One Markdown table: a row per variant, a speed-up column per (dtype, batch, length), the FLOP bound."""
    settings = sorted(
        {(t["dtype"], t["batch"], t["seq_len"]) for t in entry["timings"]}, key=lambda s: (s[0] != "fp32", s[2], s[1])
    )
    speed = {(t["variant"], t["dtype"], t["batch"], t["seq_len"]): t for t in entry["timings"]}
    header = "| variant | FLOP bound (128 / 512) | " + " | ".join(f"{d} b{b}×{n}" for d, b, n in settings) + " |"
    lines = [f"**{name}** ({entry.get('source')})", "", header, "|---|---:|" + "---:|" * len(settings)]
    for row in entry["variants"]:
        variant = row["variant"]
        bound = row.get("flop_bound")
        cells = [variant, f"{bound['128']:.2f} / {bound['512']:.2f}" if bound else "1.00"]
        for d, b, n in settings:
            timing = speed[(variant, d, b, n)]
            cells.append(f"{timing['latency_ms']:.2f} ms" if variant == "dense" else f"{timing['speedup']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    profile = entry.get("profile_bf16_b32_128")
    if profile:
        lines += ["", "bf16, batch 32 × 128, one profiled pass: GPU kernel time (ms) and matrix-product share:", ""]
        lines.append("| variant | kernel ms | GEMM share |")
        lines.append("|---|---:|---:|")
        for variant, numbers in profile.items():
            lines.append(f"| {variant} | {numbers['kernel_ms']:.3f} | {numbers['gemm_share']:.2f} |")
    compiled = [row for row in entry.get("compiled", []) if "error" not in row]
    if compiled:
        lines += [
            "",
            "`torch.compile` (default mode), bf16, 128 tokens: latency and speed-up over the compiled dense model:",
            "",
        ]
        lines += ["| variant | batch | ms | × compiled dense | × eager dense |", "|---|---:|---:|---:|---:|"]
        for row in compiled:
            lines.append(
                f"| {row['variant']} | {row['batch']} | {row['latency_ms']:.2f} | "
                f"{row['speedup_vs_compiled_dense']:.2f} | {row['speedup_vs_eager_dense']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="allocate ranks on real models here and write their configs")
    prep.add_argument("--models", nargs="+", default=["minilm", "mpnet"], choices=["minilm", "mpnet"])
    prep.add_argument("--calibration-samples", type=int, default=512)
    go = sub.add_parser("run", help="time the prepared configs on the GPU")
    go.add_argument("--models", nargs="+", default=["minilm", "mpnet"], choices=["minilm", "mpnet"])
    go.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    go.add_argument("--repeats", type=int, default=50)
    go.add_argument("--warmup", type=int, default=10)
    go.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    go.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    go.add_argument("--device", default="cuda", help="`cpu` only to smoke-test this script")
    go.add_argument("--compile", action="store_true", help="also time torch.compile of the dense and 2x models")
    go.add_argument("--output", default=os.environ.get("GPU_RESULTS", str(RESULTS / "gpu.json")))
    rend = sub.add_parser("render", help="print the tables of a results file")
    rend.add_argument("path", nargs="?", default=str(RESULTS / "gpu.json"))
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args)
    elif args.step == "run":
        run(args)
    else:
        for name, entry in json.loads(Path(args.path).read_text())["models"].items():
            print(render(name, entry) + "\n")


if __name__ == "__main__":
    main()
