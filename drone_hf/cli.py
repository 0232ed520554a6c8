"""`drone-hf`: compress a fine-tuned BERT classifier on a GLUE task from the command line, or evaluate one.

drone-hf compress --model DIR_OR_HUB_ID --task sst2 [--data-dir GLUE_DIR]
    (--max-accuracy-drop PTS | --target-speedup X | --param-ratio P | --rank K) [--method drone|drone-bc|svd]
    [--calibration-samples N] --output DIR [--overwrite]
drone-hf evaluate --model DIR --task sst2 [--data-dir GLUE_DIR]
drone-hf compress-embeddings --model SENTENCE_TRANSFORMER --sentences FILE
    (--min-cosine-similarity C | --target-speedup X | --param-ratio P | --rank K) [--method drone|drone-bc|svd]
    --output DIR [--overwrite]

--output is written whole or not at all, never into (or around) --model; a folder drone-hf did not write needs
--overwrite.
"""

from __future__ import annotations

import argparse
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
from .methods import DEFAULT_METHOD, method_names


def _task(value: str) -> str:
    from .glue import get_glue_task

    try:
        return get_glue_task(value).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _data_dir(value: str) -> str:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"`--data-dir` {value!r} is not a folder (expected a GLUE TSV layout).")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drone-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument(
            "--model",
            required=True,
            help="fine-tuned sequence classifier of a supported family (BERT, RoBERTa, "
            "DistilBERT, ELECTRA, MPNet, DeBERTa-v2, ModernBERT, ...): folder or Hub id",
        )
        sub.add_argument(
            "--task", required=True, type=_task, help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"
        )
        sub.add_argument("--data-dir", type=_data_dir, help="local GLUE TSV folder (default: the Hub, nyu-mll/glue)")
        sub.add_argument(
            "--max-length", type=count(1), help="tokens per example (default: 128, or the model's limit if lower)"
        )
        sub.add_argument("--batch-size", type=count(1), default=64, help="evaluation batch size")
        sub.add_argument("--max-eval-samples", type=count(1), help="evaluate on a seeded subset of the dev split")
        sub.add_argument("--latency-repeats", type=count(1), default=20, help="timed rounds (batch 8, sequence 128)")
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
        choices=method_names(),
        default=DEFAULT_METHOD,
        help="factorisation method (drone: the paper's closed form; drone-bc: on centred statistics with the optimal "
        "bias shift; svd: data-free baseline)",
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
        default=512,
        help="of those, rows scoring each module alone (cheap per-module curves)",
    )
    compress.add_argument(
        "--safety-margin",
        type=_number(0),
        default=1.0,
        help="paired standard errors added to the held-out drop before comparing with the budget",
    )
    compress.add_argument(
        "--refine-steps",
        type=count(0),
        default=48,
        help="joint checks spent moving single modules one rank down after the time-share split",
    )
    compress.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="deployment dtype: the result is cast, saved and reloads in it; budgets keep only ranks measured faster "
        "than the dense layer in this dtype on this machine",
    )
    compress.add_argument(
        "--quantize",
        choices=["int8"],
        help="dynamic int8 of the encoder linears (CPU; saved as int8 weights + float32 scales in safetensors)",
    )
    _add_output_arguments(compress)

    evaluate = commands.add_parser("evaluate", help="print the dev metric and CPU latency of a model")
    common(evaluate)
    _add_embeddings_parser(commands)
    return parser


