"""The benchmark report in one command: SVD, DRONE and DRONE+attention at several FLOP budgets (each also with
distillation when `drone_hf.distill` is available) on GLUE tasks, with the embedded MiniLM-L6.

    python benchmarks/report.py                          # full run: SST-2, MRPC, CoLA (~1 h on a 2-core CPU)
    python benchmarks/report.py --quick --tasks sst2     # smoke run (about a minute)
    python benchmarks/report.py --tasks mrpc --budgets 1.5 2 3 --distill-steps 0
    python benchmarks/report.py --tasks cola --update    # re-run one task, keep the others in report.json
    python benchmarks/report.py --render-only            # redraw report.md and the plot from report.json

Writes, in benchmarks/results/: report.md (tables), report.json (every number) and report_pareto.png (dev metric vs
measured CPU speed-up, with each model's FLOP bound drawn in); `--quick` writes report_quick.* instead. Results are
rewritten after each task, so an interrupted run keeps the tasks it finished. With a CUDA device, GPU speed-ups
(fp32 / bf16, batch 1 and 32, 128 and 512 tokens) are added as extra columns; `benchmarks/report_gpu.py` measures the
same columns for an existing report.json on a CUDA machine that has no data (the `device` tool) and merges them.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from common import (
    RESULTS,
    calibration_batches,
    finetune,
    glue_data_dir,
    latency_inputs,
    machine_description,
    write_json,
)
from report_gpu import GPU_SETTINGS, column

import drone_hf
from drone_hf.evaluation import evaluate_glue
from drone_hf.glue import get_glue_task, load_glue
from drone_hf.profiling import checkpoint_size_mb, count_parameters, flop_speedup_bound, measure_latency


# label -> (method, DRONE attention); SVD is the data-free baseline (Ben Noach & Goldberg 2020) on the same layout.
METHODS = {"SVD": ("svd", False), "DRONE": ("drone", False), "DRONE+attention": ("drone", True)}
PLOT_RANGE = 20.0  # points below dense that the Pareto plot's axis shows


@dataclass
class Settings:
    tasks: list[str] = field(default_factory=lambda: ["sst2", "mrpc", "cola"])
    budgets: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0])
    steps: int | None = None  # None: the task's entry in TEACHERS
    max_length: int | None = None
    dev_rows: int | None = None
    calibration_samples: int = 512
    distill_steps: int = 100
    distill_rows: int = 3200
    latency_repeats: int = 20
    seq_len: int = 128
    latency_batch: int = 8
    quick: bool = False


# Fine-tuning steps and maximum length of each task's teacher when `--steps` / `--max-length` are not given: the same
# teachers as the demo and the other benchmark scripts (cached under .cache/finetuned). Pairs (MRPC) need 128 tokens;
# CoLA needs about three epochs (800 steps: dev MCC 31.6; 300 steps gave 15.4).
TEACHERS = {"sst2": (300, 64), "mrpc": (350, 128), "cola": (800, 64)}
DEFAULT_TEACHER = (400, 128)

QUICK = {
    "budgets": [2.0],
    "steps": 40,
    "max_length": 64,
    "dev_rows": 200,
    "calibration_samples": 128,
    "distill_steps": 10,
    "distill_rows": 320,
    "latency_repeats": 5,
}


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--tasks", nargs="+", default=None, help=f"GLUE tasks (default {defaults.tasks})")
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=None,
        help=f"FLOP speed-up targets (`target_speedup`), default {defaults.budgets}",
    )
    parser.add_argument("--quick", action="store_true", help=f"small smoke settings: {QUICK}")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the markdown and the plot from the JSON of an earlier run (report.json, or report_quick.json "
        "with --quick), without running anything",
    )
    for name in (
        "steps",
        "max_length",
        "dev_rows",
        "calibration_samples",
        "distill_steps",
        "distill_rows",
        "latency_repeats",
        "seq_len",
        "latency_batch",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {getattr(defaults, name) or f'per task {TEACHERS}'} "
            f"({QUICK.get(name, 'same')} with --quick)",
        )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other tasks of the existing report.json and replace (or add) only the tasks run now",
    )
    parsed = vars(parser.parse_args())
    modes = {"render_only": parsed.pop("render_only"), "update": parsed.pop("update")}
    settings = {**asdict(defaults), **(QUICK if parsed["quick"] else {})}
    settings.update({key: value for key, value in parsed.items() if value is not None})
    if settings["tasks"] and settings["tasks"] != defaults.tasks:
        settings["tasks"] = [get_glue_task(task).name for task in settings["tasks"]]
    if settings["distill_steps"] < 0 or not settings["budgets"] or min(settings["budgets"]) <= 1:
        parser.error(
            f"--budgets must be > 1 and --distill-steps >= 0, got {settings['budgets']}, {settings['distill_steps']}."
        )
    return Settings(**settings), modes


def distill_function(settings: Settings, task: str, tokenizer):
    """`student -> distilled student` when `drone_hf.distill` exists and `--distill-steps > 0`, else None."""
    if settings.distill_steps == 0:
        return None
    try:
        from drone_hf import DroneDistillationArguments, distill
    except ImportError:
        print("drone_hf.distill is not available: skipping the distilled rows.", flush=True)
        return None
    from transformers import TrainingArguments

    train = load_glue(
        task,
        tokenizer,
        split="train",
        data_dir=glue_data_dir(task),
        max_length=teacher_settings(task, settings)[1],
        max_samples=settings.distill_rows,
        seed=1,
    )
    scratch = tempfile.mkdtemp(prefix="drone-report-")

    def run(student, teacher):
        base = TrainingArguments(
            output_dir=scratch,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            report_to="none",
            save_strategy="no",
        )
        arguments = DroneDistillationArguments(
            max_steps=settings.distill_steps, logging_steps=max(1, settings.distill_steps // 5)
        )
        return distill(student, teacher, train, arguments, training_args=base, processing_class=tokenizer)

    return run


def gpu_speedups(models: dict, inputs_for, settings: Settings) -> dict[str, dict[str, float]]:
    """Speed-up of each model over the dense one on the GPU, per (dtype, batch, tokens) of `GPU_SETTINGS`; `{}`
    without CUDA. (`benchmarks/report_gpu.py` measures the same columns for an existing report on another machine.)"""
    if not torch.cuda.is_available():
        return {}
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for dtype_name in dict.fromkeys(s[0] for s in GPU_SETTINGS):
        dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        moved = {name: copy.deepcopy(model).to("cuda", dtype) for name, model in models.items()}
        for _, batch, tokens in (s for s in GPU_SETTINGS if s[0] == dtype_name):
            inputs = {k: v.to("cuda") for k, v in inputs_for(batch, tokens).items()}
            latency = measure_latency(moved, inputs, repeats=max(settings.latency_repeats, 20), warmup=5)
            for name in models:
                results[name][column(dtype_name, batch, tokens)] = latency["dense"] / latency[name]
        del moved
        torch.cuda.empty_cache()
    return results


def teacher_settings(task: str, settings: Settings) -> tuple[int, int]:
    """`(fine-tuning steps, max_length)` of `task`'s teacher: the command line's, else the task's entry in TEACHERS."""
    steps, max_length = TEACHERS.get(task, DEFAULT_TEACHER)
    return settings.steps or steps, settings.max_length or max_length


