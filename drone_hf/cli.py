"""`drone-hf`: compress a fine-tuned classifier on a GLUE task or your own data from the command line, or evaluate one.

drone-hf compress --model DIR_OR_HUB_ID (--task sst2 [--data-dir GLUE_DIR] | --train-file train.csv --validation-file
    dev.csv [--text-columns a [b]] [--label-column label] [--metric f1] | --dataset-name HUB_ID)
    [--task-type text-classification|token-classification|question-answering (default: from config.json)]
    (--max-accuracy-drop PTS | --target-speedup X | --param-ratio P | --rank K)
    [--method drone|drone-bc|drone-act|svd] [--calibration-samples N] [--dtype D] [--quantize int8] [--threads T]
    --output DIR [--overwrite]
drone-hf evaluate --model DIR (--task sst2 | --validation-file dev.csv | --dataset-name HUB_ID) [--baseline DENSE_DIR]
drone-hf compress-embeddings --model SENTENCE_TRANSFORMER --sentences FILE
    (--min-cosine-similarity C | --target-speedup X | --param-ratio P | --rank K)
    [--method drone|drone-bc|drone-act|svd] [--distill-steps N [--distill-lr LR] [--distill-lr-schedule linear]
    [--distill-sentences FILE]] [--dtype D] [--quantize int8] --output DIR [--overwrite]
drone-hf export --model DIR --onnx --output DIR [--optimize] [--quantize int8] [--opset 17] [--overwrite]

--output is written whole or not at all, never into (or around) --model; a folder drone-hf did not write needs
--overwrite. Every underscore option of transformers' example scripts is accepted too (--train_file, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .cli_checks import (
    check_model_path,
    check_output,
    check_push,
    check_rank,
    check_tokenizer,
    count,
    model_load_error,
    output_folder,
    resolve_max_length,
    write_results,
)
from .cli_checks import number as _number
from .cli_export import add_export_parser, run_export
from .cli_setup import error_text, progress_lines, require_extra, set_openmp_wait_policy, start_command
from .data_arguments import add_data_arguments
from .defaults import (
    BUILTIN_METHODS,
    DEFAULT_METHOD,
    DEFAULT_SAFETY_MARGIN,
    DEPLOYMENT_DTYPE_NAMES,
    DISTILL_LR_SCHEDULES,
)


# The stdlib logger that transformers' `logging.get_logger` returns, without importing transformers (kept out of
# `drone-hf --help`).
logger = logging.getLogger("drone_hf.cli")
_METHOD_HELP = f"factorisation method: {', '.join(BUILTIN_METHODS)} (or one added with drone_hf.register_method)"


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="drone-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"drone-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument(
            "--model",
            required=True,
            help="fine-tuned sequence (or token) classifier of a supported family (BERT, RoBERTa, "
            "DistilBERT, ELECTRA, MPNet, DeBERTa-v2, ModernBERT, ...): folder or Hub id",
        )
        add_data_arguments(sub)
        sub.add_argument(
            "--task-type",
            "--task_type",
            choices=TASK_TYPES,
            help="the model's head: text-classification (sequence classification), token-classification (NER: "
            "rows with a list of words and a list of tags, e.g. --text-column tokens --label-column ner_tags) or "
            "question-answering (SQuAD-layout rows: question, context, answers {text, answer_start}; one window of "
            "--max-length tokens per example, longer contexts truncated); default: read from the model's config.json "
            "`architectures`",
        )
        sub.add_argument(
            "--max-length", type=count(1), help="tokens per example (default: 128, or the model's limit if lower)"
        )
        sub.add_argument("--batch-size", type=count(1), default=64, help="evaluation batch size")
        sub.add_argument("--max-eval-samples", type=count(1), help="evaluate on a seeded subset of the dev split")
        sub.add_argument("--latency-repeats", type=count(1), default=20, help="timed rounds (batch 8, sequence 128)")
        _add_threads(sub)
        sub.add_argument("--seed", type=count(0), default=0)

    compress = commands.add_parser("compress", help="calibrate, allocate, compress, save, report")
    common(compress)
    budget = compress.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-accuracy-drop", type=_POINTS, help="budget in metric points on held-out TRAIN rows")
    budget.add_argument("--target-speedup", type=_SPEEDUP, help="multiply-add reduction target (no evaluations)")
    budget.add_argument("--param-ratio", type=_RATIO, help="fraction of encoder-linear parameters to keep")
    budget.add_argument("--rank", type=count(1), help="one rank for every encoder linear")
    compress.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help="factorisation method (drone: the paper's closed form; drone-bc: on centred statistics with the optimal "
        "bias shift; drone-act: the FFN's first linear weighted by the activation's slope; svd: data-free baseline; "
        "or one added with drone_hf.register_method)",
    )
    compress.add_argument("--no-attention", action="store_true", help="do not factor the attention score product")
    compress.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drone_hf 0.1 switch: --bias-correction is --method drone-bc",
    )
    compress.add_argument("--calibration-samples", type=count(1), default=512)
    compress.add_argument(
        "--heldout-samples",
        type=count(1),
        default=2048,
        help="train rows (disjoint from calibration) for --max-accuracy-drop's joint checks",
    )
    compress.add_argument(
        "--screening-samples",
        type=count(1),
        help="of those, rows scoring each module alone (cheap per-module curves; default: 256 for "
        "--allocation-search fast, 512 for exhaustive)",
    )
    compress.add_argument(
        "--screening-dtype",
        choices=list(DEPLOYMENT_DTYPE_NAMES),
        help="score the screening rows under torch.autocast in this dtype (bfloat16: about 2.5x cheaper probes "
        "on a CPU with AMX tiles, slower on one without); the joint checks never do: they score the "
        "--dtype/--quantize form, else the model's dtype",
    )
    compress.add_argument(
        "--safety-margin",
        type=_number(0),
        default=DEFAULT_SAFETY_MARGIN,
        help="paired standard errors added to the held-out drop before comparing with the budget",
    )
    compress.add_argument(
        "--refine-steps",
        type=count(0),
        help="joint checks spent moving modules further down after the search (default: 6 for the fast search, "
        "in growing groups of moves; 48 single moves for the exhaustive one)",
    )
    compress.add_argument(
        "--sequential",
        action="store_true",
        help="refit the factored linears layer after layer on the compressed model's own inputs (each layer also "
        "corrects the error of those before it; docs/methods.md 1c); with --max-accuracy-drop and the fast search, "
        "the joint checks judge refitted models and search further",
    )
    compress.add_argument(
        "--sequential-dense-weight",
        type=_number(0),
        default=0.0,
        help="with --sequential: weight of the dense model's own inputs in each refit (the anchored refit; default 0)",
    )
    compress.add_argument(
        "--sequential-checks",
        type=count(0),
        default=4,
        help="with --sequential: refitted joint checks after the search's result (each costs one refit)",
    )
    _add_search(compress)
    _add_deployment(compress)
    _add_output_arguments(compress)
    compress.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="Hub id of the model being compressed, for the card's `base_model` when --model is a local folder",
    )

    evaluate = commands.add_parser("evaluate", help="print the dev metric and CPU latency of a model")
    common(evaluate)
    evaluate.add_argument(
        "--baseline",
        metavar="PATH",
        help="a model to compare with (e.g. the dense one): evaluated too and timed round-robin against --model, "
        "which adds the speed-up, CPU-time ratio and FLOP bound columns",
    )
    _add_embeddings_parser(commands)
    add_export_parser(commands)
    return parser


TASK_TYPES = ("text-classification", "token-classification", "question-answering")
AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
_POINTS = _number(0, low_open=True, hint=" (metric points)")
_SPEEDUP = _number(1, low_open=True, hint=" (e.g. 1.5)")
_RATIO = _number(0, 1, low_open=True, high_open=True)


def _add_search(sub) -> None:
    sub.add_argument(
        "--allocation-search",
        choices=["exhaustive", "fast"],
        default="exhaustive",
        help="how an accuracy budget is searched: exhaustive (a measured drop curve per module and rank) or fast "
        "(per-module drops predicted from the closed form's residual energy, one probe per module, bisection of one "
        "scale by joint checks: ~4x fewer held-out evaluations, a smaller speed-up); both return only ranks that "
        "pass the joint check",
    )


def _add_deployment(sub) -> None:
    """`--dtype` and `--quantize`, as `compress_model(dtype=, quantize=)` takes them."""
    sub.add_argument(
        "--dtype",
        choices=list(DEPLOYMENT_DTYPE_NAMES),
        help="deployment dtype: the result is cast, saved and reloads in it; budgets keep only ranks measured faster "
        "than the dense layer in this dtype on this machine",
    )
    sub.add_argument(
        "--quantize",
        choices=["int8"],
        help="dynamic int8 of the encoder linears (CPU; saved as int8 weights + float32 scales in safetensors)",
    )


def _add_output_arguments(sub) -> None:
    sub.add_argument("--output", required=True, help="new folder (or an earlier drone-hf output) to save into")
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="allow an --output folder that drone-hf did not write: its model, tokenizer, card and results files are "
        "replaced, other files kept",
    )
    sub.add_argument("--push-to-hub", metavar="REPO", help="also upload the compressed model to this Hub repo")


def _add_embeddings_parser(commands) -> None:
    sub = commands.add_parser(
        "compress-embeddings",
        help="compress a sentence-transformers model on raw sentences, save, report fidelity and encode() speed",
    )
    sub.add_argument("--model", required=True, help="SentenceTransformer folder or Hub id (e.g. all-MiniLM-L6-v2)")
    sub.add_argument("--sentences", required=True, help="text file, one calibration sentence per line")
    sub.add_argument(
        "--heldout-sentences",
        help="text file of held-out sentences (default: a seeded random quarter of --sentences, not calibrated on)",
    )
    budget = sub.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--min-cosine-similarity",
        type=_number(0, 1, low_open=True),
        help="keep the mean cosine similarity to the dense embeddings of held-out sentences >= this, e.g. 0.98",
    )
    budget.add_argument("--target-speedup", type=_SPEEDUP, help="multiply-add reduction target (no evaluations)")
    budget.add_argument("--param-ratio", type=_RATIO, help="fraction of encoder-linear parameters to keep")
    budget.add_argument("--rank", type=count(1), help="one rank for every encoder linear")
    sub.add_argument("--method", default=DEFAULT_METHOD, help=_METHOD_HELP)
    sub.add_argument("--no-attention", action="store_true", help="do not factor the attention score product")
    sub.add_argument(
        "--sequential",
        action="store_true",
        help="refit the factored linears layer after layer on the calibration sentences as the compressed encoder "
        "feeds them (docs/methods.md 1c); with --min-cosine-similarity the joint checks judge refitted encoders",
    )
    sub.add_argument(
        "--sequential-dense-weight",
        type=_number(0),
        default=0.0,
        help="with --sequential: weight of the dense model's own inputs in each refit (the anchored refit; default 0)",
    )
    sub.add_argument("--batch-size", type=count(1), default=32, help="sentences per calibration / held-out batch")
    sub.add_argument(
        "--safety-margin",
        type=_number(0),
        default=DEFAULT_SAFETY_MARGIN,
        help="paired standard errors added to the held-out cosine drop before comparing with the budget",
    )
    sub.add_argument(
        "--refine-steps",
        type=count(0),
        help="joint checks spent moving modules further down (default: 6 fast, 48 exhaustive)",
    )
    _add_search(sub)
    sub.add_argument(
        "--distill-steps",
        type=count(0),
        default=0,
        help="after compression, train the compressed encoder for this many AdamW steps to match the dense model "
        "(last hidden state MSE + 10 x (1 - cosine) of the embeddings) on the calibration sentences, or on "
        "--distill-sentences (never the held-out ones); default 0: no training",
    )
    sub.add_argument(
        "--distill-lr",
        type=_number(0, low_open=True),
        help="learning rate of --distill-steps (default: 1e-4)",
    )
    sub.add_argument(
        "--distill-lr-schedule",
        choices=list(DISTILL_LR_SCHEDULES),
        help="learning-rate schedule of --distill-steps: constant (default), or linear decay to 0 at the last step",
    )
    sub.add_argument(
        "--distill-sentences",
        help="text file, one sentence per line: distil on these instead of the calibration sentences (more text of "
        "the kind the model will embed; none of it may be a held-out sentence)",
    )
    _add_deployment(sub)
    sub.add_argument(
        "--latency-repeats", type=count(1), default=5, help="timed encode() rounds (batch 32, up to 256 sentences)"
    )
    sub.add_argument(
        "--eval-pairs",
        help="labelled sentence pairs to score dense vs compressed by the ROC-AUC of their cosine similarity: a TSV "
        "with columns sentence1, sentence2, label (0/1), or a GLUE MRPC file (#1 String, #2 String, Quality)",
    )
    _add_threads(sub)
    _add_output_arguments(sub)


def _add_threads(sub) -> None:
    sub.add_argument(
        "--threads",
        type=count(1),
        help="torch CPU threads (default: one per core). On a shared machine fewer threads time more reliably",
    )


def _read_pairs(path: str) -> tuple[list[str], list[str], list[int]]:
    """`(first, second, labels)` of a pairs TSV: a header naming sentence1/sentence2/label (or MRPC's #1 String,
    #2 String, Quality), else three unnamed columns."""
    import csv

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"`--eval-pairs` {path!r} is not a file (expected a TSV of sentence pairs).")
    with open(file, encoding="utf-8-sig", newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        raise ValueError(f"`--eval-pairs` {path!r} is empty.")
    header = [cell.strip().lower() for cell in rows[0]]
    names = [("sentence1", "sentence2", "label"), ("#1 string", "#2 string", "quality")]
    columns = next((tuple(header.index(n) for n in group) for group in names if set(group) <= set(header)), None)
    if columns is None:
        columns, body = (0, 1, 2), rows
    else:
        body = rows[1:]
    first, second, labels = [], [], []
    for number, row in enumerate(body, start=2 if body is not rows else 1):
        try:
            label = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}.get(row[columns[2]].strip(), row[columns[2]].strip())
            first.append(row[columns[0]])
            second.append(row[columns[1]])
        except (IndexError, ValueError) as error:
            raise ValueError(
                f"`--eval-pairs` {path!r} line {number}: expected sentence1, sentence2 and a 0/1 label, got {row!r}."
            ) from error
        if label not in (0, 1):
            raise ValueError(f"`--eval-pairs` {path!r} line {number}: the label must be 0 or 1, got {label!r}.")
        labels.append(label)
    return first, second, labels


