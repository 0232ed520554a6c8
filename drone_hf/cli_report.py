"""What `drone-hf compress` and `drone-hf evaluate` measure and print: the dev metrics, sizes and timed speed of
models on one task, the table, and the model card inputs built from the same numbers (so the card says what the
terminal said)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .speed import threads_phrase


if TYPE_CHECKING:
    from .data import TaskData
    from .speed import SpeedComparison

TIMING_BATCH = 8


def timing_inputs(dev, tokenizer, seq_len: int) -> dict[str, torch.Tensor]:
    """A batch of the first `TIMING_BATCH` dev rows padded to `seq_len` tokens."""
    from .calibration import MODEL_INPUT_KEYS

    rows = [dev[i] for i in range(min(TIMING_BATCH, len(dev)))]
    batch = tokenizer.pad(
        [{k: r[k][:seq_len] for k in MODEL_INPUT_KEYS if k in r} for r in rows],
        padding="max_length",
        max_length=seq_len,
        return_tensors="pt",
    )
    return dict(batch)


def hardware() -> str:
    from .profiling import cpu_name

    return f"CPU {cpu_name()}"


def measure_models(
    models: Mapping[str, nn.Module],
    dev,
    tokenizer,
    task: TaskData,
    *,
    reference: str | None,
    repeats: int,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], SpeedComparison | None]:
    r"""
    Dev metrics, parameters, checkpoint size and latency of each model; with a `reference`, every model is timed
    round-robin against it ([`~speed.compare_speed`]) and gets its speed-up, CPU-time ratio, FLOP bound and flags.

    Returns:
        `(results, comparison)`: per model name a dict of numbers, and the [`~speed.SpeedComparison`] (or `None`
        without a reference, when only the latency of each model is measured).
    """
    from .evaluation import predict
    from .profiling import checkpoint_size_mb, count_parameters, flop_speedup_bound, layer_parameters, measure_latency
    from .speed import compare_speed

    first = next(iter(models.values()))
    seq_len = min(128, first.config.max_position_embeddings)
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        logits, labels = predict(
            model,
            dev,
            tokenizer,
            batch_size=batch_size,
            show_progress=f"Evaluating {name}" if show_progress else False,
        )
        if labels is None:
            raise ValueError("The validation rows have no labels: an eval set without labels cannot be scored.")
        results[name] = {
            "metrics": task.compute_metrics(logits, labels),
            "parameters": count_parameters(model),
            "encoder_parameters": layer_parameters(model),
            "checkpoint_mb": checkpoint_size_mb(model),
            "seq_len": seq_len,
        }
    inputs = timing_inputs(dev, tokenizer, seq_len)
    if reference is None:
        record: dict = {}
        latency = measure_latency(models, inputs, repeats=repeats, record=record, show_progress=show_progress)
        for name in models:
            results[name]["latency_ms"] = 1000 * latency[name]
        return results, None
    base = models[reference].config
    bounds = {name: flop_speedup_bound(base, model.config, seq_len) for name, model in models.items()}
    comparison = compare_speed(
        models, inputs, reference=reference, flop_bounds=bounds, repeats=repeats, show_progress=show_progress
    )
    for name in models:
        results[name].update(comparison.models[name])
        results[name]["flop_bound"] = bounds[name]
    return results, comparison


def print_table(results: Mapping[str, Mapping], task: TaskData, dev_size: int, comparison) -> None:
    """The Markdown table of [`measure_models`]' results and the lines that say how they were measured."""
    from .cli import _print_markdown

    metric_names = list(next(iter(results.values()))["metrics"])
    header = ["model", *metric_names, "params (M)", "encoder (M)", "size MB", "latency ms"]
    if comparison is not None:
        header += ["speed-up", "CPU-time ratio", "FLOP bound"]
    rows = []
    for name, r in results.items():
        cells = [name, *(f"{100 * r['metrics'][m]:.2f}" for m in metric_names)]
        cells += [f"{r['parameters'] / 1e6:.2f}", f"{r['encoder_parameters'] / 1e6:.2f}"]
        cells += [f"{r['checkpoint_mb']:.1f}", f"{r['latency_ms']:.1f}"]
        if comparison is not None:
            if name == comparison.reference:
                cells += ["1.00x", "1.00x", "1.00x"]
            else:
                flagged = bool(r.get("flags"))
                cpu = r.get("cpu_speedup")
                cells += [
                    "flagged" if flagged else f"{r['speedup']:.2f}x",
                    "—" if cpu is None else ("flagged" if flagged else f"{cpu:.2f}x"),
                    f"{r['flop_bound']:.2f}x",
                ]
        rows.append(cells)
    _print_markdown(header, rows)
    print(
        f"\n{task.validation_description} ({dev_size} examples); latency: batch {TIMING_BATCH} x "
        f"{next(iter(results.values()))['seq_len']} tokens, {hardware()}, {threads_phrase(torch.get_num_threads())}, "
        f"median of {'shuffled round-robin runs' if comparison is not None else 'runs'} in this process."
    )
    if comparison is not None:
        print(comparison.note())


def refinement_phrase(report: Mapping[str, Any], metric: str) -> str | None:
    """What the fast search's confirmed refinement did (see `budget_path._confirmed_refine`), for the CLI's summary;
    None when its moves were not confirmed on a separate half of the held-out rows or no move fitted."""
    confirmation = report.get("refinement_confirmation")
    if not confirmation or not confirmation["moves"]:
        return None
    verdict = "kept" if confirmation["kept"] else "not kept: the bisection's ranks stand"
    return (
        f"Refinement: {confirmation['moves']} modules moved in {confirmation['selection_checks']} checks on "
        f"{confirmation['selection_rows']} held-out rows; on the other {confirmation['confirmation_rows']} the "
        f"{metric} drop was {confirmation['drop']:.2f} ± {confirmation['standard_error']:.2f} points: {verdict}."
    )


def timed_forms(dtype: str | None, quantize: str | None) -> str:
    """The forms the card's speed-up compares, in [`~deployment.describe_deployment`]'s words: `"float32"`, or the
    compressed model's form against the float32 dense reference (`"compressed in bfloat16, dense in float32"`)."""
    from .deployment import describe_deployment

    form = describe_deployment(dtype, quantize)
    return form if form == "float32" else f"compressed in {form}, dense in float32"


def card_inputs(
    task: TaskData,
    results: Mapping[str, Mapping],
    comparison,
    *,
    reference: str,
    compressed: str,
    base_model: str | None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `create_or_update_model_card` (and `push_compressed_to_hub(card_kwargs=...)`) with
    everything the command measured: base model, dataset, dense and compressed metrics, and the speed (withheld, with
    the reason, when it was flagged). `dtype` / `quantize` are the compressed model's deployment form (`--dtype`,
    `--quantize`), named in the speed's setting ([`timed_forms`]); the `reference` is timed in float32."""
    metrics = {"dense": dict(results[reference]["metrics"]), "compressed": dict(results[compressed]["metrics"])}
    speed = None
    if comparison is not None:
        seq_len = results[compressed]["seq_len"]
        setting = f"batch {TIMING_BATCH} x {seq_len} tokens, {timed_forms(dtype, quantize)}"
        speed = comparison.card_speed(compressed, hardware(), setting)
    return {"base_model": base_model, "dataset": task.card_dataset, "metrics": metrics, "speed": speed}


__all__ = ["card_inputs", "hardware", "measure_models", "print_table", "timed_forms", "timing_inputs"]