_POINTS = _number(0, low_open=True, hint=" (metric points)")
_SPEEDUP = _number(1, low_open=True, hint=" (e.g. 1.5)")
_RATIO = _number(0, 1, low_open=True, high_open=True)


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
    sub.add_argument("--method", choices=method_names(), default=DEFAULT_METHOD, help="factorisation method")
    sub.add_argument("--no-attention", action="store_true", help="do not factor the attention score product")
    sub.add_argument("--batch-size", type=count(1), default=32, help="sentences per calibration / held-out batch")
    sub.add_argument(
        "--safety-margin",
        type=_number(0),
        default=1.0,
        help="paired standard errors added to the held-out cosine drop before comparing with the budget",
    )
    sub.add_argument("--refine-steps", type=count(0), default=48, help="joint checks spent moving single modules down")
    sub.add_argument(
        "--latency-repeats", type=count(1), default=5, help="timed encode() rounds (batch 32, up to 256 sentences)"
    )
    sub.add_argument(
        "--eval-pairs",
        help="labelled sentence pairs to score dense vs compressed by the ROC-AUC of their cosine similarity: a TSV "
        "with columns sentence1, sentence2, label (0/1), or a GLUE MRPC file (#1 String, #2 String, Quality)",
    )
    _add_output_arguments(sub)


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
    pairs = _read_pairs(args.eval_pairs) if args.eval_pairs else None
    try:
        sentence_transformers = _require_sentence_transformers()
    except ImportError as error:
        print(f"drone-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
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
        allocation_options=(
            {"safety_margin": args.safety_margin, "refine_steps": args.refine_steps}
            if args.min_cosine_similarity is not None
            else None
        ),
        allocation_report=report,
        show_progress=True,
    )
    seconds = time.perf_counter() - started
    models = {"dense": model, args.method: small}
    timing = (heldout + calibration)[:256]
    latency = measure_encode_latency(models, timing, batch_size=32, repeats=args.latency_repeats)
    seq_len = min(128, model.max_seq_length or 128)
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
        }
        if pairs:
            results[name]["pair_auc"] = 100 * pair_auc(m, *pairs, batch_size=args.batch_size)
    speed = {
        "speedup": results[args.method]["speedup"],
        "flop_bound": results[args.method]["flop_bound"],
        "hardware": hardware,
        "setting": f"encode() of {len(timing)} sentences, batch 32",
    }
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
        "calibration_sentences": len(calibration),
        "heldout_sentences": len(heldout),
        "compress_seconds": seconds,
        "allocation": report,
        "results": results,
        "timing": {"sentences": len(timing), "batch_size": 32, "threads": torch.get_num_threads()},
    }
    with output_folder(args.output) as staging:  # model, card and results appear together or not at all
        small.save(str(staging))
        _fix_card(staging, base_model=getattr(small, "_drone_base_model", None), speed=speed)
        _write_results(staging, summary)
    args.saved = True
    header = ["model", "cosine to dense (held-out)"] + (["pair ROC-AUC"] if pairs else [])
    header += ["params (M)", "size MB", "encode ms", "speed-up", "FLOP bound"]
    rows = [
        [
            name,
            f"{r['heldout_cosine']:.4f}",
            *([f"{r['pair_auc']:.2f}"] if pairs else []),
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['checkpoint_mb']:.1f}",
            f"{r['encode_ms']:.1f}",
            f"{r['speedup']:.2f}x",
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
    print(f"Saved to {args.output} (reload with `import drone_hf` + SentenceTransformer({args.output!r})).")
    if args.push_to_hub:
        from .hub import push_compressed_to_hub

        print(f"Pushed: {push_compressed_to_hub(small, args.push_to_hub)}")
    return 0


def _load(args):
    """The `--model` classifier and its tokenizer, checked against `--task`, `--max-length` (resolved here) and
    `--rank`; the path is checked first, so that a typo is not answered with a Hub error."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .glue import get_glue_task
    from .targets import check_supported_model

    check_model_path(args.model)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise model_load_error(args.model, error) from error
    check_supported_model(model)
    info = get_glue_task(args.task)
    if model.config.num_labels != info.num_labels:
        raise ValueError(
            f"`--model` has num_labels={model.config.num_labels} but task {info.name} has {info.num_labels}: "
            "was it fine-tuned on this task?"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_tokenizer(args.model, tokenizer, model)
    args.max_length = resolve_max_length(model, args.max_length)
    return model.eval(), tokenizer, info


def _dev(args, tokenizer, info):
    from .glue import load_glue

    return load_glue(
        info.name,
        tokenizer,
        split=info.dev_splits[0],
        data_dir=args.data_dir,
        max_length=args.max_length,
        max_samples=args.max_eval_samples,
        seed=args.seed,
    )


def _measure(args, models: dict, dev, tokenizer, info) -> dict[str, dict]:
    from .evaluation import evaluate_glue
    from .profiling import checkpoint_size_mb, count_parameters, flop_speedup_bound, layer_parameters, measure_latency

    first = next(iter(models.values()))
    seq_len = resolve_max_length(first, None)  # 128, or the model's limit if lower
    rows = [dev[i] for i in range(min(8, len(dev)))]
    keys = ("input_ids", "token_type_ids", "attention_mask")
    batch = tokenizer.pad(
        [{k: r[k] for k in keys if k in r} for r in rows],
        padding="max_length",
        max_length=seq_len,
        return_tensors="pt",
    )
    latency = measure_latency(models, dict(batch), repeats=args.latency_repeats)
    results = {}
    for name, model in models.items():
        results[name] = {
            "metrics": evaluate_glue(model, dev, tokenizer, info.name, batch_size=args.batch_size),
            "parameters": count_parameters(model),
            "encoder_parameters": layer_parameters(model),
            "checkpoint_mb": checkpoint_size_mb(model),
            "latency_ms": 1000 * latency[name],
            "speedup": latency[next(iter(models))] / latency[name],
            "flop_bound": flop_speedup_bound(first.config, model.config, seq_len),
            "seq_len": seq_len,
        }
    return results


def _print_markdown(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def _write_results(folder: Path, summary: dict) -> None:
    """`folder/drone_results.json` (the staging folder of the output), with the list of the output's files."""
    write_results(folder, summary)


def _print_table(results: dict, info, dev_size: int) -> None:
    metric_names = list(next(iter(results.values()))["metrics"])
    header = ["model", *metric_names, "params (M)", "encoder (M)", "size MB", "latency ms", "speed-up", "FLOP bound"]
    rows = [
        [
            name,
            *(f"{100 * r['metrics'][m]:.2f}" for m in metric_names),
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['encoder_parameters'] / 1e6:.2f}",
            f"{r['checkpoint_mb']:.1f}",
            f"{r['latency_ms']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['flop_bound']:.2f}x",
        ]
        for name, r in results.items()
    ]
    _print_markdown(header, rows)
    import torch

    print(
        f"\n{info.name} {info.dev_splits[0]} ({dev_size} examples); latency: batch 8 x 128 tokens, CPU, "
        f"{torch.get_num_threads()} threads, median of round-robin runs in this process."
    )


