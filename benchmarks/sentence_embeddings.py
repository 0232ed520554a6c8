"""DRONE vs SVD on the sentence-transformers model all-MiniLM-L6-v2, calibrated on raw unlabeled SST-2 sentences.

Every budget (uniform ranks, FLOP targets, cosine floors) is compressed with `drone_hf.compress_sentence_transformer`
by DRONE and by SVD and scored without retraining on:

* cosine fidelity: mean cosine similarity to the dense embeddings of held-out SST-2 training sentences (not
  calibrated on);
* MRPC dev: ROC-AUC (points) of the cosine similarity of the two sentences, paraphrase vs not;
* QNLI dev retrieval: every question with an `entailment` sentence ranks all distinct dev sentences by cosine; MRR and
  accuracy@1 (points) of the entailed sentence;
* measured `encode()` speed-up: QNLI dev sentences, batch 32, all models timed round-robin in this process;
* size (encoder parameters, safetensors MB) and the FLOP bound at 128 tokens.

    python benchmarks/sentence_embeddings.py                 # the full table (about 40 min on 2 quiet cores)
    python benchmarks/sentence_embeddings.py --quick         # a smoke run on small subsets (numbers meaningless)
    python benchmarks/sentence_embeddings.py --model mpnet --budgets "FLOP 2x" --qnli-pairs 1500
                                                             # all-mpnet-base-v2 (base size) at one budget

Prints a table and writes `benchmarks/results/sentence_embeddings_<model>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np
from common import (
    CACHE,
    SHARED_GLUE,
    add_threads_argument,
    command_line,
    glue_data_dir,
    machine_description,
    minilm_path,
    print_table,
    set_threads,
    write_json,
)

import drone_hf
from drone_hf.glue import load_glue_split
from drone_hf.profiling import checkpoint_size_mb, count_parameters, flop_speedup_bound
from drone_hf.sentence_embeddings import measure_encode_latency, roc_auc


BUDGETS = [
    ("rank 96", {"rank": 96}),
    ("rank 128", {"rank": 128}),
    ("FLOP 1.5x", {"target_speedup": 1.5}),
    ("FLOP 2x", {"target_speedup": 2.0}),
    ("cosine >= 0.99", {"min_cosine_similarity": 0.99}),
    ("cosine >= 0.98", {"min_cosine_similarity": 0.98}),
]
METHODS = ("drone", "svd")
TARGET_SPEEDUP, TARGET_POINTS = 1.5, 1.0
CACHE_DIR = CACHE / "sentence_embeddings"


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", choices=["minilm", "mpnet"], default="minilm", help="all-MiniLM-L6-v2 or all-mpnet-base-v2"
    )
    parser.add_argument(
        "--budgets", nargs="+", choices=[label for label, _ in BUDGETS], help="a subset of the budgets (default: all)"
    )
    parser.add_argument("--qnli-pairs", type=int, help="only the first N QNLI dev pairs (default: all 5463)")
    parser.add_argument("--calibration-samples", type=int, default=1024, help="SST-2 training sentences")
    parser.add_argument("--heldout-samples", type=int, default=512, help="further SST-2 training sentences")
    parser.add_argument("--timing-sentences", type=int, default=256, help="QNLI dev sentences timed per round")
    parser.add_argument("--latency-repeats", type=int, default=5, help="timed encode() rounds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + ["drone-bc"])
    parser.add_argument("--no-attention", action="store_true", help="budgets do not factor the attention scores")
    parser.add_argument(
        "--screening-samples",
        type=int,
        default=128,
        help="held-out sentences for the cosine budget's per-module curves (its joint checks use all of them)",
    )
    parser.add_argument("--no-cache", action="store_true", help=f"recompress even if {CACHE_DIR} has the model")
    parser.add_argument("--quick", action="store_true", help="small subsets and two budgets: a smoke run")
    add_threads_argument(parser)
    return parser


def _encode(model, sentences, batch_size: int = 32) -> np.ndarray:
    return model.encode(
        sentences, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )


def _dev_dir(folder: str) -> str | None:
    """`../shared/glue` when it holds the task's dev split (QNLI has no train split there), else None (the Hub)."""
    return str(SHARED_GLUE) if (SHARED_GLUE / folder / "dev.tsv").is_file() else None


