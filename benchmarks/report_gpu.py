"""The GPU columns of the benchmark report (`benchmarks/report.py`), measured on a CUDA machine that has no data.

Speed on a GPU depends on the shapes alone: the ranks each model of the report was given (recorded per row in
`benchmarks/results/report.json`), not the values of its factors. So the report's models are rebuilt on the GPU from
their configurations, weights drawn at random, and timed there; nothing but this repository and the JSON has to travel.

    python benchmarks/report_gpu.py run --output gpu_report.json     # on the CUDA machine (the `device` tool)
    python benchmarks/report_gpu.py merge gpu_report.json            # here: fills report.json's GPU columns and
                                                                     # rewrites report.md and the plot

`run` builds, per task, the dense MiniLM-L6 (the `config.json` of `benchmarks/gpu_models/minilm/dense`) and every
compressed model of the report (the same configuration with the row's `drone_ranks` / `drone_attention_ranks`),
moves them to the GPU in fp32 (TF32 off, PyTorch's default) and bf16, and times a forward pass of all of them
round-robin in one process (`torch.cuda.synchronize` around each call, median of the timed rounds) on full-length
random token batches for every (dtype, batch, length) of `report.GPU_SETTINGS`. A distilled (`+KD`) model has its
parent's architecture and gets its parent's timing when merged.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu import build as build_folder  # noqa: E402  (the GPU benchmark's builder and inputs)
from gpu import random_inputs  # noqa: E402

from drone_hf.profiling import measure_latency, time_round_robin  # noqa: E402


RESULTS = REPO / "benchmarks" / "results"
DENSE_CONFIG = REPO / "benchmarks" / "gpu_models" / "minilm" / "dense" / "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (dtype, batch, tokens): the report's GPU columns. Kept here (not in report.py) so the device needs no `datasets`.
GPU_SETTINGS = [(d, b, t) for d in ("fp32", "bf16") for t in (128, 512) for b in (1, 32)]


def column(dtype: str, batch: int, tokens: int) -> str:
    return f"gpu_{dtype}_b{batch}_t{tokens}"


def row_config(dense: dict, row: dict) -> dict:
    """The `config.json` of one report row: the dense configuration, made a DRONE one with the row's ranks."""
    if row["ranks"] is None and row["attention_ranks"] is None:
        return dict(dense)
    method = "svd" if row["family"].startswith("SVD") else "drone"
    return {
        **dense,
        "model_type": "drone_bert",
        "architectures": ["DroneBertForSequenceClassification"],
        "drone_format_version": 1,
        "drone_method": method,
        "drone_ranks": row["ranks"] or {},
        "drone_attention_ranks": row["attention_ranks"],
        "drone_embedding": None,
        "drone_calibration": None,
    }