def _read_sentences(path: str, option: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"`{option}` {path!r} is not a file (expected one sentence per line).")
    sentences = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    sentences = [line for line in sentences if line]
    if not sentences:
        raise ValueError(f"`{option}` {path!r} has no non-empty line (expected one sentence per line).")
    return sentences


def _compress_embeddings(args) -> int:
    import torch

    from .cli_report import timed_forms
    from .profiling import checkpoint_size_mb, count_parameters, cpu_name, flop_speedup_bound
    from .sentence_embeddings import (
        MIN_HELDOUT_SENTENCES,
        _fix_card,
        _require_sentence_transformers,
        compress_sentence_transformer,
        cosine_fidelity,
        measure_encode_latency,
        pair_auc,
        split_heldout,
    )
    from .speed import compare_recorded

    check_model_path(args.model, markers=("modules.json", "config.json"))
    check_output(args.output, args.model, overwrite=args.overwrite)
    check_push(args.push_to_hub)
    sentences = _read_sentences(args.sentences, "--sentences")
    if args.heldout_sentences:
        calibration, heldout = sentences, _read_sentences(args.heldout_sentences, "--heldout-sentences")
        source = f"`--heldout-sentences` has {len(heldout)} lines"
    else:
        calibration, heldout = split_heldout(sentences)
        source = f"`--sentences` has {len(sentences)} lines, of which a quarter ({len(heldout)}) are held out"
    needed = MIN_HELDOUT_SENTENCES if args.min_cosine_similarity is not None else 1
    if len(heldout) < needed:
        raise ValueError(
            f"Too few held-out sentences: {source}; at least {needed} are needed"
            + (" for `--min-cosine-similarity`" if needed > 1 else "")
            + f". Pass `--sentences` with {4 * needed} or more lines, or `--heldout-sentences` with {needed} or more."
        )
    if args.distill_lr is not None and not args.distill_steps:
        raise ValueError(f"`--distill-lr {args.distill_lr:g}` needs `--distill-steps N` (N > 0): nothing is trained.")
    if args.distill_lr_schedule is not None and not args.distill_steps:
        raise ValueError(
            f"`--distill-lr-schedule {args.distill_lr_schedule}` needs `--distill-steps N` (N > 0): nothing is "
            "trained."
        )
    if args.distill_sentences and not args.distill_steps:
        raise ValueError(
            f"`--distill-sentences {args.distill_sentences}` needs `--distill-steps N` (N > 0): nothing is trained."
        )
    distill_sentences = (
        _read_sentences(args.distill_sentences, "--distill-sentences") if args.distill_sentences else None
    )
    pairs = _read_pairs(args.eval_pairs) if args.eval_pairs else None
    sentence_transformers = _require_sentence_transformers()  # an ImportError naming the extra: main() prints it
    try:
        model = sentence_transformers.SentenceTransformer(args.model)
    except (OSError, ValueError) as error:
        raise model_load_error(args.model, error) from error
    if model.device.type == "cuda":
        hardware = f"GPU {torch.cuda.get_device_name(model.device)}"
    else:
        hardware = f"{model.device.type.upper()} {cpu_name()} ({torch.get_num_threads()} threads)"
    report: dict = {}
    started = time.perf_counter()
    small = compress_sentence_transformer(
        model,
        calibration,
        method=args.method,
        rank=args.rank,
        target_speedup=args.target_speedup,
        param_ratio=args.param_ratio,
        min_cosine_similarity=args.min_cosine_similarity,
        heldout_sentences=heldout,
        batch_size=args.batch_size,
        attention=not args.no_attention,
        sequential=args.sequential,
        sequential_dense_weight=args.sequential_dense_weight,
        allocation_options=(
            {"safety_margin": args.safety_margin, "refine_steps": args.refine_steps, "search": args.allocation_search}
            if args.min_cosine_similarity is not None
            else None
        ),
        allocation_report=report,
        distill_steps=args.distill_steps,
        distill_options={
            name: value
            for name, value in (("lr", args.distill_lr), ("lr_schedule", args.distill_lr_schedule))
            if value is not None
        }
        or None,
        distill_sentences=distill_sentences,
        dtype=args.dtype,
        quantize=args.quantize,
        show_progress=True,
    )
    seconds = time.perf_counter() - started
    models = {"dense": model, **_dense_in_form(model, args.dtype, args.quantize), args.method: small}
    timing = (heldout + calibration)[:256]
    record: dict = {}
    latency = measure_encode_latency(models, timing, batch_size=32, repeats=args.latency_repeats, record=record)
    seq_len = min(128, model.max_seq_length or 128)
    bound = flop_speedup_bound(model[0].auto_model.config, small[0].auto_model.config, seq_len)
    comparison = compare_recorded(
        record, reference="dense", flop_bounds={args.method: bound}, device=model.device.type
    )
    results = {}
    for name, m in models.items():
        encoder = m[0].auto_model
        results[name] = {
            "heldout_cosine": cosine_fidelity(model, m, heldout),
            "parameters": count_parameters(encoder),
            "checkpoint_mb": checkpoint_size_mb(encoder),
            "encode_ms": 1000 * latency[name],
            "speedup": latency["dense"] / latency[name],
            "flop_bound": flop_speedup_bound(model[0].auto_model.config, encoder.config, seq_len),
            **{k: v for k, v in comparison.models[name].items() if k in ("cpu_speedup", "flags", "published")},
        }
        if pairs:
            results[name]["pair_auc"] = 100 * pair_auc(m, *pairs, batch_size=args.batch_size)
    setting = f"encode() of {len(timing)} sentences, batch 32, {timed_forms(args.dtype, args.quantize)}"
    speed = comparison.card_speed(args.method, hardware, setting)
    budget = {
        "min_cosine_similarity": args.min_cosine_similarity,
        "target_speedup": args.target_speedup,
        "param_ratio": args.param_ratio,
        "rank": args.rank,
    }
    summary = {
        "model": args.model,
        "budget": {k: v for k, v in budget.items() if v is not None},
        "method": args.method,
        "dtype": args.dtype or "float32",
        "quantize": args.quantize,
        "distillation": report.get("distillation"),
        "calibration_sentences": len(calibration),
        "heldout_sentences": len(heldout),
        "compress_seconds": seconds,
        "allocation": report,
        "results": results,
        "timing": {
            "sentences": len(timing),
            "batch_size": 32,
            "threads": torch.get_num_threads(),
            "load_average": comparison.load_average,
        },
    }
    with output_folder(args.output) as staging:  # model, card and results appear together or not at all
        small.save(str(staging))
        _fix_card(staging, base_model=getattr(small, "_drone_base_model", None), speed=speed)
        write_results(staging, summary)
    args.saved = True
    header = ["model", "cosine to dense (held-out)"] + (["pair ROC-AUC"] if pairs else [])
    header += ["params (M)", "size MB", "encode ms", "speed-up", "CPU-time ratio", "FLOP bound"]
    rows = [
        [
            name,
            f"{r['heldout_cosine']:.4f}",
            *([f"{r['pair_auc']:.2f}"] if pairs else []),
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['checkpoint_mb']:.1f}",
            f"{r['encode_ms']:.1f}",
            "flagged" if r.get("flags") else f"{r['speedup']:.2f}x",
            "flagged"
            if r.get("flags")
            else f"{r.get('cpu_speedup') or 1.0:.2f}x"
            if model.device.type == "cpu"
            else "—",
            f"{r['flop_bound']:.2f}x",
        ]
        for name, r in results.items()
    ]
    print()
    _print_markdown(header, rows)
    print(
        f"\nCosine: mean over {len(heldout)} held-out sentences (not calibrated on"
        + (
            "; the budget was checked on these same sentences, so this mean is not an independent estimate"
            if args.min_cosine_similarity is not None
            else ""
        )
        + f"). encode(): {len(timing)} "
        f"sentences, batch 32, {hardware}, median of {args.latency_repeats} round-robin "
        f"runs in this process. FLOP bound: multiply-adds of one {seq_len}-token sequence."
    )
    print(comparison.note())
    if pairs:
        print(
            f"Pair ROC-AUC: {len(pairs[2])} pairs from {args.eval_pairs}, cosine similarity, points "
            f"(compressed - dense: {results[args.method]['pair_auc'] - results['dense']['pair_auc']:+.2f})."
        )
    if report.get("evaluations"):
        print(
            f"Allocation: {report['evaluations']} held-out evaluations in {report['evaluation_seconds']:.0f} s; "
            f"held-out mean cosine {1 - report['heldout_drop'] / 100:.4f} "
            f"(± {report['heldout_standard_error'] / 100:.4f})."
        )
    distillation = report.get("distillation")
    if distillation:
        d = distillation
        data = f"the {d['sentences']} calibration sentences" if d["data"] == "the calibration sentences" else d["data"]
        print(
            f"Distillation: {d['steps']} steps (lr {d['lr']:g}"
            + (", decayed linearly to 0" if d["lr_schedule"] == "linear" else "")
            + f", batch {d['batch_size']}) on {data} "
            f"in {d['seconds']:.0f} s; loss {d['loss_first']:.4g} -> {d['loss_last']:.4g}; "
            f"held-out mean cosine {d['heldout_cosine_before']:.4f} before, {d['heldout_cosine_after']:.4f} after "
            "(the cosine column: after, in the deployment form)."
        )
    if args.quantize or args.dtype not in (None, "float32"):
        form = args.quantize or args.dtype
        print(
            f"Deployment form: {form}. Speed-ups are against dense float32; dense-{form} is the dense model in the "
            "same form."
        )
    print(f"Saved to {args.output} (reload with `import drone_hf` + SentenceTransformer({args.output!r})).")
    if args.push_to_hub:
        from .hub import push_compressed_to_hub

        print(f"Pushed: {push_compressed_to_hub(small, args.push_to_hub)}")
    return 0


