"""ONNX Runtime at base size: all-mpnet-base-v2 dense against the shapes of saved DRONE budget models, in PyTorch fp32
and ONNX Runtime fp32 (`drone_hf.export_onnx(..., optimize=True)`), batch 8 x 128 and 1 x 128, timed round-robin in
one process. Writes benchmarks/results/<--name>.json.

    python benchmarks/onnx_runtime_base_size.py [--ranks-from FILE] [--threads 2] [--repeats-b8 10]
        [--repeats-b1 20] [--name onnx_runtime_mpnet_shapes]
    python benchmarks/onnx_runtime_base_size.py --teacher DIR --budget-model DIR [DIR ...] [--name NAME]

Speed on a CPU depends on the shapes (ranks), not on the values of the factors. So the compressed models here are the
pretrained all-mpnet-base-v2 (fetched as `benchmarks/mpnet_glue.py` does, outside the repository) factored by SVD at
the linear and attention ranks recorded for each "budget" row of `--ranks-from`, a `benchmarks/deployment.py` result
of a base-size run (default: benchmarks/results/deployment_mpnet_mrpc_zen4_active_thp.json, the MRPC 1.0- and
1.5-point budget models of session 22, whose dev F1 is in that file). This needs no fine-tuned base-size teacher, which
takes about 100 minutes to train on a 2-core CPU without bf16 units. It measures what the exported graphs cost: dense
MPNet (12 `MultiHeadAttention`, since session 27) against each budget's shapes, in each runtime. Accuracy is not
measured here (random classifier head): quote the budget's F1 from `--ranks-from`.

With `--budget-model` (`drone-hf compress --max-accuracy-drop B` outputs of a fine-tuned base-size teacher, given
with `--teacher`), those saved models themselves are timed against the teacher, and the dev metric of each is the one
its `drone_results.json` recorded (the CLI reads the dev split once, at the end); `--ranks-from` rows are then added
only when that option is given.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
from pathlib import Path


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/onnx_runtime.py: before torch loads libgomp

import torch  # noqa: E402
from common import REPO, load_budget_models, print_table, script_parser, set_threads  # noqa: E402
from mpnet_glue import mpnet_path  # noqa: E402
from onnx_runtime import add_same_runtime_ratios, ort_session, round_robin_calls, write_results  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import drone_hf  # noqa: E402
from drone_hf.onnx_export import export_onnx  # noqa: E402
from drone_hf.profiling import flop_speedup_bound, time_round_robin  # noqa: E402


DEFAULT_RANKS = REPO / "benchmarks" / "results" / "deployment_mpnet_mrpc_zen4_active_thp.json"
COLUMNS = [
    ("model", "model", "s"),
    ("runtime", "runtime", "s"),
    ("attention", "fused attention", "s"),
    ("b1_ms", "b1×128 ms", ".1f"),
    ("b1_same", "b1 vs dense same runtime", ".2f"),
    ("b8_ms", "b8×128 ms", ".1f"),
    ("b8_speedup", "b8 vs dense torch", ".2f"),
    ("b8_same", "b8 vs dense same runtime", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
    ("source_dev", "budget's dev metric (Δ), as recorded", "s"),
]


def parse_args():
    parser = script_parser(__doc__)
    parser.add_argument(
        "--ranks-from",
        help=f"a benchmarks/deployment.py result JSON (default without --budget-model: {DEFAULT_RANKS})",
    )
    parser.add_argument("--teacher", help="the dense model to time (default: all-mpnet-base-v2, random head)")
    parser.add_argument(
        "--budget-model",
        nargs="*",
        default=[],
        help="saved `drone-hf compress` outputs of --teacher: rows of their own",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats-b8", type=int, default=10)
    parser.add_argument("--repeats-b1", type=int, default=20)
    parser.add_argument(
        "--name", default="onnx_runtime_mpnet_shapes", help="results file: benchmarks/results/NAME.json"
    )
    args = parser.parse_args()
    if args.budget_model and not args.teacher:
        parser.error("--budget-model: give the dense model they were compressed from with --teacher.")
    if args.ranks_from is None and not args.budget_model:
        args.ranks_from = str(DEFAULT_RANKS)
    return args


def recorded_dev(folder: Path) -> str:
    """`"f1 90.02 (-0.70)"`: the main dev metric of a `drone-hf compress` output and its change from the dense model,
    from its `drone_results.json`."""
    record = json.loads((folder / "drone_results.json").read_text())
    metric, results = record["metric"], record["results"]
    method = next(name for name in results if name != "dense")
    value, dense = (100 * results[name]["metrics"][metric] for name in (method, "dense"))
    return f"{metric} {value:.2f} ({value - dense:+.2f})"


def budget_rows(path: str) -> dict[str, dict]:
    """The fp32 rows of a deployment result whose model is a budget, by label: ranks, attention ranks, dev metric."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {
        row["model"]: row
        for row in rows
        if row["form"] == "fp32" and "budget" in row["model"] and row.get("drone_ranks") is not None
    }


