"""DRONE vs SVD on the sentence-transformers model all-MiniLM-L6-v2, calibrated on raw unlabeled sentences.

Every budget (uniform ranks, FLOP targets, cosine floors) is compressed with `drone_hf.compress_sentence_transformer`
by DRONE and by SVD and scored without retraining (and, with `--distill-steps N`, also with N steps of embedding
distillation on the calibration sentences: the "+distill N" rows) on:

* cosine fidelity: mean cosine similarity to the dense embeddings of held-out calibration-source sentences (not
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

The calibration text (`--calibration-source`) is SST-2 training sentences (default), or QNLI dev text: the QNLI dev
pairs are split in two halves by a seeded permutation; the questions and sentences of one half (minus any text that
also occurs in the other half) calibrate and give the held-out cosine sentences, and retrieval is scored on the other
half only.

    python benchmarks/sentence_embeddings.py --calibration-source qnli --budgets "FLOP 1.5x" "FLOP 2x" \
        --distill-steps 300                                  # in-domain calibration, with and without distillation

Prints a table and writes `benchmarks/results/sentence_embeddings_<model>[_qnli][_distill<N>].json`.
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
from drone_hf.defaults import DISTILL_LR_SCHEDULES
from drone_hf.glue import load_glue_split
from drone_hf.profiling import checkpoint_size_mb, count_parameters, flop_speedup_bound
from drone_hf.sentence_embeddings import measure_encode_latency, roc_auc
from drone_hf.speed import compare_recorded


BUDGETS = [
    ("rank 96", {"rank": 96}),
    ("rank 128", {"rank": 128}),
    ("FLOP 1.5x", {"target_speedup": 1.5}),
    ("FLOP 2x", {"target_speedup": 2.0}),
    ("cosine >= 0.99", {"min_cosine_similarity": 0.99}),
    ("cosine >= 0.98", {"min_cosine_similarity": 0.98}),
]
EXTRA_BUDGETS = [  # only when named in --budgets
    ("FLOP 2.1x", {"target_speedup": 2.1}),
    ("FLOP 2.2x", {"target_speedup": 2.2}),
]
METHODS = ("drone", "svd")
QNLI_SPLIT_SEED = 0
TARGET_SPEEDUP, TARGET_POINTS = 1.5, 1.0
CACHE_DIR = CACHE / "sentence_embeddings"


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", choices=["minilm", "mpnet"], default="minilm", help="all-MiniLM-L6-v2 or all-mpnet-base-v2"
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        choices=[label for label, _ in BUDGETS + EXTRA_BUDGETS],
        help=f"budgets to run (default: all but {', '.join(label for label, _ in EXTRA_BUDGETS)})",
    )
    parser.add_argument("--qnli-pairs", type=int, help="only the first N QNLI dev pairs (default: all 5463)")
    parser.add_argument(
        "--calibration-source",
        choices=["sst2", "qnli"],
        default="sst2",
        help="SST-2 training sentences, or the text of a seeded half of the QNLI dev pairs (retrieval is then scored "
        "on the other half only)",
    )
    parser.add_argument("--calibration-samples", type=int, default=1024, help="calibration sentences")
    parser.add_argument("--heldout-samples", type=int, default=512, help="further sentences of the same source")
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="also compress every (budget, method) with this many steps of embedding distillation on the calibration "
        "sentences (the '+distill N' rows)",
    )
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="learning rate of the distillation")
    parser.add_argument(
        "--distill-lr-schedule",
        choices=list(DISTILL_LR_SCHEDULES),
        default="constant",
        help="distill_options['lr_schedule']: constant, or decayed linearly to 0 at the last step",
    )
    parser.add_argument(
        "--distill-text",
        choices=["calibration", "qnli-rest"],
        default="calibration",
        help="what the distillation trains on: the calibration sentences, or those plus the texts of the QNLI dev "
        "pairs after the first --qnli-pairs that occur neither in the evaluated half nor among the held-out sentences "
        "(needs --calibration-source qnli and --qnli-pairs)",
    )
    parser.add_argument(
        "--relation-weight",
        type=float,
        default=0.0,
        help="distill_options['relation_weight']: MSE of the in-batch cosine matrices (default 0)",
    )
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
    mrpc = load_glue_split("mrpc", "validation", data_dir=_dev_dir("MRPC"))
    qnli = whole_qnli = load_glue_split("qnli", "validation", data_dir=_dev_dir("QNLI"))
    if args.quick:
        mrpc, qnli = mrpc.select(range(96)), qnli.select(range(400))
    elif args.qnli_pairs:
        qnli = qnli.select(range(min(args.qnli_pairs, len(qnli))))
    needed, loaded = args.calibration_samples + args.heldout_samples, len(qnli)
    if args.calibration_source == "qnli":
        calibration_half, evaluated = _qnli_halves(qnli)
        sentences = _qnli_calibration_text(calibration_half, evaluated)
        if len(sentences) < needed:
            raise SystemExit(
                f"The calibration half of {len(qnli)} QNLI dev pairs has {len(sentences)} distinct texts, fewer than "
                f"--calibration-samples + --heldout-samples = {needed}; use more --qnli-pairs or fewer samples."
            )
        qnli = evaluated
    else:
        train = load_glue_split("sst2", "train", data_dir=glue_data_dir("sst2"), max_samples=needed, seed=0).shuffle(
            seed=0
        )
        sentences = [s.strip() for s in train["sentence"]]
    entail = qnli.features["label"].str2int("entailment")
    corpus = list(dict.fromkeys(qnli["sentence"]))
    position = {sentence: i for i, sentence in enumerate(corpus)}
    relevant: dict[str, set[int]] = {}
    for question, sentence, label in zip(qnli["question"], qnli["sentence"], qnli["label"]):
        if label == entail:
            relevant.setdefault(question, set()).add(position[sentence])
    calibration, heldout = sentences[: args.calibration_samples], sentences[args.calibration_samples : needed]
    distill = None
    if args.distill_text == "qnli-rest":
        if args.calibration_source != "qnli" or loaded >= len(whole_qnli):
            raise SystemExit("--distill-text qnli-rest needs --calibration-source qnli and --qnli-pairs below 5463.")
        excluded = set(qnli["question"]) | set(qnli["sentence"]) | set(heldout)  # qnli: the evaluated half here
        rest = whole_qnli.select(range(loaded, len(whole_qnli)))
        texts = [t.strip() for t in dict.fromkeys([*rest["question"], *rest["sentence"]])]
        distill = list(dict.fromkeys(calibration + [t for t in texts if t and t not in excluded]))
    return {
        "calibration": calibration,
        "heldout": heldout,
        "distill": distill,
        "mrpc": (list(mrpc["sentence1"]), list(mrpc["sentence2"]), np.array(mrpc["label"])),
        "qnli": (list(relevant), corpus, list(relevant.values())),
        "qnli_pairs": len(qnli),
        "qnli_pairs_loaded": loaded,
        "timing": corpus[: args.timing_sentences],
    }


def _qnli_halves(qnli):
    """`(calibration half, evaluated half)` of the QNLI dev pairs, by a seeded permutation."""
    order = np.random.default_rng(QNLI_SPLIT_SEED).permutation(len(qnli))
    half = len(qnli) // 2
    return qnli.select(sorted(order[:half].tolist())), qnli.select(sorted(order[half:].tolist()))


def _qnli_calibration_text(calibration_half, evaluated) -> list[str]:
    """The distinct questions and sentences of `calibration_half` that occur nowhere in `evaluated`, in a seeded
    random order (calibration first, then held-out)."""
    excluded = set(evaluated["question"]) | set(evaluated["sentence"])
    texts = [t.strip() for t in dict.fromkeys([*calibration_half["question"], *calibration_half["sentence"]])]
    texts = [t for t in dict.fromkeys(texts) if t and t not in excluded]
    return [texts[i] for i in np.random.default_rng(QNLI_SPLIT_SEED).permutation(len(texts))]


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


def _compressed(args, dense, data, name: str, budget: dict, method: str, distill_steps: int = 0) -> dict:
    """Compresses `dense` for one (budget, method), with `distill_steps` of distillation, and saves it under
    `CACHE_DIR` (a run that stops part-way resumes from the models already saved); returns the row, with the folder to
    load the model from."""
    setting = f"cal{args.calibration_samples}-heldout{args.heldout_samples}-screening{args.screening_samples}"
    if args.calibration_source == "qnli":
        setting += f"-qnli{data['qnli_pairs_loaded']}-split{QNLI_SPLIT_SEED}"  # the pairs the halves were cut from
    if distill_steps:
        setting += f"-distill{distill_steps}-lr{args.distill_lr:g}"
        if args.distill_lr_schedule != "constant":
            setting += f"-{args.distill_lr_schedule}"
        if args.distill_text != "calibration":
            setting += f"-{args.distill_text}"
        if args.relation_weight:
            setting += f"-relation{args.relation_weight:g}"
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
            distill_steps=distill_steps,
            distill_options=(
                {
                    "lr": args.distill_lr,
                    "lr_schedule": args.distill_lr_schedule,
                    "relation_weight": args.relation_weight,
                }
                if distill_steps
                else None
            ),
            distill_sentences=data["distill"] if distill_steps else None,
            **budget,
        )
    except ValueError as error:  # a budget no compression meets
        print(f"{name}: {error}", flush=True)
        return {"budget": name.split(" / ")[0], "method": name.split(" / ")[1], "error": str(error)}
    encoder = small[0].auto_model
    row = {
        "budget": name.split(" / ")[0],
        "method": name.split(" / ")[1],
        "name": name,
        "compress_seconds": time.perf_counter() - begin,
        "ranks": dict(encoder.config.drone_ranks or {}),
        "attention_ranks": dict(encoder.config.drone_attention_ranks or {}),
        "allocation_heldout_cosine": report.get("heldout_cosine"),
        "allocation_evaluations": report.get("evaluations"),
        "distillation": report.get("distillation"),
    }
    small.save(str(folder))
    summary.write_text(json.dumps(row, indent=2))
    print(f"compressed {name} in {row['compress_seconds']:.0f} s", flush=True)
    return {**row, "folder": str(folder)}


def _data_text(args, data) -> dict[str, str]:
    """What the calibration, held-out and QNLI data are, for the printed setting and the JSON."""
    questions, corpus = len(data["qnli"][0]), len(data["qnli"][1])
    if args.calibration_source == "qnli":
        where = (
            f"QNLI dev texts (questions and sentences) of a seeded half (seed {QNLI_SPLIT_SEED}) of the "
            f"{data['qnli_pairs_loaded']} QNLI dev pairs used, none of it occurring in the other half"
        )
        texts = {
            "calibration": f"Calibration{' and distillation' if args.distill_steps else ''}: "
            f"{len(data['calibration'])} {where}.",
            "heldout": f"Held-out cosine: {len(data['heldout'])} further texts of that half.",
            "qnli": f"QNLI retrieval on the other half only ({data['qnli_pairs']} pairs): {questions} questions with "
            f"an entailment sentence, ranked among its {corpus} distinct sentences by cosine; MRR and accuracy@1, "
            "points.",
        }
    else:
        texts = {
            "calibration": f"Calibration{' and distillation' if args.distill_steps else ''}: "
            f"{len(data['calibration'])} SST-2 training sentences (seeded sample).",
            "heldout": f"Held-out cosine: {len(data['heldout'])} other SST-2 training sentences.",
            "qnli": f"QNLI retrieval: {questions} dev questions with an entailment sentence, ranked among {corpus} "
            "distinct dev sentences by cosine; MRR and accuracy@1, points.",
        }
    if args.distill_steps:
        texts["distillation"] = (
            f"+distill {args.distill_steps}: {args.distill_steps} AdamW steps (lr {args.distill_lr:g}"
            + (", decayed linearly to 0" if args.distill_lr_schedule == "linear" else ", constant")
            + f", batch "
            f"{args.batch_size}) of last-hidden-state MSE + 10 x (1 - cosine) of the embeddings"
            + (f" + {args.relation_weight:g} x MSE of the in-batch cosine matrices" if args.relation_weight else "")
            + " to the dense model, on "
            + (
                "the calibration sentences."
                if data["distill"] is None
                else f"{len(data['distill'])} texts: the calibration sentences and the QNLI dev texts of pairs "
                f"{data['qnli_pairs_loaded'] + 1}-5463 that occur neither in the evaluated half nor among the "
                "held-out sentences (unlabeled text of the kind embedded, never the evaluated text)."
            )
        )
    return texts


def main() -> None:
    args = _parser().parse_args()
    set_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    budgets = [BUDGETS[2], BUDGETS[4]] if args.quick else BUDGETS
    if args.budgets:
        budgets = [entry for entry in BUDGETS + EXTRA_BUDGETS if entry[0] in args.budgets]
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
    variants = [0, args.distill_steps] if args.distill_steps else [0]
    for label, budget in budgets:
        for method in args.methods:
            for steps in variants:
                name = f"{label} / {method}" + (f" +distill {steps}" if steps else "")
                row = _compressed(args, dense, data, name, budget, method, steps)
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
    record: dict = {}
    latency = measure_encode_latency(
        models, data["timing"], batch_size=32, repeats=args.latency_repeats, record=record
    )
    comparison = compare_recorded(
        record, reference="dense", flop_bounds={name: results[name]["flop_bound"] for name in models}
    )
    for name in models:
        results[name]["encode_ms"] = 1000 * latency[name]
        results[name]["speedup"] = latency["dense"] / latency[name]
        entry = comparison.models[name]
        results[name].update(
            cpu_speedup=entry.get("cpu_speedup"), speedup_range=entry.get("speedup_range"), flags=entry.get("flags")
        )
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
        ("cpu_speedup", "CPU-time ratio", ".2f"),
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
    print(comparison.note())
    machine = machine_description()
    print(" ".join(_data_text(args, data).values()))
    print(
        f"encode(): {len(data['timing'])} QNLI dev sentences, batch 32, {machine['threads']} threads, median of "
        f"{args.latency_repeats} round-robin rounds over all models in this process; FLOP bound at 128 tokens."
    )
    if args.quick:
        print("--quick: small subsets; the numbers above are a smoke test, not results.")
        return
    suffix = ("_qnli" if args.calibration_source == "qnli" else "") + (
        f"_distill{args.distill_steps}" if args.distill_steps else ""
    )
    if args.distill_steps and args.distill_text != "calibration":
        suffix += f"_{args.distill_text.replace('-', '')}"
    if args.distill_steps and args.distill_lr_schedule != "constant":
        suffix += f"_{args.distill_lr_schedule}"
    for label, _ in EXTRA_BUDGETS:  # a run of an extra budget does not overwrite the usual budgets' file
        if label in (args.budgets or ()):
            suffix += "_" + re.sub(r"[^\w.]+", "", label.lower())
    path = write_json(
        f"sentence_embeddings_{args.model}{suffix}",
        {
            "command": command_line(),
            "machine": machine,
            "seconds": time.perf_counter() - started,
            "load_average": {"start": load_before, "end": os.getloadavg()},
            "data": {
                **_data_text(args, data),
                "mrpc": f"{len(data['mrpc'][2])} MRPC dev pairs; ROC-AUC of cosine similarity, points",
                "timing": f"{len(data['timing'])} QNLI dev sentences, batch 32, {args.latency_repeats} round-robin "
                "rounds in one process (other jobs may have run on the machine meanwhile: see load_average and each "
                "row's CPU-time ratio, per-round speedup_range and flags)",
            },
            "calibration_source": args.calibration_source,
            "distillation": {
                "steps": args.distill_steps,
                "lr": args.distill_lr,
                "relation_weight": args.relation_weight,
                "text": args.distill_text,
                "texts": len(data["distill"] or data["calibration"]),
            }
            if args.distill_steps
            else None,
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
