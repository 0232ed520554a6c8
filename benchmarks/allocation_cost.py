"""The cost and the result of the two accuracy-budget searches (`--allocation-search fast|exhaustive`), end to end.

Each run is one `drone-hf compress --max-accuracy-drop B --allocation-search S` (defaults otherwise: 512 calibration
rows, 2048 held-out training rows, of them the search's screening rows (256 fast, 512 exhaustive; 512 for both
before session 32), one standard error of margin, bias-corrected DRONE), saved
under `.cache/allocation_cost/<name>-drop<B>-<search>/`; its `drone_results.json` holds the allocation's held-out
evaluations, row passes and wall time, the chosen FLOP bound, the measured speed-up and the full dev split's metric.
Without `--run`, the script prints the table of every finished run and writes
`benchmarks/results/allocation_cost.json`.
Run each heavy step alone on a shared machine:

    flock /tmp/drone_heavy.lock python benchmarks/allocation_cost.py --finetune-mrpc        # MiniLM MRPC teacher
    flock /tmp/drone_heavy.lock python benchmarks/allocation_cost.py --run minilm-sst2 \\
        --model .cache/finetuned/minilm-sst2-steps300-bs32-lr0.0001-len64-seed0 --task sst2 --budget 1.0 --search fast
    python benchmarks/allocation_cost.py                                                    # the table
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, REPO, SHARED_GLUE, command_line, finetune, machine_description, print_table, write_json

from drone_hf.glue import get_glue_task


RUNS = CACHE / "allocation_cost"
COLUMNS = [
    ("name", "model / task", "s"),
    ("options", "options", "s"),
    ("budget", "budget", ".1f"),
    ("search", "search", "s"),
    ("evaluations", "held-out evaluations", "d"),
    ("joint_checks", "joint checks", "d"),
    ("row_passes", "row passes (k)", ".1f"),
    ("allocation_minutes", "allocation (min)", ".1f"),
    ("flop_bound", "FLOP bound", ".2f"),
    ("speedup", "CPU speed-up", ".2f"),
    ("dev_dense", "dev dense", ".2f"),
    ("dev", "dev compressed", ".2f"),
    ("heldout_drop", "held-out drop", ".2f"),
    ("heldout_se", "± SE", ".2f"),
]


def run(name: str, model: str, task: str, budget: float, search: str, threads: int, extra: list[str]) -> Path:
    """One `drone-hf compress` run into `RUNS/<name>-drop<budget>-<search>` (replaced if it exists); `extra`: more
    `drone-hf compress` options (e.g. `--heldout-samples 1024`)."""
    output = RUNS / f"{name}-drop{budget:g}-{search}"
    data_dir = SHARED_GLUE / get_glue_task(task).local_dir
    command = [
        sys.executable,
        "-m",
        "drone_hf",
        "compress",
        "--model",
        model,
        "--task",
        task,
        *(["--data-dir", str(data_dir)] if (data_dir / "train.tsv").is_file() else []),
        "--max-accuracy-drop",
        str(budget),
        "--allocation-search",
        search,
        "--threads",
        str(threads),
        "--output",
        str(output),
        "--overwrite",
        *extra,
    ]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    record = json.loads((output / "drone_results.json").read_text())
    record["benchmark"] = {
        "name": name,
        "model": model,
        "options": extra,
        "wall_seconds": time.perf_counter() - started,
    }
    (output / "drone_results.json").write_text(json.dumps(record, indent=2))
    return output


def _row_passes(allocation: dict, layers: int) -> float:
    """Held-out row passes of an exhaustive search, counted from its report the way `LayerwiseEvaluator` counts them
    (for runs made before it counted): each curve point re-runs the layers from its module's on over the screening
    rows, the cache advances once through the layers, and each joint check (and the dense reference) runs every
    layer over all held-out rows."""
    screening, heldout = allocation["screening_examples"], allocation["heldout_examples"]
    passes = screening * (1 + (layers - 1) / layers) + heldout * (1 + len(allocation["joint_checks"]))
    for name, curve in allocation["curves"].items():
        layer = int(re.search(r"\.layer\.(\d+)\.", name).group(1))
        passes += len(curve) * screening * (layers - layer) / layers
    return passes


def row(record: dict, layers: int) -> dict:
    allocation, results = record["allocation"], record["results"]
    if "heldout_row_passes" not in allocation and "curves" in allocation:
        allocation["heldout_row_passes"] = _row_passes(allocation, layers)
    method = record["method"]
    metric = next(iter(results["dense"]["metrics"]))
    return {
        "name": record["benchmark"]["name"],
        "options": " ".join(record["benchmark"].get("options", [])) or "defaults",
        "budget": record["budget"]["max_accuracy_drop"],
        "search": allocation.get("search", "exhaustive"),
        "evaluations": allocation["evaluations"],
        "joint_checks": allocation.get("joint_check_count", len(allocation["joint_checks"])),
        "row_passes": allocation["heldout_row_passes"] / 1000 if "heldout_row_passes" in allocation else None,
        "allocation_minutes": allocation["seconds"] / 60,
        "ms_per_row_pass": 1000 * allocation["evaluation_seconds"] / allocation["heldout_row_passes"]
        if allocation.get("heldout_row_passes")
        else None,
        "compress_minutes": record["compress_seconds"] / 60,
        "flop_bound": results[method]["flop_bound"],
        "speedup": results[method]["speedup"],
        "metric": metric,
        "dev_dense": 100 * results["dense"]["metrics"][metric],
        "dev": 100 * results[method]["metrics"][metric],
        "heldout_drop": allocation["heldout_drop"],
        "heldout_se": allocation["heldout_standard_error"],
    }


def table(name: str = "allocation_cost") -> None:
    """Prints the table of every finished run and writes it to `benchmarks/results/<name>.json`."""
    records = [
        (json.loads(p.read_text()), json.loads((p.parent / "config.json").read_text())["num_hidden_layers"])
        for p in sorted(RUNS.glob("*/drone_results.json"))
    ]
    rows = sorted(
        (row(r, layers) for r, layers in records if "benchmark" in r),
        key=lambda r: (r["name"], r["budget"], r["search"] != "exhaustive"),
    )
    text = print_table(rows, COLUMNS)
    payload = {"command": command_line(), "machine": machine_description(), "rows": rows, "table": text}
    print(f"Wrote {write_json(name, payload)}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", metavar="NAME", help="run one compression, named NAME in the table")
    parser.add_argument("--model", help="the fine-tuned model folder (with --run)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--budget", type=float, default=1.0, help="--max-accuracy-drop")
    parser.add_argument("--search", choices=["fast", "exhaustive"], default="fast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `drone-hf compress` options")
    parser.add_argument("--finetune-mrpc", action="store_true", help="fine-tune (or find) the MiniLM MRPC teacher")
    parser.add_argument(
        "--json-name", default="allocation_cost", help="the table's JSON: benchmarks/results/<name>.json"
    )
    args = parser.parse_args()
    if args.finetune_mrpc:
        _, _, path, seconds = finetune("mrpc", steps=350, max_length=128)
        print(f"MiniLM MRPC teacher: {path} ({seconds:.0f} s)")
    elif args.run:
        if not args.model:
            parser.error("--run needs --model")
        run(args.run, args.model, args.task, args.budget, args.search, args.threads, args.extra)
    else:
        table(args.json_name)


if __name__ == "__main__":
    main()