def main():
    args = parse_args()
    set_threads(args.threads)
    started = time.perf_counter()
    sources = budget_rows(args.ranks_from) if args.ranks_from else {}
    if args.ranks_from and not sources:
        raise SystemExit(f"{args.ranks_from} holds no fp32 budget row with `drone_ranks`.")
    if args.teacher:
        dense = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    else:
        dense = AutoModelForSequenceClassification.from_pretrained(mpnet_path(), num_labels=2).eval()
    models, devs = {"dense": dense}, {}
    for label, row in sources.items():
        models[label] = drone_hf.compress_model(
            dense, None, method="svd", ranks=row["drone_ranks"], attention_ranks=row["drone_attention_ranks"] or None
        ).eval()
        devs[label] = f"{row['accuracy']:.2f} ({row['delta']:+.2f})"
    # one entry per folder, in their order
    for (label, model), folder in zip(load_budget_models(args.budget_model).items(), map(Path, args.budget_model)):
        models[label], devs[label] = model, recorded_dev(folder)
    tmp = tempfile.TemporaryDirectory()
    rows, exports = [], {}
    print(f"[1/2] exporting {len(models)} models (optimize=True)", flush=True)
    for label, model in models.items():
        folder = Path(tmp.name) / f"m{len(exports)}"
        report = export_onnx(model, folder, optimize=True)
        exports[label] = {key: report[key] for key in ("attention_blocks_multihead", "attention_blocks_narrow_scores")}
        exports[label]["model.onnx"] = report["files"]["model.onnx"]
        ops, layers = report["files"]["model.onnx"]["fused_ops"], dense.config.num_hidden_layers
        fused = " + ".join(f"{ops[op]}/{layers} {op}" for op in ("Attention", "MultiHeadAttention") if ops.get(op))
        bound = 1.0 if label == "dense" else flop_speedup_bound(dense.config, model.config)
        common_row = {"model": label, "flop_bound": bound, "source_dev": devs.get(label, "–")}
        rows.append({**common_row, "runtime": "torch fp32", "attention": "–", "_torch": model})
        rows.append({**common_row, "runtime": "ORT fp32", "attention": fused or "none",
                     "_session": ort_session(folder / "model.onnx", args.threads)})  # fmt: skip
    print(f"[2/2] timing round-robin, {args.threads} threads, batch 8 and 1 x 128 tokens", flush=True)
    generator = torch.Generator().manual_seed(0)
    timing = {}
    for name, batch, repeats in (("b8", 8, args.repeats_b8), ("b1", 1, args.repeats_b1)):
        ids = torch.randint(1000, dense.config.vocab_size - 1, (batch, 128), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in inspect.signature(dense.forward).parameters:  # BERT-family teachers; MPNet has none
            inputs["token_type_ids"] = torch.zeros_like(ids)
        calls = round_robin_calls(rows, inputs)
        medians = time_round_robin(calls, repeats=repeats, warmup=2)
        timing[name] = {"repeats": repeats, "seconds": medians}
        for row in rows:
            row[f"{name}_ms"] = 1000 * medians[f"{row['model']} | {row['runtime']}"]
            row[f"{name}_speedup"] = medians["dense | torch fp32"] / medians[f"{row['model']} | {row['runtime']}"]
    add_same_runtime_ratios(rows)
    what = [f"the shapes of the budgets in {args.ranks_from} (SVD factors)"] if sources else []
    what += [f"the saved budget models {', '.join(args.budget_model)}"] if args.budget_model else []
    print(
        f"\n{args.teacher or 'all-mpnet-base-v2 (random head)'} and {' and '.join(what)}; median of shuffled "
        f"round-robin rounds in one process, {args.threads} threads, all-ones masks:\n"
    )
    table = print_table(rows, COLUMNS)
    given = {"ranks_from": args.ranks_from, "teacher": args.teacher, "budget_models": args.budget_model}
    write_results(args.name, given, rows, table, exports, timing, started)
    tmp.cleanup()


if __name__ == "__main__":
    main()