def _data(args):
    train = load_glue_split(
        "sst2",
        "train",
        data_dir=glue_data_dir("sst2"),
        max_samples=args.calibration_samples + args.heldout_samples,
        seed=0,
    ).shuffle(seed=0)
    sentences = [s.strip() for s in train["sentence"]]
    mrpc = load_glue_split("mrpc", "validation", data_dir=_dev_dir("MRPC"))
    qnli = load_glue_split("qnli", "validation", data_dir=_dev_dir("QNLI"))
    if args.quick:
        mrpc, qnli = mrpc.select(range(96)), qnli.select(range(400))
    elif args.qnli_pairs:
        qnli = qnli.select(range(min(args.qnli_pairs, len(qnli))))
    entail = qnli.features["label"].str2int("entailment")
    corpus = list(dict.fromkeys(qnli["sentence"]))
    position = {sentence: i for i, sentence in enumerate(corpus)}
    relevant: dict[str, set[int]] = {}
    for question, sentence, label in zip(qnli["question"], qnli["sentence"], qnli["label"]):
        if label == entail:
            relevant.setdefault(question, set()).add(position[sentence])
    return {
        "calibration": sentences[: args.calibration_samples],
        "heldout": sentences[args.calibration_samples :],
        "mrpc": (list(mrpc["sentence1"]), list(mrpc["sentence2"]), np.array(mrpc["label"])),
        "qnli": (list(relevant), corpus, list(relevant.values())),
        "timing": corpus[: args.timing_sentences],
    }


def _scores(model, data, dense_heldout, batch_size: int) -> dict[str, float]:
    heldout = _encode(model, data["heldout"], batch_size)
    first, second, labels = data["mrpc"]
    similarity = (_encode(model, first, batch_size) * _encode(model, second, batch_size)).sum(-1)
    questions, corpus, relevant = data["qnli"]
    scores = _encode(model, questions, batch_size) @ _encode(model, corpus, batch_size).T
    ranks = []
    for row, wanted in zip(scores, relevant):
        best = max(row[i] for i in wanted)
        others = np.delete(row, list(wanted))
        ranks.append(1 + int((others > best).sum()))
    ranks = np.array(ranks)
    return {
        "cosine": float((heldout * dense_heldout).sum(-1).mean()),
        "mrpc_auc": 100 * roc_auc(similarity, labels),
        "qnli_mrr": 100 * float((1.0 / ranks).mean()),
        "qnli_acc1": 100 * float((ranks == 1).mean()),
    }


def _compressed(args, dense, data, name: str, budget: dict, method: str) -> dict:
    """Compresses `dense` for one (budget, method) and saves it under `CACHE_DIR` (a run that stops part-way resumes
    from the models already saved); returns the row, with the folder to load the model from."""
    setting = f"cal{args.calibration_samples}-heldout{args.heldout_samples}-screening{args.screening_samples}"
    slug = re.sub(r"[^\w.]+", "-", name).strip("-") + ("-no-attention" if args.no_attention else "")
    folder = CACHE_DIR / setting / slug if args.model == "minilm" else CACHE_DIR / args.model / setting / slug
    summary = folder / "benchmark_row.json"
    if summary.is_file() and not args.no_cache:
        print(f"reusing {name} from {folder}", flush=True)
        return {**json.loads(summary.read_text()), "folder": str(folder)}
    report: dict = {}
    begin = time.perf_counter()
    options = {"screening_samples": args.screening_samples} if "min_cosine_similarity" in budget else None
    try:
        small = drone_hf.compress_sentence_transformer(
            dense,
            data["calibration"],
            method=method,
            heldout_sentences=data["heldout"],
            batch_size=args.batch_size,
            attention=not args.no_attention,
            allocation_options=options,
            allocation_report=report,
            **budget,
        )
    except ValueError as error:  # a budget no compression meets
        print(f"{name}: {error}", flush=True)
        return {"budget": name.split(" / ")[0], "method": method, "error": str(error)}
    encoder = small[0].auto_model
    row = {
        "budget": name.split(" / ")[0],
        "method": method,
        "name": name,
        "compress_seconds": time.perf_counter() - begin,
        "ranks": dict(encoder.config.drone_ranks or {}),
        "attention_ranks": dict(encoder.config.drone_attention_ranks or {}),
        "allocation_heldout_cosine": report.get("heldout_cosine"),
        "allocation_evaluations": report.get("evaluations"),
    }
    small.save(str(folder))
    summary.write_text(json.dumps(row, indent=2))
    print(f"compressed {name} in {row['compress_seconds']:.0f} s", flush=True)
    return {**row, "folder": str(folder)}