def build(config: dict):
    """The model `config` describes, weights drawn from N(0, 0.02), LayerNorms at identity, in eval mode."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        return build_folder(Path(folder))


@torch.inference_mode()
def graph_call(model, input_ids: torch.Tensor):
    """`model`'s forward on `input_ids` (full length, so no attention mask is needed) captured once in a CUDA graph:
    the returned call replays it and waits for the GPU, so one kernel launch per model instead of one per op."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
            model(input_ids=input_ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(input_ids=input_ids)

    def call():
        graph.replay()
        torch.cuda.synchronize()

    return call


def graph_speedups(models: dict, inputs: dict, args) -> tuple[dict[str, float], dict[str, float]]:
    """Speed-up over dense and milliseconds of each model replayed as a CUDA graph, timed round-robin."""
    calls = {name: graph_call(model, inputs["input_ids"]) for name, model in models.items()}
    latency = time_round_robin(calls, repeats=args.repeats, warmup=args.warmup)
    return {n: latency["dense"] / t for n, t in latency.items()}, {n: 1000 * t for n, t in latency.items()}


def run(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("`run` needs CUDA (torch.cuda.is_available() is False); `--device cpu` smoke-tests it.")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = json.loads(Path(args.report).read_text())
    dense = json.loads(DENSE_CONFIG.read_text())
    import transformers

    out = {
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else f"{device} (smoke test)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "tasks": {},
    }
    settings = [s for s in GPU_SETTINGS if s[1] in args.batches and s[2] in args.lengths]
    out["settings"] = [list(s) for s in settings]
    for task, entry in report["tasks"].items():
        rows = [row for row in entry["rows"] if not row["distilled"]]
        cpu_models = {row["name"]: build(row_config(dense, row)) for row in rows}
        speedups: dict[str, dict[str, float]] = {name: {} for name in cpu_models}
        latencies: dict[str, dict[str, float]] = {name: {} for name in cpu_models}
        graphs: dict[str, dict[str, float]] = {name: {} for name in cpu_models}
        graph_ms: dict[str, dict[str, float]] = {name: {} for name in cpu_models}
        for dtype_name in dict.fromkeys(s[0] for s in settings):
            models = {name: m.to(device=device, dtype=DTYPES[dtype_name]) for name, m in cpu_models.items()}
            for _, batch, tokens in (s for s in settings if s[0] == dtype_name):
                inputs = random_inputs(cpu_models["dense"].config, batch, tokens, device)
                latency = measure_latency(models, inputs, repeats=args.repeats, warmup=args.warmup)
                key = column(dtype_name, batch, tokens)
                for name in models:
                    speedups[name][key] = latency["dense"] / latency[name]
                    latencies[name][key] = 1000 * latency[name]
                print(
                    f"{task} {key}: dense {1000 * latency['dense']:.2f} ms; "
                    + ", ".join(f"{n} {speedups[n][key]:.2f}x" for n in models if n != "dense"),
                    flush=True,
                )
                if args.cuda_graphs and device.type == "cuda":
                    try:
                        speed, ms = graph_speedups(models, inputs, args)
                    except RuntimeError as error:  # a forward that cannot be captured: say so, keep the eager run
                        print(f"{task} {key}: CUDA graph capture failed: {error}", flush=True)
                        out.setdefault("cuda_graph_errors", []).append(f"{task} {key}: {error}")
                        continue
                    for name in models:
                        graphs[name][key], graph_ms[name][key] = speed[name], ms[name]
                    print(
                        f"{task} {key} CUDA graphs: dense {ms['dense']:.2f} ms; "
                        + ", ".join(f"{n} {speed[n]:.2f}x" for n in models if n != "dense"),
                        flush=True,
                    )
            cpu_models = {name: m.to("cpu", torch.float32) for name, m in models.items()}
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out["tasks"][task] = {"speedup": speedups, "latency_ms": latencies}
        if args.cuda_graphs and device.type == "cuda":
            out["tasks"][task].update(cuda_graph_speedup=graphs, cuda_graph_latency_ms=graph_ms)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(out, indent=2))
    print(f"wrote {output}", flush=True)


def merge(args) -> None:
    """Writes the measured GPU speed-ups into report.json's rows (a `+KD` row gets its parent's) and re-renders."""
    from report import Settings, write_report

    path = Path(args.report)
    report, gpu = json.loads(path.read_text()), json.loads(Path(args.path).read_text())
    missing = sorted(set(report["tasks"]) - set(gpu["tasks"]))
    if missing:
        raise SystemExit(f"{args.path} has no GPU timings for the report's tasks {missing}; run it on this report.")
    for task, entry in report["tasks"].items():
        measured = gpu["tasks"][task]["speedup"]
        for row in entry["rows"]:
            parent = row["name"].removesuffix(" +KD")
            if parent not in measured:
                raise SystemExit(f"{args.path} has no GPU timing of {task}'s model {parent!r}; rerun `run`.")
            row.update(measured[parent])
        entry["gpu"] = True
    report["gpu_machine"] = {k: gpu[k] for k in ("gpu", "torch", "cuda", "transformers", "repeats", "warmup")}
    report["gpu_columns"] = [column(*s) for s in map(tuple, gpu["settings"])]
    write_report(report, Settings(**report["settings"]), path.stem)
    print(f"Merged the GPU columns of {args.path} into {path} and rewrote {path.stem}.md")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="time the report's models on the GPU (a CUDA machine)")
    go.add_argument("--report", default=str(RESULTS / "report.json"))
    go.add_argument("--output", default=str(RESULTS / "report_gpu.json"))
    go.add_argument("--repeats", type=int, default=50)
    go.add_argument("--warmup", type=int, default=10)
    go.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    go.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    go.add_argument("--device", default="cuda", help="`cpu` only to smoke-test this script")
    go.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time every model replayed as one CUDA graph (no per-op launch cost), beside the eager timings",
    )
    fill = sub.add_parser("merge", help="fill report.json's GPU columns from a `run` output and re-render")
    fill.add_argument("path", nargs="?", default=str(RESULTS / "report_gpu.json"))
    fill.add_argument("--report", default=str(RESULTS / "report.json"))
    args = parser.parse_args(argv)
    run(args) if args.command == "run" else merge(args)


if __name__ == "__main__":
    main()
