"""Would one concatenated query/key/value down-projection, or a hand-fused bias + GELU, pay on this CPU? (issue 15)

    python benchmarks/qkv_concat.py [--threads 2] [--seconds 3] [--parts qkv ffn model] [--no-compile]

1. **Q/K/V down-projections.** In a DRONE model query, key and value may each be a `DroneLinear` reading the same
   hidden state: three thin GEMMs `in -> k` where one `in -> 3k` GEMM and a split into views would do. For MiniLM's
   width (384; ranks 32/64/96/128) and base width (768; ranks 64/128/192/256) at 1x32, 1x128, 8x128 and 32x128 tokens
   (fp32), it times, round-robin in one process:
   - `down x3`: three `F.linear(x, W_down)`; `down cat`: one `F.linear(x, cat(W_down))` + `split` (views);
   - `proj x3`: the three whole factored projections `up(down(x))`; `proj cat`: the concatenated down + split + the
     three `up` products on the (strided) views: what a fused module would run;
   - `proj catT`: the same with the concatenated down product computed transposed (`3k x tokens`), so that each
     split is contiguous and enters its `up` product as a transposed operand (a BLAS flag) instead of a strided view;
   - `proj x3T`: the control for `proj catT`: its layout and kernels with three down products (so `catT / x3T` is
     what the concatenation alone changes);
   - `dense x3`: the three dense `in -> in` projections, for scale.
   The gain that matters is `proj x3 / proj cat` (or `/ proj catT`): the whole attention-projection time.
2. **Bias + GELU** of the FFN up-projection (MiniLM: `-> 1536`, from the dense 384 and from DRONE rank 96), at 1x32
   and 8x128 tokens: `F.gelu(F.linear(x, W, b))` (eager, what BERT runs) vs `F.gelu(torch.addmm(b, x, W.T))` vs the
   bias-free product followed by a `torch.compile`d bias + GELU (one pass) vs the whole `torch.compile`d
   linear + GELU, with `F.linear` alone (no GELU) as the floor any fusion of the GELU could reach.
3. **Whole model** (`--parts model`): MiniLM-L6 (the real `all-MiniLM-L6-v2` weights, a random 2-class head) with
   every linear at rank 96 (`method="svd"`: speed depends on the shapes only), unfused vs the prototype `fuse_qkv` of
   `benchmarks/fused_qkv_prototype.py` (the `proj catT` form as modules; fused product up to 128 tokens, its default)
   vs `fuse_qkv(max_tokens=10**9)` (always fused), at 1x32 and 8x128 tokens, round-robin in one process under
   `torch.inference_mode` (`drone_hf.profiling.measure_latency`).

Every variant of 1 and 2 is timed as a call that repeats its op enough times to take ~1 ms (so that timer resolution
does not matter), in a new random order every round (`drone_hf.profiling.time_round_robin`), for `--seconds` per
setting; the table shows medians per op in microseconds.

Prints the tables and writes `benchmarks/results/qkv_concat.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine_description, set_threads  # noqa: E402

from drone_hf.profiling import time_round_robin  # noqa: E402


RESULTS = REPO / "benchmarks" / "results"
WIDTHS = {"MiniLM (384)": (384, (32, 64, 96, 128)), "base (768)": (768, (64, 128, 192, 256))}
TOKENS = ("1x32", "1x128", "8x128", "32x128")
MODEL_RANK, MODEL_SHAPES, MODEL_ROUNDS = 96, ("1x32", "8x128"), {"1x32": 300, "8x128": 60}
FFN = {"hidden": 384, "intermediate": 1536, "rank": 96, "tokens": ("1x32", "8x128")}


def _repeated(op, inner: int):
    def call():
        for _ in range(inner):
            op()

    return call


def time_ops(ops: dict, seconds: float, min_rounds: int = 30, max_rounds: int = 400) -> dict:
    """Median microseconds per op of each zero-argument `op`, timed round-robin; each timed call repeats its op to
    take about 1 ms, and the number of rounds fills about `seconds`."""
    with torch.inference_mode():
        single = {}
        for name, op in ops.items():  # warm up, then one rough timing to size the calls
            for _ in range(3):
                op()
            start = time.perf_counter()
            for _ in range(5):
                op()
            single[name] = (time.perf_counter() - start) / 5
        inner = {name: max(1, round(1e-3 / t)) for name, t in single.items()}
        round_seconds = sum(inner[name] * single[name] for name in ops)
        rounds = int(min(max_rounds, max(min_rounds, seconds / round_seconds)))
        record: dict = {}
        medians = time_round_robin(
            {name: _repeated(op, inner[name]) for name, op in ops.items()},
            repeats=rounds,
            warmup=3,
            record=record,
        )
    wall = record["wall"]
    return {
        "us": {name: 1e6 * medians[name] / inner[name] for name in ops},
        # per-round ratios against the first op, to show how steady each comparison is
        "inner": inner,
        "rounds": rounds,
        "load_average": record.get("load_average"),
        "_wall": wall,
    }


def _quartile_ratio(wall: dict, base: str, other: str, inner: dict) -> list[float]:
    ratios = sorted((b / inner[base]) / (o / inner[other]) for b, o in zip(wall[base], wall[other]))
    n = len(ratios)
    return [ratios[n // 4], ratios[n // 2], ratios[(3 * n) // 4]]


def qkv_setting(hidden: int, rank: int, batch: int, tokens: int, seconds: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, hidden, generator=generator)
    downs = [torch.randn(rank, hidden, generator=generator) / hidden**0.5 for _ in range(3)]
    ups = [torch.randn(hidden, rank, generator=generator) / rank**0.5 for _ in range(3)]
    biases = [torch.randn(hidden, generator=generator) for _ in range(3)]
    dense = [torch.randn(hidden, hidden, generator=generator) / hidden**0.5 for _ in range(3)]
    cat = torch.cat(downs)

    def down_separate():
        return [F.linear(x, w) for w in downs]

    def down_cat():
        return F.linear(x, cat).split(rank, dim=-1)

    def proj_separate():
        return [F.linear(F.linear(x, d), u, b) for d, u, b in zip(downs, ups, biases)]

    def proj_cat():
        parts = F.linear(x, cat).split(rank, dim=-1)
        return [F.linear(h, u, b) for h, u, b in zip(parts, ups, biases)]

    x2d = x.view(-1, hidden)

    def proj_cat_transposed():
        # The down products as one (3k x tokens) matrix, so that each split is contiguous and reaches the up products
        # as a transposed operand (a BLAS flag), not as a strided view.
        parts = torch.mm(cat, x2d.t()).split(rank)
        return [torch.addmm(b, h.t(), u.t()).view(batch, tokens, hidden) for h, u, b in zip(parts, ups, biases)]

    def proj_separate_transposed():
        # The control for `proj catT`: the same layout and kernels, with three down products instead of one.
        return [
            torch.addmm(b, torch.mm(d, x2d.t()).t(), u.t()).view(batch, tokens, hidden)
            for d, u, b in zip(downs, ups, biases)
        ]

    def dense_separate():
        return [F.linear(x, w, b) for w, b in zip(dense, biases)]

    with torch.inference_mode():  # the fused form computes the same numbers
        for variant in (proj_cat, proj_cat_transposed, proj_separate_transposed):
            for got, want in zip(variant(), proj_separate()):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for got, want in zip(down_cat(), down_separate()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops = {
        "down x3": down_separate,
        "down cat": down_cat,
        "proj x3": proj_separate,
        "proj cat": proj_cat,
        "proj x3T": proj_separate_transposed,
        "proj catT": proj_cat_transposed,
        "dense x3": dense_separate,
    }
    timed = time_ops(ops, seconds)
    wall, inner = timed.pop("_wall"), timed["inner"]
    # (baseline, candidate) -> speed-up of the medians and the quartiles of the per-round speed-ups
    pairs = {
        "down": ("down x3", "down cat"),
        "cat": ("proj x3", "proj cat"),
        "catT": ("proj x3", "proj catT"),
        "catT_vs_x3T": ("proj x3T", "proj catT"),
    }
    timed["speedups"] = {
        label: {
            "median": timed["us"][base] / timed["us"][other],
            "quartiles": _quartile_ratio(wall, base, other, inner),
        }
        for label, (base, other) in pairs.items()
    }
    return timed


def ffn_setting(in_features: int, out_features: int, batch: int, tokens: int, seconds: float, compile: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch * tokens, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator)
    weight_t = weight.t()

    ops = {
        "linear only": lambda: F.linear(x, weight, bias),
        "gelu(linear)": lambda: F.gelu(F.linear(x, weight, bias)),
        "gelu(addmm)": lambda: F.gelu(torch.addmm(bias, x, weight_t)),
    }
    if compile:

        def bias_gelu(y, b):
            return F.gelu(y + b)

        def linear_gelu(inputs):
            return F.gelu(F.linear(inputs, weight, bias))

        fused_bias_gelu = torch.compile(bias_gelu, dynamic=False)
        fused_linear_gelu = torch.compile(linear_gelu, dynamic=False)
        ops["mm + compiled bias-gelu"] = lambda: fused_bias_gelu(torch.mm(x, weight_t), bias)
        ops["compiled gelu(linear)"] = lambda: fused_linear_gelu(x)
    with torch.inference_mode():
        want = F.gelu(F.linear(x, weight, bias))
        for name, op in ops.items():
            if name != "linear only":
                torch.testing.assert_close(op(), want, rtol=1e-4, atol=1e-4)
    timed = time_ops(ops, seconds)
    timed.pop("_wall")
    base = timed["us"]["gelu(linear)"]
    timed["speedup_vs_gelu_linear"] = {name: base / us for name, us in timed["us"].items()}
    timed["gelu_share"] = 1 - timed["us"]["linear only"] / base
    return timed


def _gain(median: float, quartiles: list[float]) -> str:
    return f"{100 * (median - 1):+.1f}%, {100 * (quartiles[0] - 1):+.1f}..{100 * (quartiles[2] - 1):+.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per setting")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile bias-GELU variants")
    parser.add_argument(
        "--parts", nargs="+", choices=["qkv", "ffn", "model"], default=["qkv", "ffn", "model"], help="(others kept)"
    )
    parser.add_argument("--output", default=str(RESULTS / "qkv_concat.json"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    out = {"qkv": {}, "ffn": {}, "model": {}}
    if Path(args.output).exists():  # the part not run now is kept from the earlier run
        out = json.loads(Path(args.output).read_text())
    settings = {"machine": machine_description(), "threads": args.threads, "seconds": args.seconds}
    for part in args.parts:
        out[f"{part}_settings"] = settings
    if "qkv" in args.parts:
        out["qkv"] = _run_qkv(args)
    if "ffn" in args.parts:
        out["ffn"] = _run_ffn(args)
    if "model" in args.parts:
        out["model"] = _run_model(args)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nWrote {args.output}")


def _run_qkv(args) -> dict:
    results = {}
    print(f"\n### Q/K/V projections, fp32, {args.threads} threads: median us per call (3 projections)")
    print(
        "| width | rank | tokens | down x3 | down cat (gain) | proj x3 | proj cat (gain, IQR) | proj x3T | "
        "proj catT (gain vs x3, IQR) | catT vs x3T (IQR) | dense x3 |"
    )
    print("|---|---:|---|---:|---|---:|---|---:|---|---|---:|")
    for width, (hidden, ranks) in WIDTHS.items():
        for rank in ranks:
            for shape in TOKENS:
                batch, tokens = (int(n) for n in shape.split("x"))
                entry = qkv_setting(hidden, rank, batch, tokens, args.seconds)
                results[f"{hidden}/{rank}/{shape}"] = {"hidden": hidden, "rank": rank, "tokens": shape, **entry}
                us = entry["us"]
                gain = {label: _gain(**value) for label, value in entry["speedups"].items()}
                print(
                    f"| {width} | {rank} | {shape} | {us['down x3']:.1f} | {us['down cat']:.1f} ({gain['down']}) | "
                    f"{us['proj x3']:.1f} | {us['proj cat']:.1f} ({gain['cat']}) | {us['proj x3T']:.1f} | "
                    f"{us['proj catT']:.1f} ({gain['catT']}) | {gain['catT_vs_x3T']} | {us['dense x3']:.1f} |",
                    flush=True,
                )
    return results


def _run_model(args) -> dict:
    from common import minilm_path
    from fused_qkv_prototype import fuse_qkv
    from gpu import random_inputs
    from transformers import AutoModelForSequenceClassification

    import drone_hf
    from drone_hf.profiling import measure_latency

    torch.manual_seed(0)
    dense = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    unfused = drone_hf.compress_model(dense, None, method="svd", rank=MODEL_RANK).eval()
    models = {
        "unfused": unfused,
        "fused (<= 128 tokens)": fuse_qkv(unfused),
        "fused (always)": fuse_qkv(unfused, max_tokens=10**9),
    }
    results = {}
    print(f"\n### MiniLM-L6, every linear at rank {MODEL_RANK}, fp32, {args.threads} threads: whole forward pass")
    print("| tokens | model | median ms | speed-up vs unfused (IQR of per-round ratios) | max abs logit diff |")
    print("|---|---|---:|---|---:|")
    for shape in MODEL_SHAPES:
        batch, tokens = (int(n) for n in shape.split("x"))
        inputs = random_inputs(unfused.config, batch, tokens, "cpu")
        record: dict = {}
        with torch.inference_mode():
            reference = unfused(**inputs).logits
            differences = {name: float((m(**inputs).logits - reference).abs().max()) for name, m in models.items()}
            medians = measure_latency(models, inputs, repeats=MODEL_ROUNDS[shape], warmup=5, record=record)
        wall = record["wall"]
        entry = {"rounds": MODEL_ROUNDS[shape], "load_average": record.get("load_average"), "models": {}}
        for name in models:
            ratios = sorted(u / m for u, m in zip(wall["unfused"], wall[name]))
            quartiles = [ratios[len(ratios) // 4], ratios[len(ratios) // 2], ratios[(3 * len(ratios)) // 4]]
            speedup = medians["unfused"] / medians[name]
            entry["models"][name] = {
                "ms": 1000 * medians[name],
                "speedup": speedup,
                "speedup_quartiles": quartiles,
                "max_abs_logit_diff": differences[name],
            }
            gain = "" if name == "unfused" else _gain(speedup, quartiles)
            print(f"| {shape} | {name} | {1000 * medians[name]:.2f} | {gain} | {differences[name]:.1e} |", flush=True)
        results[shape] = entry
    return results


def _run_ffn(args) -> dict:
    results = {}
    print(f"\n### FFN up-projection bias + GELU (-> {FFN['intermediate']}), fp32, {args.threads} threads: median us")
    names = None
    for label, in_features in (("dense 384", FFN["hidden"]), (f"DRONE up, rank {FFN['rank']}", FFN["rank"])):
        for shape in FFN["tokens"]:
            batch, tokens = (int(n) for n in shape.split("x"))
            entry = ffn_setting(in_features, FFN["intermediate"], batch, tokens, args.seconds, not args.no_compile)
            results[f"{label}/{shape}"] = {"in_features": in_features, "tokens": shape, **entry}
            if names is None:
                names = list(entry["us"])
                print("| input | tokens | " + " | ".join(names) + " | GELU share |")
                print("|---|---|" + "---:|" * (len(names) + 1))
            cells = [f"{entry['us'][n]:.1f} ({entry['speedup_vs_gelu_linear'][n]:.2f}x)" for n in names]
            print(f"| {label} | {shape} | " + " | ".join(cells) + f" | {100 * entry['gelu_share']:.0f}% |", flush=True)
    return results


if __name__ == "__main__":
    main()