def main() -> None:
    args = _parser().parse_args()
    set_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    budgets = [BUDGETS[2], BUDGETS[4]] if args.quick else BUDGETS
    if args.budgets:
        budgets = [entry for entry in BUDGETS if entry[0] in args.budgets]
    if args.quick:
        args.calibration_samples, args.heldout_samples, args.timing_sentences = 128, 64, 64
        args.latency_repeats = 1
    started, load_before = time.perf_counter(), os.getloadavg()
    data = _data(args)
    if args.model == "mpnet":
        from mpnet_glue import mpnet_path

        dense = SentenceTransformer(mpnet_path())
    else:
        dense = SentenceTransformer(minilm_path())
    dense.eval()
    models, rows = {"dense": dense}, []
    for label, budget in budgets:
        for method in args.methods:
            name = f"{label} / {method}"
            row = _compressed(args, dense, data, name, budget, method)
            rows.append(row)
            if "error" not in row:
                models[name] = SentenceTransformer(row.pop("folder")).eval()
    dense_heldout = _encode(dense, data["heldout"], args.batch_size)
    results = {}
    for name, model in models.items():
        results[name] = _scores(model, data, dense_heldout, args.batch_size)
        encoder = model[0].auto_model
        results[name].update(
            params_m=count_parameters(encoder) / 1e6,
            size_mb=checkpoint_size_mb(encoder),
            flop_bound=flop_speedup_bound(dense[0].auto_model.config, encoder.config, 128),
        )
        print(f"scored {name}", flush=True)
    latency = measure_encode_latency(models, data["timing"], batch_size=32, repeats=args.latency_repeats)
    for name in models:
        results[name]["encode_ms"] = 1000 * latency[name]
        results[name]["speedup"] = latency["dense"] / latency[name]
    dense_row = {"budget": "dense", "method": "–", "name": "dense"}
    table = []
    for row in [dense_row, *rows]:
        if "error" in row:
            table.append({"budget": row["budget"], "method": row["method"], "note": "budget not met"})
            continue
        r = results[row["name"]]
        d = results["dense"]
        entry = {**{k: v for k, v in row.items() if k != "name"}, **r}
        entry.update(
            d_mrpc=r["mrpc_auc"] - d["mrpc_auc"],
            d_mrr=r["qnli_mrr"] - d["qnli_mrr"],
            d_acc1=r["qnli_acc1"] - d["qnli_acc1"],
        )
        entry["meets_target"] = bool(
            r["speedup"] >= TARGET_SPEEDUP
            and min(entry["d_mrpc"], entry["d_mrr"], entry["d_acc1"]) >= -TARGET_POINTS
            and row["budget"] != "dense"
        )
        table.append(entry)
    columns = [
        ("budget", "budget", "s"),
        ("method", "method", "s"),
        ("cosine", "cosine to dense (held-out)", ".4f"),
        ("mrpc_auc", "MRPC ROC-AUC", ".2f"),
        ("d_mrpc", "Δ", "+.2f"),
        ("qnli_mrr", "QNLI MRR", ".2f"),
        ("d_mrr", "Δ", "+.2f"),
        ("qnli_acc1", "QNLI acc@1", ".2f"),
        ("d_acc1", "Δ", "+.2f"),
        ("speedup", "encode() speed-up", ".2f"),
        ("flop_bound", "FLOP bound", ".2f"),
        ("params_m", "params (M)", ".2f"),
        ("size_mb", "size MB", ".1f"),
    ]
    text = print_table(table, columns)
    met = [f"{row['budget']} / {row['method']}" for row in table if row.get("meets_target")]
    verdict = (
        f"Target (measured encode() speed-up >= {TARGET_SPEEDUP}x with MRPC AUC, QNLI MRR and acc@1 each within "
        f"{TARGET_POINTS} point of dense): " + (f"met by {', '.join(met)}." if met else "not met by any row.")
    )
    print("\n" + verdict)
    print(f"Load average (1, 5, 15 min): {load_before} at the start, {os.getloadavg()} at the end.")
    machine = machine_description()
    print(
        f"encode(): {len(data['timing'])} QNLI dev sentences, batch 32, {machine['threads']} threads, median of "
        f"{args.latency_repeats} round-robin rounds over all models in this process; FLOP bound at 128 tokens."
    )
    if args.quick:
        print("--quick: small subsets; the numbers above are a smoke test, not results.")
        return
    path = write_json(
        f"sentence_embeddings_{args.model}",
        {
            "command": command_line(),
            "machine": machine,
            "seconds": time.perf_counter() - started,
            "load_average": {"start": load_before, "end": os.getloadavg()},
            "data": {
                "calibration": f"{len(data['calibration'])} SST-2 training sentences (seeded sample)",
                "heldout": f"{len(data['heldout'])} other SST-2 training sentences",
                "mrpc": f"{len(data['mrpc'][2])} MRPC dev pairs; ROC-AUC of cosine similarity, points",
                "qnli": f"{len(data['qnli'][0])} QNLI dev questions with an entailment sentence, ranked among "
                f"{len(data['qnli'][1])} distinct dev sentences by cosine; MRR and accuracy@1, points",
                "timing": f"{len(data['timing'])} QNLI dev sentences, batch 32, {args.latency_repeats} round-robin "
                "rounds",
            },
            "attention": not args.no_attention,
            "screening_samples": args.screening_samples,
            "rows": table,
            "target": verdict,
            "table": text,
        },
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
