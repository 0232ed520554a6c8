"""Cost accounting for compressed models: FLOPs from the config, parameters, checkpoint size, measured latency."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping

import torch
from torch import nn
from transformers import PretrainedConfig


def _linear_macs(config: PretrainedConfig, name: str, out_features: int, in_features: int) -> int:
    rank = (getattr(config, "drone_ranks", None) or {}).get(name)
    return in_features * out_features if rank is None else rank * (in_features + out_features)


def encoder_macs(config: PretrainedConfig, seq_len: int = 128, *, prefix: str = "bert") -> int:
    r"""
    Multiply-adds of one sequence through the encoder, pooler and classifier, computed from the config alone.

    Counts every linear (dense `in * out` per token, factored `k (in + out)`), and the attention products
    (`n^2` times the query/key width for the scores, `n^2` times the value width for the context). Query/key widths
    narrowed by DRONE attention (`drone_attention_ranks`) are honoured. Embedding lookups,
    softmax, LayerNorm and activations are not counted: they are not matrix products.

    Args:
        config (`PretrainedConfig`): A `BertConfig` or [`DroneConfig`] (its `drone_ranks` are honoured).
        seq_len (`int`, *optional*, defaults to 128): Tokens per sequence.
        prefix (`str`, *optional*, defaults to `"bert"`): Base-model prefix of the module names.

    Returns:
        `int`: multiply-adds per sequence.
    """
    if seq_len <= 0:
        raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
    hidden, ffn = config.hidden_size, config.intermediate_size
    attention_ranks = getattr(config, "drone_attention_ranks", None) or {}
    total = 0
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}.encoder.layer.{i}."
        # DRONE attention narrows each head's query/key width from d_h to its rank: the query/key projections and
        # the n^2 score product shrink with it.
        head_rank = attention_ranks.get(layer + "attention.self")
        width = hidden if head_rank is None else head_rank * config.num_attention_heads
        projections = [
            ("attention.self.value", hidden, hidden),
            ("attention.output.dense", hidden, hidden),
            ("intermediate.dense", ffn, hidden),
            ("output.dense", hidden, ffn),
        ]
        projections += [("attention.self.query", width, hidden), ("attention.self.key", width, hidden)]
        per_token = sum(_linear_macs(config, layer + name, out_f, in_f) for name, out_f, in_f in projections)
        total += seq_len * per_token + seq_len * seq_len * (width + hidden)
    return total + hidden * hidden + hidden * getattr(config, "num_labels", 2)


def flop_speedup_bound(
    dense_config: PretrainedConfig, compressed_config: PretrainedConfig, seq_len: int = 128
) -> float:
    """Ratio of multiply-adds dense / compressed: the speed-up a perfectly efficient kernel would give."""
    return encoder_macs(dense_config, seq_len) / encoder_macs(compressed_config, seq_len)


def count_parameters(model: nn.Module, prefix: str | None = None) -> int:
    """Number of parameters, optionally only those whose name starts with `prefix` (e.g. `"bert.encoder."`)."""
    return sum(p.numel() for name, p in model.named_parameters() if prefix is None or name.startswith(prefix))


def checkpoint_size_mb(model) -> float:
    """Size in MB (1e6 bytes) of the safetensors files `save_pretrained` writes for `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors")) / 1e6


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    *,
    repeats: int = 30,
    warmup: int = 3,
) -> dict[str, float]:
    r"""
    Median seconds per forward pass of each model on the same `inputs`, measured in one run.

    The models are timed round-robin (one call of each per round) so that drift in machine load affects them all
    alike; quote speed as a ratio against the dense model timed in the same call.

    Args:
        models (`Mapping[str, nn.Module]`): Name -> model (put in eval mode here).
        inputs (`Mapping[str, Tensor]`): Keyword inputs, e.g. a tokenizer batch of 8 sequences.
        repeats (`int`, *optional*, defaults to 30): Timed rounds.
        warmup (`int`, *optional*, defaults to 3): Untimed rounds first.

    Returns:
        `dict[str, float]`: Name -> median seconds.
    """
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"`repeats` must be > 0 and `warmup` >= 0, got {repeats} and {warmup}.")
    for model in models.values():
        model.eval()
    device_inputs = {}
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(warmup + repeats):
        for name, model in models.items():
            device = next(model.parameters()).device
            device_inputs = {k: v.to(device) for k, v in inputs.items()}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(**device_inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_name() -> str:
    """The CPU's model name from `/proc/cpuinfo` (Linux), with architecture and core count, else what `platform` knows.

    Example:
        >>> cpu_name()  # doctest: +SKIP
        'AMD EPYC (x86_64, 2 cores)'
    """
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


__all__ = [
    "checkpoint_size_mb",
    "cpu_name",
    "count_parameters",
    "encoder_macs",
    "flop_speedup_bound",
    "measure_latency",
]
