"""Deployment table (issue 15): a dense classifier and its DRONE versions on SST-2, each in float32, bfloat16 and
dynamic int8 (MiniLM by default; any fine-tuned classifier with `--teacher`, e.g. the base-size MPNet).

    python benchmarks/deployment.py [--task sst2] [--teacher-steps 300] [--teacher PATH] [--rank 96]
        [--target-speedup 1.5 | --target-speedup 0] [--budget-model DIR ...] [--forms fp32 bf16 int8]
        [--rank-multiple 8] [--calibration-samples 512] [--repeats 30] [--threads N]
        [--max-eval-samples N] [--sweep-multiple 8 | --no-sweep] [--name deployment_minilm]

Rows: dense, DRONE at one uniform rank (every encoder linear), DRONE under a `target_speedup` budget whose ranks
are allocated with the kernels measured in that form (`compress_model(..., dtype=/quantize=)`), and each
`--budget-model`: a model already compressed from the same teacher under an accuracy budget (`drone-hf compress
--max-accuracy-drop 1.0 --output DIR`), cast to bfloat16 / quantised to int8 as it is (its ranks were chosen by
held-out accuracy in float32), in each form; one saved in a deployment form (`--quantize int8`, `--dtype bfloat16`)
has a row in that form only. Columns:
dev accuracy, latency of batch 8 x 128 tokens (every model timed round-robin in this one process, so that load drift
hits all alike), speed-up over dense float32 AND over dense in the same form, the multiply-add bound, checkpoint size,
and "saves + reloads": each model is saved with `save_pretrained`, reloaded with stock
`AutoModelForSequenceClassification.from_pretrained` (no dtype argument) after `import drone_hf`, and checked to come
back in the same dtype and module kinds with `torch.equal` logits.

Before the table, a GEMM sweep: for each MiniLM linear shape and form, the dense product against the factored pair at
every multiple of `--sweep-multiple` up to the multiply-add break-even (the same `KernelCosts` the budget rows use),
and the measured break-even at multiples of 8, 16 and 32. Writes benchmarks/results/<--name>.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from common import (
    add_threads_argument,
    calibration_batches,
    command_line,
    given_or_finetuned_teacher,
    glue_data_dir,
    latency_inputs,
    load_budget_models,
    machine_description,
    print_table,
    script_parser,
    set_threads,
    write_json,
)
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf.calibration import model_inputs
from drone_hf.candidates import breakeven_rank
from drone_hf.deployment import deployed_copy, is_quantized
from drone_hf.evaluation import evaluate_glue
from drone_hf.glue import get_glue_task, load_glue
from drone_hf.kernel_costs import KernelCosts
from drone_hf.profiling import flop_speedup_bound, measure_latency


FORMS = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}}
COLUMNS = [
    ("form", "form", "s"),
    ("model", "model", "s"),
    ("ranks", "ranks", "s"),
    ("accuracy", "dev accuracy", ".2f"),
    ("delta", "Δ vs dense fp32", "+.2f"),
    ("latency_ms", "latency ms", ".1f"),
    ("speedup_vs_fp32", "speed-up vs dense fp32", ".2f"),
    ("speedup_vs_form", "speed-up vs dense same form", ".2f"),
    ("flop_bound", "FLOP bound", ".2f"),
    ("checkpoint_mb", "checkpoint MB", ".1f"),
    ("reloads", "saves + reloads", "s"),
]


def parse_args():
    parser = script_parser(__doc__)
    parser.add_argument("--teacher-steps", type=int, default=300, help="fine-tuning steps of the cached teacher")
    parser.add_argument("--teacher", help="a fine-tuned classifier folder to use instead of the cached teacher")
    parser.add_argument("--rank", type=int, default=96, help="the uniform-rank rows")
    parser.add_argument(
        "--target-speedup", type=float, default=1.5, help="the budget rows (multiply-add target); 0: no such rows"
    )
    parser.add_argument(
        "--budget-model",
        nargs="*",
        default=[],
        help="folders of models compressed from the same teacher under an accuracy budget (drone-hf compress "
        "--max-accuracy-drop B --output DIR): rows of their own, in each form",
    )
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS), help="the deployment forms")
    parser.add_argument("--name", default="deployment_minilm", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--rank-multiple", type=int, default=8, help="rank step of the budget rows' grids")
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--max-eval-samples", type=int, help="a seeded subset of the dev split (smoke runs)")
    parser.add_argument("--repeats", type=int, default=30, help="timed round-robin rounds (batch 8 x 128)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sweep-multiple", type=int, default=8, help="rank step of the GEMM sweep")
    parser.add_argument("--no-sweep", action="store_true", help="skip the GEMM sweep (the budgets still measure)")
    add_threads_argument(parser)
    return parser.parse_args()


def _sweep(costs: dict[str, KernelCosts], shapes, multiple: int) -> dict:
    """Dense vs factored seconds at every multiple of `multiple` below the multiply-add break-even, per shape and
    form, and the measured break-even at multiples of 8, 16 and 32."""
    sweep = {}
    for form, cost in costs.items():
        for out_features, in_features in shapes:
            ranks = list(range(multiple, breakeven_rank(out_features, in_features) + 1, multiple))
            print(f"  {form} {out_features}x{in_features}: dense + {len(ranks)} ranks", flush=True)
            times = cost.seconds("linear", (out_features, in_features), [None, *ranks])
            paying = [k for k in ranks if times[k] < times[None]]
            sweep[f"{form} {out_features}x{in_features}"] = {
                "dense_ms": 1000 * times[None],
                "factored_ms": {k: 1000 * times[k] for k in ranks},
                "flop_breakeven": breakeven_rank(out_features, in_features),
                "measured_breakeven": {m: max((k for k in paying if k % m == 0), default=0) for m in (8, 16, 32)},
            }
    return sweep


def _in_form(model, options):
    """`model` (a float32 model) in a deployment form: itself for float32, else a new bfloat16 or int8 copy."""
    return deployed_copy(model, **options) if options else model


def _saved_form(model) -> str:
    """The form a loaded `--budget-model` was saved in: "int8" (`config.drone_quantization`, e.g. `drone-hf compress
    --quantize int8`, whose budget was split by int8 kernel times), "bf16", or "fp32"."""
    if is_quantized(model):
        return "int8"
    return "bf16" if model.dtype == torch.bfloat16 else "fp32"


def _build(teacher, stats, args, costs, provenance):
    """Name -> (form, kind, model, allocation report or error) for every row."""
    rows = {}
    budget_models = load_budget_models(args.budget_model)
    saved_forms = {label: _saved_form(model) for label, model in budget_models.items()}
    for label, saved in saved_forms.items():
        if saved not in args.forms:
            print(f"  {label}: saved in {saved}, not among --forms {args.forms}: no row", flush=True)
    for form in [form for form in FORMS if form in args.forms]:  # fp32 first: the accuracy baseline
        options = FORMS[form]
        rows[f"dense {form}"] = (form, "dense", _in_form(teacher, options), None)
        uniform = drone_hf.compress_model(teacher, stats, rank=args.rank, calibration_info=provenance, **options)
        rows[f"drone r{args.rank} {form}"] = (form, f"drone rank {args.rank}", uniform, None)
        for label, model in budget_models.items():
            saved = saved_forms[label]
            if saved == "fp32":
                rows[f"{label} {form}"] = (form, label, _in_form(model, options), None)
            elif saved == form:  # already deployed: a row in its own form only, as saved
                rows[f"{label} {form}"] = (form, label, model, None)
        if not args.target_speedup:
            continue
        report = {}
        try:
            budget = drone_hf.compress_model(
                teacher,
                stats,
                target_speedup=args.target_speedup,
                rank_multiple=args.rank_multiple,
                calibration_info=provenance,
                allocation_report=report,
                allocation_options={"kernel_costs": costs[form], "seq_len": args.seq_len},
                **options,
            )
        except ValueError as error:  # e.g. no rank pays in this form on this machine: recorded, not fatal
            print(f"  {form} budget: {error}", flush=True)
            budget, report = None, str(error)
        rows[f"drone x{args.target_speedup:g} {form}"] = (form, f"drone x{args.target_speedup:g}", budget, report)
    return rows


def _reloads(model, inputs) -> tuple[str, float]:
    """Saves, reloads with stock from_pretrained (no dtype), compares; returns ("yes"/why not, checkpoint MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        megabytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 1e6
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp).eval()
    kinds = [type(m).__name__ for m in model.modules()]
    if [type(m).__name__ for m in loaded.modules()] != kinds:
        return "no: other module kinds", megabytes
    if loaded.dtype != model.dtype:
        return f"no: reloads in {loaded.dtype}", megabytes
    with torch.inference_mode():
        same = torch.equal(model(**model_inputs(model, inputs)).logits, loaded(**model_inputs(loaded, inputs)).logits)
    return ("yes" if same else "no: other logits"), megabytes


