"""Variants of embedding distillation for all-MiniLM-L6-v2 at one FLOP budget (issue 12's open target), each scored
like `sentence_embeddings.py --calibration-source qnli --qnli-pairs 2000`: held-out cosine, MRPC dev ROC-AUC, QNLI
MRR and accuracy@1 on the evaluated half of the first 2000 QNLI dev pairs. No timing (the models of one budget have
the same ranks; `sentence_embeddings.py` times them). One JSON line per run is appended to
`benchmarks/results/sentence_embedding_distill_variants.jsonl`.

    python benchmarks/sentence_embedding_distill_variants.py --steps 2000 --distill-text qnli-rest
    python benchmarks/sentence_embedding_distill_variants.py --steps 2000 --distill-text qnli-rest --also-glue-text
    python benchmarks/sentence_embedding_distill_variants.py --steps 300 --relation-weight 100
    python benchmarks/sentence_embedding_distill_variants.py --steps 2000 --distill-text qnli-rest --no-attention
    python benchmarks/sentence_embedding_distill_variants.py --steps 2000 --distill-text qnli-rest --lr 2e-4 \
        --lr-schedule linear [--no-balance]
"""

from __future__ import annotations

import argparse
import json
import time

import sentence_embeddings as se
from common import RESULTS, add_threads_argument, command_line, glue_data_dir, minilm_path, set_threads

import drone_hf
from drone_hf.defaults import DISTILL_LR_SCHEDULES
from drone_hf.glue import load_glue_split
from drone_hf.profiling import flop_speedup_bound


def _parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=300, help="distillation steps (0: none)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-schedule", choices=list(DISTILL_LR_SCHEDULES), default="constant")
    parser.add_argument("--seed", type=int, default=0, help="distill_options['seed']: batch order")
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--cosine-weight", type=float, default=10.0)
    parser.add_argument("--relation-weight", type=float, default=0.0)
    parser.add_argument("--distill-text", choices=["calibration", "qnli-rest"], default="calibration")
    parser.add_argument(
        "--also-glue-text",
        action="store_true",
        help="add the MRPC training sentences and 8000 seeded SST-2 training sentences to the distillation text",
    )
    parser.add_argument("--no-attention", action="store_true", help="do not factor the attention scores")
    parser.add_argument(
        "--no-balance",
        action="store_true",
        help="distill_options['balance_factors']=False: train DRONE's factor pairs as they come (the default before "
        "balancing existed)",
    )
    add_threads_argument(parser)
    return parser


def main() -> None:
    args = _parser().parse_args()
    set_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    setting = se._parser().parse_args(
        ["--calibration-source", "qnli", "--qnli-pairs", "2000", "--distill-text", args.distill_text]
    )
    data = se._data(setting)
    distill = data["distill"]
    if args.also_glue_text:
        questions, corpus, _ = data["qnli"]
        excluded = set(questions) | set(corpus) | set(data["heldout"])
        mrpc = load_glue_split("mrpc", "train", data_dir=glue_data_dir("mrpc"))
        sst2 = load_glue_split("sst2", "train", data_dir=glue_data_dir("sst2")).shuffle(seed=1).select(range(8000))
        more = [t.strip() for t in [*mrpc["sentence1"], *mrpc["sentence2"], *sst2["sentence"]]]
        distill = list(dict.fromkeys((distill or data["calibration"]) + [t for t in more if t and t not in excluded]))
    dense = SentenceTransformer(minilm_path()).eval()
    report: dict = {}
    started = time.perf_counter()
    small = drone_hf.compress_sentence_transformer(
        dense,
        data["calibration"],
        heldout_sentences=data["heldout"],
        target_speedup=args.target_speedup,
        attention=not args.no_attention,
        allocation_report=report,
        distill_steps=args.steps,
        distill_options=(
            {
                "lr": args.lr,
                "lr_schedule": args.lr_schedule,
                "seed": args.seed,
                "hidden_weight": args.hidden_weight,
                "cosine_weight": args.cosine_weight,
                "relation_weight": args.relation_weight,
                "balance_factors": not args.no_balance,
            }
            if args.steps
            else None
        ),
        distill_sentences=distill if args.steps else None,
    )
    seconds = time.perf_counter() - started
    dense_heldout = se._encode(dense, data["heldout"])
    dense_scores, scores = se._scores(dense, data, dense_heldout, 32), se._scores(small, data, dense_heldout, 32)
    delta = {name: scores[name] - dense_scores[name] for name in scores}
    row = {
        "command": command_line(),
        "settings": vars(args),
        "distill_texts": len(distill or data["calibration"]) if args.steps else 0,
        "flop_bound": flop_speedup_bound(dense[0].auto_model.config, small[0].auto_model.config, 128),
        "seconds": seconds,
        "dense": dense_scores,
        "scores": scores,
        "delta": delta,
        "distillation": report.get("distillation"),
    }
    print(json.dumps({name: round(value, 2) for name, value in delta.items()}), flush=True)
    with open(RESULTS / "sentence_embedding_distill_variants.jsonl", "a") as handle:
        handle.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main()