def _compress(args) -> int:
    from . import allocate_ranks, collect_activation_stats, compress_model
    from .evaluation import iter_batches
    from .glue import glue_metric_points, load_glue

    check_output(args.output, args.model, overwrite=args.overwrite)
    check_push(args.push_to_hub)
    model, tokenizer, info = _load(args)
    if str(model.config.model_type).startswith("drone_"):
        raise ValueError(
            f"`--model` {args.model!r} is already compressed by drone_hf (model_type {model.config.model_type!r}): "
            "pass the dense fine-tuned model it was made from."
        )
    check_rank(model, args.rank)
    needs_heldout = args.max_accuracy_drop is not None
    total = args.calibration_samples + (args.heldout_samples if needs_heldout else 0)
    rows = load_glue(
        info.name,
        tokenizer,
        split="train",
        data_dir=args.data_dir,
        max_length=args.max_length,
        max_samples=total,
        seed=args.seed,
    ).shuffle(seed=args.seed)
    if len(rows) < total:
        spare = len(rows) - args.calibration_samples
        if not rows:
            raise ValueError(f"The train split of {info.name} has no rows: check `--data-dir` {args.data_dir!r}.")
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
    stats = collect_activation_stats(
        model, iter_batches(calibration, tokenizer, batch_size=32, sort_by_length=True), show_progress=True
    )
    calibration_info = {
        "dataset": f"glue/{info.name}",
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
    if args.rank is not None:
        compressed = compress_model(
            model,
            stats,
            method=args.method,
            rank=args.rank,
            calibration_info=calibration_info,
            bias_correction=args.bias_correction,
            dtype=args.dtype,
            quantize=args.quantize,
        )
    else:
        heldout = rows.select(range(args.calibration_samples, total)) if needs_heldout else None
        ranks = allocate_ranks(
            model,
            stats,
            method=args.method,
            attention=not args.no_attention,
            show_progress=True,
            report=report,
            seq_len=min(128, model.config.max_position_embeddings),
            bias_correction=args.bias_correction,
            metric_fn=glue_metric_points(info.name),
            screening_samples=args.screening_samples,
            safety_margin=args.safety_margin,
            refine_steps=args.refine_steps,
            eval_dataloader=list(iter_batches(heldout, tokenizer, batch_size=64, sort_by_length=True))
            if heldout is not None
            else None,
            dtype=args.dtype,
            quantize=args.quantize,
            **budget,
        )
        if not ranks:
            raise ValueError(f"The budget cannot be met: no module can be compressed within {budget}.")
        compressed = compress_model(
            model,
            stats,
            method=args.method,
            ranks=ranks,
            calibration_info=calibration_info,
            bias_correction=args.bias_correction,
            dtype=args.dtype,
            quantize=args.quantize,
        )
    seconds = time.perf_counter() - started
    dev = _dev(args, tokenizer, info)
    models = {"dense": model, **_dense_in_form(model, args.dtype, args.quantize), f"{args.method}": compressed}
    results = _measure(args, models, dev, tokenizer, info)
    summary = {
        "task": info.name,
        "budget": {k: v for k, v in {**budget, "rank": args.rank}.items() if v is not None},
        "method": args.method,
        "dtype": args.dtype or "float32",
        "quantize": args.quantize,
        "compress_seconds": seconds,
        "allocation": report,
        "results": results,
    }
    with output_folder(args.output, keep_card=True) as staging:  # weights, card, tokenizer, results: all or none
        compressed.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_results(staging, summary)
    args.saved = True
    print()
    _print_table(results, info, len(dev))
    if report.get("evaluations"):
        print(
            f"Allocation: {report['evaluations']} held-out evaluations ({report['screening_examples']} screening / "
            f"{report['heldout_examples']} joint-check train rows) in {report['evaluation_seconds']:.0f} s; held-out "
            f"{info.main_metric} drop {report['heldout_drop']:.2f} ± {report['heldout_standard_error']:.2f} points."
        )
    print(f"Saved to {args.output} (reload with `import drone_hf` + AutoModelForSequenceClassification).")
    if args.push_to_hub:
        from .hub import push_compressed_to_hub

        print(f"Pushed: {push_compressed_to_hub(compressed, args.push_to_hub, tokenizer=tokenizer)}")
    return 0


def _dense_in_form(model, dtype: str | None, quantize: str | None) -> dict:
    """The dense model in the deployment form too (`{"dense-bfloat16": ...}`), so that the table shows the speed-up
    against dense in the same dtype as well as against dense float32; empty for float32."""
    import copy

    from .deployment import quantize_model, resolve_dtype

    if quantize:
        return {f"dense-{quantize}": quantize_model(model)}
    if dtype and dtype != "float32":
        return {f"dense-{dtype}": copy.deepcopy(model).to(resolve_dtype(dtype))}
    return {}


def _evaluate(args) -> int:
    model, tokenizer, info = _load(args)
    dev = _dev(args, tokenizer, info)
    _print_table(_measure(args, {Path(args.model).name or args.model: model}, dev, tokenizer, info), info, len(dev))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `drone-hf` command."""
    args = _parser().parse_args(argv)
    args.saved = False
    try:
        if args.command == "compress-embeddings":
            return _compress_embeddings(args)
        return _compress(args) if args.command == "compress" else _evaluate(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"drone-hf {args.command}: error: {error}", file=sys.stderr)
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