def _ranks(model) -> str:
    ranks = sorted(set((model.config.drone_ranks or {}).values())) if hasattr(model.config, "drone_ranks") else []
    attention = sorted(set((getattr(model.config, "drone_attention_ranks", None) or {}).values()))
    text = "–" if not ranks else (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
    return text + (f", qk {attention[0]}–{attention[-1]}" if attention else "")


def main():
    args = parse_args()
    set_threads(args.threads)
    info = get_glue_task(args.task)
    started = time.perf_counter()
    if "fp32" not in args.forms:
        raise SystemExit("--forms must include fp32: every speed-up is also stated against dense float32.")
    print(f"[1/5] teacher: {args.teacher or f'MiniLM fine-tuned on {info.name} (cached)'}", flush=True)
    teacher, tokenizer, _ = given_or_finetuned_teacher(args.teacher, info.name, steps=args.teacher_steps)
    dev = load_glue(
        info.name,
        tokenizer,
        split=info.dev_splits[0],
        data_dir=glue_data_dir(info.name),
        max_samples=args.max_eval_samples,
        seed=0,
    )
    inputs = latency_inputs(tokenizer, dev, seq_len=args.seq_len)
    tokens = 8 * args.seq_len
    costs = {
        form: KernelCosts(FORMS[form].get("dtype", torch.float32), quantize=FORMS[form].get("quantize"), tokens=tokens)
        for form in args.forms
    }
    print(f"[2/5] GEMM sweep ({torch.get_num_threads()} threads, {tokens} tokens)", flush=True)
    shapes = sorted(
        {tuple(m.weight.shape) for n, m in teacher.named_modules() if n.endswith(".dense") and ".layer." in n}
    )
    sweep = {} if args.no_sweep else _sweep(costs, shapes, args.sweep_multiple)

    print(f"[3/5] calibrating on {args.calibration_samples} training rows; compressing in each form", flush=True)
    stats = drone_hf.collect_activation_stats(
        teacher, calibration_batches(info.name, tokenizer, num_samples=args.calibration_samples)
    )
    provenance = {"dataset": f"glue/{info.name}", "split": "train", "num_samples": args.calibration_samples, "seed": 0}
    built = _build(teacher, stats, args, costs, provenance)
    models = {name: model.eval() for name, (_, _, model, _) in built.items() if model is not None}

    print(f"[4/5] timing {len(models)} models round-robin ({args.repeats} rounds), evaluating", flush=True)
    latency = measure_latency(models, inputs, repeats=args.repeats)
    rows = []
    base = None
    for name, (form, kind, model, report) in built.items():
        row = {"name": name, "form": form, "model": kind}
        if model is None:
            rows.append({**row, "ranks": "not feasible", "reloads": "–", "error": report})
            continue
        accuracy = 100 * evaluate_glue(model, dev, tokenizer, info.name)[info.main_metric]
        base = accuracy if base is None else base
        reloads, megabytes = _reloads(model, inputs)
        rows.append(
            {
                **row,
                "ranks": _ranks(model),
                "accuracy": accuracy,
                "delta": accuracy - base,
                "latency_ms": 1000 * latency[name],
                "speedup_vs_fp32": latency["dense fp32"] / latency[name],
                "speedup_vs_form": latency[f"dense {form}"] / latency[name],
                "flop_bound": flop_speedup_bound(teacher.config, model.config, args.seq_len),
                "checkpoint_mb": megabytes,
                "reloads": reloads,
                "allocation": {k: report[k] for k in ("kernel_costs", "grids", "seconds") if k in report}
                if report
                else None,
                "drone_ranks": getattr(model.config, "drone_ranks", None),
                "drone_attention_ranks": getattr(model.config, "drone_attention_ranks", None),
            }
        )

    print("[5/5] results\n", flush=True)
    table = print_table(rows, COLUMNS)
    setting = (
        f"{info.name} {info.dev_splits[0]} ({len(dev)} examples); latency: batch 8 x {args.seq_len} tokens, CPU, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} round-robin rounds in one process."
    )
    print(f"\n{setting}")
    path = write_json(
        args.name,
        {
            "command": command_line(),
            "machine": machine_description(),
            "setting": setting,
            "table": table,
            "rows": rows,
            "gemm_sweep": sweep,
            "seconds": time.perf_counter() - started,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
