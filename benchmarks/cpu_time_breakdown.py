"""Where a forward pass's CPU time goes, dense vs DRONE, and what `torch.compile` changes (issue 15).

    python benchmarks/cpu_time_breakdown.py [--threads 2] [--repeats 20] [--no-compile] [--dtype bfloat16]

Speed on a CPU depends on the shapes (ranks), not on the values of the factors, so the models are the report's
MiniLM-L6 architectures (`benchmarks/results/report.json`, SST-2: dense and DRONE at the 1.5x, 2x and 3x FLOP
budgets), rebuilt from their configurations with random weights (`benchmarks/report_gpu.py`). For batch 8 x 128 and
batch 1 x 32 tokens (full length, fp32 or `--dtype`) it

1. profiles five forward passes of each model with `torch.profiler` (the median pass is shown) and sums the self
   CPU time of every op into categories (matrix products, GELU, attention (SDPA), LayerNorm, element-wise adds,
   views/copies/masks, other);
2. times all models round-robin in one process, eager and `torch.compile`d (inductor, default mode), and reports each
   speed-up over the dense model in the same mode, beside the multiply-add (FLOP) bound.

Prints both tables and writes `benchmarks/results/cpu_time_breakdown.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine_description, set_threads  # noqa: E402
from gpu import random_inputs  # noqa: E402
from report_gpu import DENSE_CONFIG, build, row_config  # noqa: E402

from drone_hf.profiling import flop_speedup_bound, time_round_robin  # noqa: E402


RESULTS = REPO / "benchmarks" / "results"
SHAPES = ("8x128", "1x32")
CATEGORIES = {
    "matmul": ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm"),
    "gelu": ("gelu",),
    "attention": ("scaled_dot_product", "_flash_attention", "softmax"),
    "layernorm": ("layer_norm",),
    "add": ("add", "add_"),
    "views/copies/masks": (
        "view",
        "reshape",
        "transpose",
        "permute",
        "contiguous",
        "copy_",
        "clone",
        "expand",
        "slice",
        "select",
        "unsqueeze",
        "to",
        "_to_copy",
        "empty",
        "masked_fill",
        "where",
        "ones",
        "zeros",
        "arange",
        "index",
        "cat",
        "embedding",
        "as_strided",
        "t",
        "split",
        "chunk",
        "detach",
        "any",
        "all",
        "eq",
        "ne",
        "lt",
        "gt",
        "mul",
        "sub",
        "rsub",
        "type_as",
        "fill_",
        "new_ones",
        "full",
        "cumsum",
        "item",
        "_local_scalar_dense",
        "tanh",
    ),
}


def category(op: str) -> str:
    name = op.removeprefix("aten::")
    for label, names in CATEGORIES.items():
        if name in names or (label == "attention" and any(n in name for n in names)):
            return label
    return "other"


@torch.inference_mode()
def breakdown(model, inputs: dict, passes: int) -> dict[str, float]:
    """Milliseconds of self CPU time per category per forward pass: the median over `passes` profiled passes (after
    one unprofiled pass), so that one pass disturbed by the machine does not set the table."""
    from torch.profiler import ProfilerActivity, profile

    model(**inputs)
    samples: list[dict[str, float]] = []
    for _ in range(passes):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**inputs)
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            if event.key.startswith("aten::"):
                label = category(event.key)
                totals[label] = totals.get(label, 0.0) + event.self_cpu_time_total / 1000.0
        totals["total"] = sum(totals.values())
        samples.append(totals)
    # the pass whose total is the median, whole (its categories add up to its total)
    return sorted(samples, key=lambda t: t["total"])[len(samples) // 2]


def timed(models: dict, inputs: dict, repeats: int, record: dict) -> dict[str, float]:
    calls = {}
    for name, model in models.items():

        def call(model=model):
            with torch.inference_mode():
                model(**inputs)

        calls[name] = call
    return time_round_robin(calls, repeats=repeats, warmup=3, record=record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="batch x tokens, e.g. 8x128 (others kept)")
    parser.add_argument("--passes", type=int, default=5, help="profiled passes per model (the median is shown)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="the models' dtype (cast once)"
    )
    parser.add_argument("--output", help="default: benchmarks/results/cpu_time_breakdown[_bfloat16].json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    args.output = args.output or str(RESULTS / f"cpu_time_breakdown{suffix}.json")
    dtype = getattr(torch, args.dtype)
    report = json.loads((RESULTS / "report.json").read_text())
    dense_config = json.loads(DENSE_CONFIG.read_text())
    rows = [r for r in report["tasks"]["sst2"]["rows"] if r["family"] in ("dense", "DRONE")]
    models = {
        ("dense" if r["family"] == "dense" else r["name"]): build(row_config(dense_config, r)).to(dtype) for r in rows
    }
    dense = models["dense"]
    out = {
        "machine": machine_description(),
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "shapes": {},
    }
    if Path(args.output).exists():  # shapes not run now are kept from the earlier run
        out["shapes"] = json.loads(Path(args.output).read_text()).get("shapes", {})
    for shape in args.shapes:
        batch, tokens = (int(n) for n in shape.split("x"))
        inputs = random_inputs(dense.config, batch, tokens, "cpu")
        entry = {"breakdown_ms": {}, "eager": {}, "compiled": {}, "flop_bound": {}}
        for name, model in models.items():
            entry["breakdown_ms"][name] = breakdown(model, inputs, args.passes)
            entry["flop_bound"][name] = flop_speedup_bound(dense.config, model.config, tokens)
        record: dict = {}
        latency = timed(models, inputs, args.repeats, record)
        entry["load_average_eager"] = record.get("load_average")
        entry["eager"] = {n: {"ms": 1000 * t, "speedup": latency["dense"] / t} for n, t in latency.items()}
        if not args.no_compile:
            started = time.perf_counter()
            compiled = {n: torch.compile(m) for n, m in models.items()}
            for model in compiled.values():  # compile outside the timed rounds
                with torch.inference_mode():
                    model(**inputs)
            entry["compile_seconds"] = time.perf_counter() - started
            latency = timed(compiled, inputs, args.repeats, record)
            entry["load_average_compiled"] = record.get("load_average")
            entry["compiled"] = {
                n: {
                    "ms": 1000 * t,
                    "speedup": latency["dense"] / t,
                    "vs_dense_eager": entry["eager"]["dense"]["ms"] / (1000 * t),
                }
                for n, t in latency.items()
            }
            torch._dynamo.reset()
        out["shapes"][f"{batch}x{tokens}"] = entry
        labels = [*CATEGORIES, "other"]
        print(f"\n### batch {batch} x {tokens} tokens, {args.dtype}, {args.threads} threads: self CPU ms per op type")
        print("| model | " + " | ".join(labels) + " | total | matmul share |")
        print("|---|" + "---:|" * (len(labels) + 2))
        for name, parts in entry["breakdown_ms"].items():
            cells = [f"{parts.get(label, 0.0):.2f}" for label in labels]
            print(
                f"| {name} | "
                + " | ".join(cells)
                + f" | {parts['total']:.2f} | {parts.get('matmul', 0) / parts['total']:.0%} |"
            )
        print(
            "\n| model | FLOP bound | eager ms | eager speed-up | compiled ms | compiled speed-up | vs dense eager |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in models:
            e, c = entry["eager"][name], entry["compiled"].get(name)
            tail = f"{c['ms']:.2f} | {c['speedup']:.2f} | {c['vs_dense_eager']:.2f}" if c else "– | – | –"
            print(f"| {name} | {entry['flop_bound'][name]:.2f} | {e['ms']:.2f} | {e['speedup']:.2f} | {tail} |")
        Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