def run_task(task: str, settings: Settings) -> dict:
    info = get_glue_task(task)
    started = time.perf_counter()
    steps, max_length = teacher_settings(info.name, settings)
    print(f"\n=== {info.name}: fine-tuning MiniLM ({steps} steps, {max_length} tokens, cached) ===", flush=True)
    teacher, tokenizer, teacher_path, train_seconds = finetune(info.name, steps=steps, max_length=max_length)
    dev = load_glue(
        info.name,
        tokenizer,
        split=info.dev_splits[0],
        data_dir=glue_data_dir(info.name),
        max_length=max_length,
        max_samples=settings.dev_rows,
    )
    batches = calibration_batches(info.name, tokenizer, num_samples=settings.calibration_samples)
    stats = drone_hf.collect_activation_stats(teacher, batches)
    provenance = {
        "dataset": f"glue/{info.name}",
        "split": "train",
        "num_samples": settings.calibration_samples,
        "seed": 0,
    }
    models, rows = {"dense": teacher}, [{"name": "dense", "family": "dense", "budget": None, "distilled": False}]
    for budget in settings.budgets:
        for label, (method, attention) in METHODS.items():
            name = f"{label} @{budget:g}x"
            print(f"compressing: {name}", flush=True)
            models[name] = drone_hf.compress_model(
                teacher,
                stats if method == "drone" else None,
                method=method,
                target_speedup=budget,
                attention=attention,
                calibration_info=provenance if method == "drone" else None,
            )
            rows.append({"name": name, "family": label, "budget": budget, "distilled": False})
    # Timing comes before any distillation: a Trainer run in this process can leave global state that slows later
    # CPU forward passes. A distilled model has its parent's architecture and reuses its parent's timing.
    print(f"timing on CPU (batch {settings.latency_batch} x {settings.seq_len} tokens, round-robin)", flush=True)
    cpu_inputs = latency_inputs(tokenizer, dev, batch_size=settings.latency_batch, seq_len=settings.seq_len)
    latency = measure_latency(models, cpu_inputs, repeats=settings.latency_repeats)
    gpu = gpu_speedups(models, lambda b, t: latency_inputs(tokenizer, dev, batch_size=b, seq_len=t), settings)
    distill = distill_function(settings, info.name, tokenizer)
    if distill is not None:
        for row in list(rows[1:]):
            print(f"distilling: {row['name']} ({settings.distill_steps} steps)", flush=True)
            models[f"{row['name']} +KD"] = distill(copy.deepcopy(models[row["name"]]), teacher)
            rows.append({**row, "name": f"{row['name']} +KD", "family": f"{row['family']} +KD", "distilled": True})
    rows = [rows[0]] + sorted(
        rows[1:], key=lambda r: (r["budget"], list(METHODS).index(r["family"].split()[0]), r["distilled"])
    )
    print(f"evaluating {len(models)} models on {len(dev)} {info.dev_splits[0]} rows", flush=True)
    for row in rows:
        model, parent = models[row["name"]], row["name"].removesuffix(" +KD")
        metrics = evaluate_glue(model, dev, tokenizer, info.name)
        row.update(
            metric=100 * metrics[info.main_metric],
            metrics=metrics,
            params_m=count_parameters(model) / 1e6,
            encoder_params_m=count_parameters(model, "bert.encoder.") / 1e6,
            checkpoint_mb=checkpoint_size_mb(model),
            flop_bound=flop_speedup_bound(teacher.config, model.config, settings.seq_len),
            ranks=getattr(model.config, "drone_ranks", None),
            attention_ranks=getattr(model.config, "drone_attention_ranks", None),
            latency_ms=1000 * latency[parent],
            speedup=latency["dense"] / latency[parent],
            **gpu.get(parent, {}),
        )
        row["delta"] = row["metric"] - rows[0]["metric"]
    return {
        "task": info.name,
        "metric_name": info.main_metric,
        "dev_split": info.dev_splits[0],
        "dev_rows": len(dev),
        "teacher": str(teacher_path),
        "teacher_steps": steps,
        "max_length": max_length,
        "fine_tune_seconds": train_seconds,
        "gpu": bool(gpu),
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def summary_table(results: dict) -> list[str]:
    """One row per (budget, method), one column group per task: Δ without and with distillation, CPU speed-up."""
    tasks = list(results["tasks"].values())
    by_name = [{row["name"]: row for row in task["rows"]} for task in tasks]
    header = "| FLOP budget | method |" + "".join(
        f" {t['task']} Δ | {t['task']} +KD Δ | {t['task']} CPU × |" for t in tasks
    )
    lines = [
        "## Summary (Δ = dev metric − dense, points)",
        "",
        header,
        "|---|---|" + "---:|---:|---:|" * len(tasks),
        "| dense | – |" + "".join(f" {rows['dense']['metric']:.2f} | | 1.00 |" for rows in by_name),
    ]
    for row in tasks[0]["rows"][1:] if tasks else []:
        if row["distilled"]:
            continue
        cells = [f"{row['budget']:g}×", row["family"]]
        for rows in by_name:
            plain, distilled = rows.get(row["name"]), rows.get(f"{row['name']} +KD")
            cells += [
                f"{plain['delta']:+.2f}" if plain else "–",
                f"{distilled['delta']:+.2f}" if distilled else "–",
                f"{plain['speedup']:.2f}" if plain else "–",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: dict, settings: Settings) -> str:
    machine = results["machine"]
    lines = [
        "# drone_hf benchmark report" + (" (quick smoke settings)" if settings.quick else ""),
        "",
        "MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned per task (steps and token length in each heading); calibration on "
        f"{settings.calibration_samples} training rows; ranks chosen by `compress_model(target_speedup=...)` "
        f"(FLOP budget); distillation {settings.distill_steps} steps on {settings.distill_rows} training rows "
        "(`+KD`, when available; timed as the undistilled model, same architecture). Dev metric in points; "
        "CPU speed-up = dense latency / model latency "
        f"(median of {settings.latency_repeats} round-robin runs, batch {settings.latency_batch} x {settings.seq_len} "
        f"tokens, {machine['threads']} threads, {machine['cpu']}); FLOP bound = dense / compressed multiply-adds.",
        "",
    ]
    if "gpu_machine" in results:
        gpu = results["gpu_machine"]
        lines += [
            f"GPU columns: speed-up over the dense model in the same dtype on {gpu['gpu']} (torch {gpu['torch']}, "
            f"CUDA {gpu['cuda']}), measured by `benchmarks/report_gpu.py` on the rows' architectures (weights drawn "
            f"at random: GPU speed depends on the shapes only), round-robin, median of {gpu['repeats']} after "
            f"{gpu['warmup']} warm-up rounds, fp32 without TF32; `+KD` rows share their parent's architecture.",
            "",
        ]
    lines += summary_table(results)
    for task in results["tasks"].values():
        gpu_columns = results.get("gpu_columns", [column(*s) for s in GPU_SETTINGS]) if task["gpu"] else []
        lines += [
            f"## {task['task']} ({task['metric_name']}, {task['dev_rows']} {task['dev_split']} rows; teacher "
            f"{task['teacher_steps']} steps, {task['max_length']} tokens)",
            "",
            "| model | params (M) | checkpoint MB | dev metric | Δ | CPU speed-up | FLOP bound |"
            + "".join(" GPU {} b{}×{} |".format(*c[4:].replace("_b", "_t").split("_t")) for c in gpu_columns),
            "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(gpu_columns),
        ]
        for row in task["rows"]:
            cells = [
                row["name"],
                f"{row['params_m']:.2f}",
                f"{row['checkpoint_mb']:.1f}",
                f"{row['metric']:.2f}",
                f"{row['delta']:+.2f}",
                f"{row['speedup']:.2f}",
                f"{row['flop_bound']:.2f}",
            ]
            cells += [f"{row[c]:.2f}" for c in gpu_columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"![Pareto plot]({results['plot']})")
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"].values())
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    colours = {"SVD": "tab:gray", "DRONE": "tab:blue", "DRONE+attention": "tab:orange"}
    for axis, task in zip(axes[0], tasks):
        dense = task["rows"][0]
        # A collapsed model (e.g. F1 = 0) would squash every other curve: the axis stops PLOT_RANGE points below
        # dense and such points sit on its floor as down-triangles labelled with their value.
        floor = max(min(r["metric"] for r in task["rows"]), dense["metric"] - PLOT_RANGE)
        top = max(r["metric"] for r in task["rows"])
        axis.set_ylim(floor - 0.04 * (top - floor + 1), top + 0.06 * (top - floor + 1))
        axis.scatter([1.0], [dense["metric"]], marker="*", s=160, color="black", label="dense", zorder=3)
        axis.axhline(dense["metric"], color="black", lw=0.6, alpha=0.4)
        axis.axhline(dense["metric"] - 1.0, color="black", lw=0.6, alpha=0.4, linestyle="--")
        for family in dict.fromkeys(row["family"] for row in task["rows"][1:]):
            points = sorted((r for r in task["rows"] if r["family"] == family), key=lambda r: r["budget"])
            colour, distilled = colours[family.removesuffix(" +KD")], family.endswith("+KD")
            style = {"color": colour, "linestyle": "--" if distilled else "-", "marker": "s" if distilled else "o"}
            shown = [max(r["metric"], floor) for r in points]
            axis.plot([r["speedup"] for r in points], shown, label=family, **style)
            for r, y in zip(points, shown):  # the FLOP bound: the same accuracy with a perfectly efficient kernel
                axis.plot([r["speedup"], r["flop_bound"]], [y, y], ":", color=colour, lw=0.8)
                axis.scatter([r["flop_bound"]], [y], facecolors="none", edgecolors=colour, s=30)
                if r["metric"] < floor:
                    axis.scatter([r["speedup"]], [y], marker="v", s=70, color=colour, zorder=4)
                    axis.annotate(
                        f"{r['metric']:.1f}",
                        (r["speedup"], y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=colour,
                    )
        axis.set(
            title=f"{task['task']} ({task['dev_rows']} {task['dev_split']} rows)",
            xlabel="speed-up over dense (measured CPU; hollow = FLOP bound)",
            ylabel=f"dev {task['metric_name']} (points)",
        )
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best", framealpha=0.6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: dict, settings: Settings, stem: str) -> str:
    """Writes `<stem>.md`, `<stem>.json` and the Pareto PNG (each replaced whole) and returns the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    pareto_plot(results, RESULTS / results["plot"])
    text = markdown(results, settings)
    tmp = RESULTS / f"{stem}.md.tmp"
    tmp.write_text(text)
    tmp.replace(RESULTS / f"{stem}.md")
    write_json(stem, results)
    return text


def main():
    settings, modes = parse_args()
    stem = "report_quick" if settings.quick else "report"
    path = RESULTS / f"{stem}.json"
    if (modes["render_only"] or modes["update"]) and not path.exists():
        raise SystemExit(f"--render-only / --update need {path} from an earlier run.")
    if modes["render_only"]:
        results = json.loads(path.read_text())
        write_report(results, Settings(**results["settings"]), stem)
        print(f"Rewrote {RESULTS / stem}.md and {results['plot']} from {path}")
        return
    if modes["update"]:
        results = json.loads(path.read_text())
        kept = [name for name in results["tasks"] if name not in settings.tasks]
        per_task = ("tasks", "steps", "max_length")  # recorded per task in the results
        before = {k: v for k, v in results["settings"].items() if k not in per_task}
        now = {k: v for k, v in asdict(settings).items() if k not in per_task}
        if before != now or results["machine"] != machine_description():
            raise SystemExit(f"--update: {path} was written with other settings or on another machine; rerun all.")
        print(f"--update: keeping {kept} from {path}", flush=True)
        results["settings"]["tasks"] = [*kept, *settings.tasks]
        for task in settings.tasks:
            results["tasks"].pop(task, None)
    else:
        results = {
            "settings": asdict(settings),
            "machine": machine_description(),
            "tasks": {},
            "plot": f"{stem}_pareto.png",
        }
    for task in settings.tasks:
        results["tasks"][task] = run_task(task, settings)
        print("\n" + write_report(results, settings, stem), flush=True)
    print(f"Wrote {RESULTS / stem}.md, {stem}.json and {results['plot']}")


if __name__ == "__main__":
    main()
