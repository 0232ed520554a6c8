"""`drone-hf export --model DIR --onnx --output DIR [--optimize] [--quantize int8]`: a dense or compressed classifier
as an ONNX Runtime folder (model.onnx, model_int8.onnx, config.json, tokenizer, onnx_export.json), written whole or
not at all (`drone_hf.cli_checks.output_folder`). See `drone_hf.onnx_export`."""

from __future__ import annotations

import logging

from .cli_checks import check_model_path, check_output, check_tokenizer, count, model_load_error, output_folder


logger = logging.getLogger("drone_hf.cli")


def add_export_parser(commands) -> None:
    from .defaults import ONNX_OPSET as DEFAULT_OPSET
    from .defaults import ONNX_OPSETS as OPSETS

    sub = commands.add_parser(
        "export",
        help="export a classifier (dense or compressed) for ONNX Runtime, checked against PyTorch",
        description="Export a dense or drone-hf compressed classifier to ONNX for ONNX Runtime. Factored attention "
        "projections are emitted as ONNX Runtime's fused MultiHeadAttention; with --optimize, ONNX Runtime's "
        "transformer optimiser fuses the rest (Attention, BiasGelu; residual add and LayerNorm are left apart, which "
        "is faster on ONNX Runtime's CPU provider).",
    )
    sub.add_argument("--model", required=True, help="the classifier: a folder saved with save_pretrained, or a Hub id")
    sub.add_argument("--onnx", action="store_true", help="export to ONNX (the one export format; required)")
    sub.add_argument("--output", required=True, help="new folder (or an earlier drone-hf output) to write into")
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="allow an --output folder that drone-hf did not write (its model, tokenizer and results files are "
        "replaced, other files kept)",
    )
    sub.add_argument(
        "--optimize", action="store_true", help="run ONNX Runtime's transformer optimiser (fused kernels) on the graph"
    )
    sub.add_argument(
        "--quantize", choices=["int8"], help="also write model_int8.onnx (ONNX Runtime dynamic int8 weights)"
    )
    sub.add_argument(
        "--opset",
        type=count(OPSETS.start),
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {OPSETS.start} to {OPSETS.stop - 1} (default {DEFAULT_OPSET})",
    )
    sub.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="plain ONNX attention (runs on any ONNX back end; slower on ONNX Runtime for compressed models)",
    )
    sub.add_argument("--threads", type=count(1), help="torch CPU threads (default: one per core)")


def run_export(args) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .cli_checks import write_results
    from .cli_setup import require_extra
    from .defaults import ONNX_OPSETS as OPSETS
    from .onnx_export import write_onnx

    if not args.onnx:
        raise ValueError("`drone-hf export` needs a format: pass `--onnx` (the only export format so far).")
    if args.opset not in OPSETS:
        raise ValueError(f"`--opset {args.opset}` is not supported; choose {OPSETS.start} to {OPSETS.stop - 1}.")
    require_extra("onnx")  # before the model loads: a core install learns at once what is missing
    check_model_path(args.model)
    check_output(args.output, args.model, overwrite=args.overwrite)
    logger.info(f"Loading {args.model}")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise model_load_error(args.model, error) from error
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check_tokenizer(args.model, tokenizer, model)
    logger.info("Exporting to ONNX and checking it against PyTorch")
    with output_folder(args.output) as staging:  # model, config, tokenizer and report appear together or not at all
        report = write_onnx(
            model.eval(),
            staging,
            tokenizer=tokenizer,
            opset=args.opset,
            optimize=args.optimize,
            quantize=args.quantize,
            fuse_attention=not args.no_fuse_attention,
        )
        write_results(staging, {"model": args.model, "command": "export", "onnx": report})
    args.saved = True
    print(f"\nWrote {args.output} (opset {report['opset']}, inputs: {', '.join(report['inputs'])}).\n")
    print("| file | Attention | MultiHeadAttention | SkipLayerNorm (split) | BiasGelu | nodes | max |ORT - torch| |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in report["files"].items():
        ops = entry["fused_ops"]
        attention = ops["Attention"] + ops["QAttention"]
        print(
            f"| {name} | {attention} | {ops['MultiHeadAttention']} | "
            f"{ops['SkipLayerNormalization']} ({report['skip_layer_norms_split']}) | "
            f"{ops['BiasGelu'] + ops['FastGelu']} | {ops['nodes']} | {entry['max_abs_diff']:.2g} |"
        )
    if report["attention_blocks_unfused_route"]:
        print(
            f"\n{len(report['attention_blocks_unfused_route'])} compressed attention blocks of this family compute "
            "attention in their own code, so they are exported unfused."
        )
    return 0


__all__ = ["add_export_parser", "run_export"]