def _resolve_task_type(args) -> str:
    """`--task-type`, else the one the model's `architectures` name (logged); refuses a `--task-type` that does not
    match the model's head."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise model_load_error(args.model, error) from error
    architectures = list(getattr(config, "architectures", None) or [])
    heads = {
        suffix: task_type
        for suffix, task_type in (
            ("ForSequenceClassification", "text-classification"),
            ("ForTokenClassification", "token-classification"),
            ("ForQuestionAnswering", "question-answering"),
            ("ForMultipleChoice", "multiple-choice"),
            ("ForMaskedLM", "fill-mask"),
        )
        if any(name.endswith(suffix) for name in architectures)
    }
    found = next(iter(heads.values()), None)
    if args.task_type is not None and found is not None and args.task_type != found:
        raise ValueError(
            f"`--task-type {args.task_type}` does not match `--model` {args.model!r}, whose head is {architectures} "
            f"({found}): pass `--task-type {found}`, or a model fine-tuned for {args.task_type}."
        )
    task_type = args.task_type or found or "text-classification"
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"`--model` {args.model!r} is a {task_type} model ({architectures}); the drone-hf command handles "
            f"{list(TASK_TYPES)} (compress it with drone_hf.compress_model in Python)."
        )
    if args.task_type is None:
        reason = f"its architectures {architectures}" if found else "no task head named in its config.json"
        logger.info(f"Task type: {task_type} (from {reason}; pass --task-type to choose)")
    args.task_type = task_type
    return task_type


def _auto_class(task_type: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[task_type])


def _load(args, splits: tuple[str, ...]):
    """The `--model` classifier, its tokenizer and the task data, checked against each other, `--max-length`
    (resolved here) and `--rank`; the data source and the path are checked first, so that a typo is not answered with
    a Hub error and a core install learns what is missing before the model loads."""
    from transformers import AutoTokenizer

    from .data import check_model_labels, load_task_data
    from .data_arguments import data_source_from_args
    from .qa_data import load_qa_task_data
    from .targets import check_supported_model
    from .token_data import load_token_task_data

    source = data_source_from_args(args)
    require_extra("glue")  # before the model loads: a core install learns what is missing at once
    check_model_path(args.model)
    task_type = _resolve_task_type(args)
    if task_type != "text-classification" and source.task:
        raise ValueError(
            f"`--task {source.task}` is a GLUE text-classification task; a {task_type} model needs "
            "`--train-file`/`--validation-file` (or `--dataset-name`) in its layout."
        )
    logger.info(f"Loading {args.model}")
    try:
        model = _auto_class(task_type).from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise model_load_error(args.model, error) from error
    check_supported_model(model)
    reader = {"token-classification": load_token_task_data, "question-answering": load_qa_task_data}
    task = reader.get(task_type, load_task_data)(source, splits=splits, model_config=model.config)
    if task_type != "question-answering":  # a span head has no classes
        check_model_labels(task, model.config)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_tokenizer(args.model, tokenizer, model)
    args.max_length = resolve_max_length(model, args.max_length)
    return model.eval(), tokenizer, task


def _dev(args, tokenizer, task):
    return task.load(
        "validation", tokenizer, max_length=args.max_length, max_samples=args.max_eval_samples, seed=args.seed
    )


def _print_markdown(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def _compress(args) -> int:
    from . import collect_activation_stats, compress_model
    from .cli_report import card_inputs, measure_models, print_table, refinement_phrase
    from .data import label_config
    from .evaluation import iter_batches
    from .hub import create_or_update_model_card
    from .sequential import check_sequential

    check_output(args.output, args.model, overwrite=args.overwrite)
    check_push(args.push_to_hub)
    model, tokenizer, task = _load(args, ("train", "validation"))
    if str(model.config.model_type).startswith("drone_"):
        raise ValueError(
            f"`--model` {args.model!r} is already compressed by drone_hf (model_type {model.config.model_type!r}): "
            "pass the dense fine-tuned model it was made from."
        )
    check_rank(model, args.rank)
    if args.sequential:
        check_sequential(model)  # before calibrating
    elif args.sequential_dense_weight:
        raise ValueError(f"--sequential-dense-weight {args.sequential_dense_weight:g} needs --sequential.")
    needs_heldout = args.max_accuracy_drop is not None
    total = args.calibration_samples + (args.heldout_samples if needs_heldout else 0)
    rows = task.load("train", tokenizer, max_length=args.max_length, max_samples=total, seed=args.seed).shuffle(
        seed=args.seed
    )
    if len(rows) < total:
        spare = len(rows) - args.calibration_samples
        if not rows:
            raise ValueError(f"The train split of {task.name} has no rows: check `--data-dir` / `--train-file`.")
        if not needs_heldout:
            raise ValueError(
                f"The train split has {len(rows)} rows, fewer than `--calibration-samples {args.calibration_samples}`"
                f"; pass `--calibration-samples {len(rows)}` or less."
            )
        if spare < 64:
            raise ValueError(
                f"The train split has {len(rows)} rows; --calibration-samples + --heldout-samples = {total} (the "
                "accuracy budget needs at least 64 held-out rows after the calibration rows)."
            )
        print(
            f"The train split has {len(rows)} rows: holding out the {spare} after the calibration rows "
            f"(--heldout-samples {args.heldout_samples} asked for more).",
            file=sys.stderr,
        )
        total = len(rows)
    calibration = rows.select(range(args.calibration_samples))
    started = time.perf_counter()
    logger.info(f"Calibrating on {len(calibration)} training rows of {task.name}")
    # A list, not a generator: the progress bar then has a total.
    batches = list(iter_batches(calibration, tokenizer, batch_size=32, sort_by_length=True))
    stats = collect_activation_stats(model, batches, show_progress=True)
    calibration_info = {
        "dataset": task.calibration_dataset,
        "split": "train",
        "num_samples": args.calibration_samples,
        "seed": args.seed,
    }
    report: dict = {}
    budget = {
        "max_accuracy_drop": args.max_accuracy_drop,
        "target_speedup": args.target_speedup,
        "param_ratio": args.param_ratio,
    }
    allocation = {}  # a budget: compress_model allocates (and factors from the allocation's decompositions)
    if args.rank is None:
        chosen = next(f"{key}={value}" for key, value in budget.items() if value is not None)
        logger.info(f"Allocating ranks for {chosen}")
        heldout = rows.select(range(args.calibration_samples, total)) if needs_heldout else None
        heldout_batches = (
            list(iter_batches(heldout, tokenizer, batch_size=64, sort_by_length=True)) if heldout is not None else None
        )
        allocation = {
            **budget,
            "attention": not args.no_attention,
            "eval_dataloader": heldout_batches,
            "allocation_report": report,
            "allocation_options": {
                "seq_len": min(128, model.config.max_position_embeddings),
                "metric_fn": task.metric_points(heldout_batches) if needs_heldout else None,
                "screening_samples": "auto" if args.screening_samples is None else args.screening_samples,
                "screening_dtype": args.screening_dtype,
                "safety_margin": args.safety_margin,
                "refine_steps": args.refine_steps,
                "search": args.allocation_search,
                "sequential_checks": args.sequential_checks,
            },
        }
    compressed = compress_model(
        model,
        stats,
        method=args.method,
        rank=args.rank,
        calibration_info=calibration_info,
        bias_correction=args.bias_correction,
        dtype=args.dtype,
        quantize=args.quantize,
        sequential=args.sequential,
        calibration_dataloader=batches if args.sequential else None,
        sequential_dense_weight=args.sequential_dense_weight,
        show_progress=True,
        **allocation,
    )
    seconds = time.perf_counter() - started
    labels = label_config(task, model.config)
    if labels:  # pipelines then print the task's label names, not LABEL_0 / LABEL_1
        compressed.config.id2label, compressed.config.label2id = labels["id2label"], labels["label2id"]
    dev = _dev(args, tokenizer, task)
    logger.info(f"Evaluating dense and compressed on {len(dev)} validation rows, then timing them")
    results, comparison = measure_models(
        {"dense": model, **_dense_in_form(model, args.dtype, args.quantize), args.method: compressed},
        dev,
        tokenizer,
        task,
        reference="dense",
        repeats=args.latency_repeats,
        batch_size=args.batch_size,
    )
    card = card_inputs(
        task,
        results,
        comparison,
        reference="dense",
        compressed=args.method,
        base_model=args.base_model or args.model,
        dtype=args.dtype,
        quantize=args.quantize,
    )
    logger.info(f"Saving to {args.output}")
    summary = {
        "task": task.name,
        "task_type": task.task_type,
        "metric": task.main_metric,
        "budget": {k: v for k, v in {**budget, "rank": args.rank}.items() if v is not None},
        "method": args.method,
        "dtype": args.dtype or "float32",
        "quantize": args.quantize,
        "compress_seconds": seconds,
        "allocation": report,
        "results": results,
        "timing": {key: getattr(comparison, key) for key in ("load_average", "threads", "repeats", "cpu_count")},
    }
    with output_folder(args.output, keep_card=True) as staging:  # weights, card, tokenizer, results: all or none
        compressed.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        create_or_update_model_card(staging, **card)  # what the CLI measured: base model, metrics, speed
        write_results(staging, summary)
    args.saved = True
    print()
    print_table(results, task, len(dev), comparison)
    if report.get("evaluations"):
        unit = "labelled train tokens" if report.get("heldout_kind") == "token" else "train rows"
        screening = f"{report['screening_examples']} screening"
        screening += f" in {report['screening_dtype']}" if report.get("screening_dtype") else ""
        print(
            f"Allocation ({report['search']} search): {report['evaluations']} held-out evaluations, "
            f"{report['joint_check_count']} of them joint checks ({screening} / "
            f"{report['heldout_examples']} joint-check {unit}) in {report['evaluation_seconds']:.0f} s; held-out "
            f"{task.main_metric} drop {report['heldout_drop']:.2f} ± {report['heldout_standard_error']:.2f} points."
        )
        refinement = refinement_phrase(report, task.main_metric)
        if refinement:
            print(refinement)
    print(
        f"Saved to {args.output} with its model card (reload with `import drone_hf` + {AUTO_CLASSES[task.task_type]})."
    )
    if args.push_to_hub:
        from .hub import push_compressed_to_hub

        try:
            url = push_compressed_to_hub(compressed, args.push_to_hub, tokenizer=tokenizer, card_kwargs=card)
        except ConnectionError as error:
            error.add_note(
                f"The compressed model and its card are saved in {args.output}; once the Hub is reachable, upload "
                f"that folder: hf upload {args.push_to_hub} {args.output}"
            )
            raise
        print(f"Pushed: {url}")
    return 0


def _dense_in_form(model, dtype: str | None, quantize: str | None) -> dict:
    """The dense model (a transformers model or a `SentenceTransformer`) in the deployment form too
    (`{"dense-bfloat16": ...}`), so that the table shows the speed-up against dense in the same dtype as well as
    against dense float32; empty for float32."""
    import copy

    from .deployment import deployed_copy, resolve_dtype
    from .sentence_embeddings import is_sentence_transformer, with_encoder

    if quantize:
        if is_sentence_transformer(model):
            return {f"dense-{quantize}": with_encoder(model, deployed_copy(model[0].auto_model, quantize=quantize))}
        return {f"dense-{quantize}": deployed_copy(model, quantize=quantize)}
    if dtype and dtype != "float32":
        if is_sentence_transformer(model):
            return {f"dense-{dtype}": copy.deepcopy(model).to(resolve_dtype(dtype))}
        return {f"dense-{dtype}": deployed_copy(model, dtype)}
    return {}


def _evaluate(args) -> int:
    from .cli_report import measure_models, print_table
    from .data import check_model_labels
    from .targets import check_supported_model

    model, tokenizer, task = _load(args, ("validation",))
    dev = _dev(args, tokenizer, task)
    name = Path(args.model).name or args.model
    models, reference = {name: model}, None
    if args.baseline:
        baseline = _auto_class(task.task_type).from_pretrained(args.baseline).eval()
        check_supported_model(baseline)
        if task.task_type != "question-answering":
            check_model_labels(task, baseline.config)
        reference = Path(args.baseline).name or args.baseline
        reference = "baseline" if reference == name else reference
        models = {reference: baseline, name: model}
    results, comparison = measure_models(
        models, dev, tokenizer, task, reference=reference, repeats=args.latency_repeats, batch_size=args.batch_size
    )
    print_table(results, task, len(dev), comparison)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `drone-hf` command."""
    set_openmp_wait_policy()  # before torch is imported
    args = _parser().parse_args(argv)
    args.saved = False
    try:
        with progress_lines():
            start_command(args)
            if args.command == "compress-embeddings":
                return _compress_embeddings(args)
            if args.command == "export":
                return run_export(args)
            return _compress(args) if args.command == "compress" else _evaluate(args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"drone-hf {args.command}: error: {error_text(error)}", file=sys.stderr)
        if args.saved and getattr(args, "push_to_hub", None):
            print(f"drone-hf {args.command}: {args.output} was saved; only the upload failed.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        output = getattr(args, "output", None)
        if output is None or args.saved:
            done = f"; {output} was saved before" if output else ""
        else:
            done = f"; {output} was left as it was"
        print(f"drone-hf {args.command}: interrupted{done}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
