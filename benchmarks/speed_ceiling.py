"""How much faster low rank can make an encoder on this CPU: measured speed-up against the FLOP bound as every
encoder linear's rank falls, down to ranks where the linears cost almost nothing (issue 13: what limits >= 3x).

    python benchmarks/speed_ceiling.py --model mpnet [--threads 2] [--repeats 10] [--dtype float32]
    python benchmarks/speed_ceiling.py --model minilm --ranks 256 192 128 96 64 32 8

Speed on a CPU depends on the shapes, not on the values of the factors, so each model here is the real checkpoint
(all-mpnet-base-v2 or all-MiniLM-L6-v2 with a fresh two-label head) factored by plain SVD at one rank for every
encoder linear (`compress_model(method="svd", rank=r)`; ranks that would not reduce a linear's cost leave it dense),
and optionally DRONE attention at a per-head query/key width (`--attention-rank`). All models are timed round-robin
in one process against the dense one (`time_round_robin`, batch 8 x 128 and 1 x 128, full-length rows), and the
dense model and the lowest-rank one are profiled with `torch.profiler` (self CPU time per op category, as in
`cpu_time_breakdown.py`). The lowest ranks show the ceiling: what is left when the factored linears are almost free
is the time no rank removes (attention's score products and softmax, GELU, LayerNorm, adds, copies).

Prints a table per shape and writes `benchmarks/results/speed_ceiling_<model>[_<dtype>].json` and `.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import RESULTS, command_line, machine_description, minilm_path, print_table, set_threads  # noqa: E402
from cpu_time_breakdown import breakdown, timed  # noqa: E402
from gpu import random_inputs  # noqa: E402
from mpnet_glue import flop_bound, mpnet_path  # noqa: E402

import drone_hf  # noqa: E402


DEFAULT_RANKS = {
    "mpnet": [512, 384, 256, 192, 128, 96, 64, 32, 8],
    "minilm": [256, 192, 128, 96, 64, 32, 8],
}


def model_path(name: str) -> str:
    return mpnet_path() if name == "mpnet" else minilm_path()


def load_dense(name: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the fresh head's weights
    model = AutoModelForSequenceClassification.from_pretrained(model_path(name), num_labels=2, dtype=torch.float32)
    return model.eval()


def variants(dense, ranks: list[int], attention_rank: int | None) -> dict:
    """Name -> model: the dense one, then one SVD model per rank (every encoder linear at that rank)."""
    models = {"dense": dense}
    for rank in ranks:
        extra = {"attention_rank": attention_rank} if attention_rank else {}
        name = f"rank {rank}" + (f", attention {attention_rank}" if attention_rank else "")
        models[name] = drone_hf.compress_model(dense, None, method="svd", rank=rank, **extra).eval()
    return models


def plot(path: Path, shapes: dict, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = 1.0
    for shape, entry in shapes.items():
        points = sorted((row["flop_bound"], row["speedup"]) for row in entry["rows"])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"measured, batch {shape}")
        top = max(top, *(p[0] for p in points))
    ax.plot([1, top], [1, top], linestyle="--", color="grey", label="FLOP bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP bound (dense / factored multiply-adds)")
    ax.set_ylabel("measured speed-up over dense")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DEFAULT_RANKS), default="mpnet")
    parser.add_argument("--ranks", nargs="+", type=int, help="uniform ranks (default: per model)")
    parser.add_argument("--attention-rank", type=int, help="also factor every head's W_Q W_K^T to this width")
    parser.add_argument("--shapes", nargs="+", default=["8x128", "1x128"], help="batch x tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--passes", type=int, default=5, help="profiled passes per profiled model (median shown)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--output", help="JSON path (the plot beside it); default: benchmarks/results/...")
    args = parser.parse_args(argv)
    for rank in args.ranks or []:
        if rank < 1:
            parser.error(f"--ranks: {rank} is not a positive integer")
    set_threads(args.threads)
    ranks = sorted(set(args.ranks or DEFAULT_RANKS[args.model]), reverse=True)
    dtype = getattr(torch, args.dtype)
    dense = load_dense(args.model)
    models = variants(dense, ranks, args.attention_rank)
    models = {name: model.to(dtype) for name, model in models.items()}
    lowest = list(models)[-1]
    out = {
        "command": command_line(),
        "model": args.model,
        "path": model_path(args.model),
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine_description(),
        "shapes": {},
    }
    for shape in args.shapes:
        batch, tokens = (int(n) for n in shape.split("x"))
        inputs = random_inputs(dense.config, batch, tokens, "cpu")
        record: dict = {}
        latency = timed(models, inputs, args.repeats, record)
        profiles = {name: breakdown(models[name], inputs, args.passes) for name in ("dense", lowest)}
        rows = []
        for name, model in models.items():
            bound = flop_bound(models["dense"], model, tokens)
            speedup = latency["dense"] / latency[name]
            rows.append(
                {
                    "model": name,
                    "ms": 1000 * latency[name],
                    "speedup": speedup,
                    "flop_bound": bound,
                    "share_of_bound": speedup / bound,
                }
            )
        dense_profile, low_profile = profiles["dense"], profiles[lowest]
        out["shapes"][shape] = {
            "rows": rows,
            "profile_ms": profiles,
            "load_average": record.get("load_average"),
            # what no rank removes: the lowest-rank model's profiled time outside matrix products
            "non_matmul_ms_dense": dense_profile["total"] - dense_profile.get("matmul", 0.0),
            "non_matmul_ms_lowest": low_profile["total"] - low_profile.get("matmul", 0.0),
        }
        print(f"\n{args.model}, batch {shape}, {args.dtype}, {args.threads} threads, {args.repeats} rounds")
        print_table(
            rows,
            [
                ("model", "model", ""),
                ("ms", "ms", ".1f"),
                ("speedup", "speed-up", ".2f"),
                ("flop_bound", "FLOP bound", ".2f"),
                ("share_of_bound", "share of bound", ".0%"),
            ],
        )
        categories = sorted({k for p in profiles.values() for k in p if k != "total"})
        print_table(
            [{"model": name, **profile} for name, profile in profiles.items()],
            [("model", "profiled (self CPU ms)", ""), *((c, c, ".1f") for c in categories), ("total", "total", ".1f")],
        )
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    path = Path(args.output) if args.output else RESULTS / f"speed_ceiling_{args.model}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    title = f"{args.model}: uniform-rank SVD, {args.dtype}, {args.threads} threads"
    plot(path.with_suffix(".png"), out["shapes"], title)
    print(f"\nWrote {path}")
    return out


if __name__ == "__main__":
    main()
