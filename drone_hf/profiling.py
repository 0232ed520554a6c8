"""Cost accounting for compressed models: FLOPs from the config, parameters, checkpoint size, measured latency."""

from __future__ import annotations

import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import PretrainedConfig


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of one linear kind (dense, factored, narrowed query/key; float or int8)."""
    from .layers import DroneLinear, DroneQKLinear

    if isinstance(module, DroneLinear):
        return module.rank * (module.in_features + module.out_features)
    if isinstance(module, DroneQKLinear):
        return module.in_features * module.num_heads * module.rank
    return module.in_features * module.out_features


def model_macs(model: nn.Module, seq_len: int = 128) -> int:
    r"""
    Multiply-adds of one sequence of `seq_len` tokens through the encoder layers of `model`, plus its pooler and
    classification head, counted from the module tree (any supported family; factored and narrowed modules as they
    are).

    Counts every linear of every layer per token (a layer that runs several times, as ALBERT's shared one, once per
    run) and the attention products: `n^2` times the head width for the scores and `n^2` times the value width for
    the context. DRONE attention narrows the query/key *projections* (counted at their rank), but [`DroneQKLinear`]
    zero-pads each head back to the head size so that the family's own attention runs unchanged: the score product
    runs, and is counted, at the full width. Linears outside the layers (pooler, classifier, heads) count once
    per sequence. Embedding lookups, softmax, LayerNorm and activations are not counted: they are not matrix products.
    """
    from .architecture import get_architecture, layer_names
    from .structure import attention_blocks, attention_geometry

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
    layers = layer_names(model)
    runs = 1 if get_architecture(model).layerwise else max(1, model.config.num_hidden_layers // len(layers))
    blocks = set(attention_blocks(model))
    per_layer = 0
    for layer in layers:
        per_layer += seq_len * sum(_linear_macs(m) for m in _linear_kinds(model.get_submodule(layer)))
        block = next((b for b in blocks if b.startswith(f"{layer}.")), None)
        if block is not None:
            _, _, num_heads, head = attention_geometry(model, block)
            per_layer += 2 * seq_len * seq_len * num_heads * head  # scores (padded back to `head`) and context
        else:  # scores and context at the full width (e.g. ModernBERT's fused projection)
            per_layer += 2 * seq_len * seq_len * model.config.hidden_size
    layer_ids = {id(model.get_submodule(layer)) for layer in layers}
    outside = sum(_linear_macs(m) for m in _linear_kinds(model, skip=layer_ids))
    return runs * per_layer + outside


def _linear_kinds(root: nn.Module, skip: set[int] = frozenset()):
    """The linear-kind modules under `root` (a DroneLinear counts as one; its inner `down`/`up` are not visited),
    leaving out the subtrees whose ids are in `skip`."""
    from .int8 import DroneInt8Linear
    from .layers import DroneLinear, DroneQKLinear

    for child in root.children():
        if id(child) in skip:
            continue
        if isinstance(child, (nn.Linear, DroneLinear, DroneQKLinear, DroneInt8Linear)):
            yield child
        else:
            yield from _linear_kinds(child, skip)


def encoder_macs(config: PretrainedConfig, seq_len: int = 128, *, prefix: str | None = None) -> int:
    r"""
    Multiply-adds of one sequence through the encoder, pooler and classifier, computed from the config alone (a
    shape-only copy of the model is built on the meta device and counted by [`model_macs`]).

    Args:
        config (`PretrainedConfig`): A dense config of a supported family or a DRONE config (its `drone_ranks`,
            `drone_attention_ranks` are honoured).
        seq_len (`int`, *optional*, defaults to 128): Tokens per sequence.
        prefix (`str`, *optional*): Ignored (drone_hf 0.1 took the base-model prefix; names are now resolved).

    Returns:
        `int`: multiply-adds per sequence.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"`seq_len` must be a positive int, got {seq_len!r}.")
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return model_macs(model, seq_len) + config.hidden_size * getattr(config, "num_labels", 2)


def flop_speedup_bound(
    dense_config: PretrainedConfig, compressed_config: PretrainedConfig, seq_len: int = 128
) -> float:
    """Ratio of multiply-adds dense / compressed: the speed-up a perfectly efficient kernel would give."""
    return encoder_macs(dense_config, seq_len) / encoder_macs(compressed_config, seq_len)


def layer_parameters(model: nn.Module) -> int:
    """Parameters of the encoder layers (any supported family; what compression shrinks), each shared tensor once."""
    from .architecture import layer_names

    seen = {id(p): p.numel() for layer in layer_names(model) for p in model.get_submodule(layer).parameters()}
    return sum(seen.values())


def count_parameters(model: nn.Module, prefix: str | None = None) -> int:
    """Number of parameters, optionally only those whose name starts with `prefix` (e.g. `"bert.encoder."`)."""
    return sum(p.numel() for name, p in model.named_parameters() if prefix is None or name.startswith(prefix))


def checkpoint_size_mb(model) -> float:
    """Size in MB (1e6 bytes) of the safetensors files `save_pretrained` writes for `model` (written to a temporary
    folder, without transformers' progress bar)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            names = [f for f in os.listdir(tmp) if f.endswith(".safetensors")]
            return sum(os.path.getsize(os.path.join(tmp, f)) for f in names) / 1e6
    finally:
        if shown:
            logging.enable_progress_bar()


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    *,
    repeats: int = 30,
    warmup: int = 3,
    record: dict | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    r"""
    Median seconds per forward pass of each model on the same `inputs`, measured in one run.

    The models are timed round-robin (one call of each per round, in a new random order every round) so that drift in
    machine load affects them all alike; quote speed as a ratio against the dense model timed in the same call
    (`drone_hf.speed.compare_speed` does, with the CPU-time ratio and a check of the result).

    Args:
        models (`Mapping[str, nn.Module]`): Name -> model (timed in eval mode; every module's own train/eval mode is
            restored afterwards).
        inputs (`Mapping[str, Tensor]`): Keyword inputs, e.g. a tokenizer batch of 8 sequences.
        repeats (`int`, *optional*, defaults to 30): Timed rounds.
        warmup (`int`, *optional*, defaults to 3): Untimed rounds first.
        record (`dict`, *optional*): Filled with every round's times, see [`time_round_robin`].
        show_progress (`bool`, *optional*, defaults to `False`): A progress bar over the rounds.

    Returns:
        `dict[str, float]`: Name -> median seconds.
    """
    from .calibration import model_inputs
    from .model_state import eval_mode

    _check_rounds(repeats, warmup)  # before any model is put in eval mode
    calls = {}
    with eval_mode(*models.values()):  # each module's own mode is restored afterwards
        for name, model in models.items():
            device = next(model.parameters()).device
            # Each model gets the inputs its forward takes (e.g. no token_type_ids for DistilBERT), on its device.
            calls[name] = _synchronised_forward(model, model_inputs(model, inputs, device), device)
        return time_round_robin(calls, repeats=repeats, warmup=warmup, record=record, show_progress=show_progress)


def _synchronised_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], device: torch.device):
    """A call of `model(**inputs)` that returns once the device has finished it."""

    def call():
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def load_average() -> float | None:
    """The machine's 1-minute load average (`None` where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def time_round_robin(
    calls: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    shuffle: bool = True,
    seed: int = 0,
    record: dict | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """Median seconds of each zero-argument call (which must return once its work is finished), timed round-robin:
    `warmup` untimed rounds, then `repeats` timed ones, one call of each per round, so that drift in machine load
    affects them all alike. The one timing loop behind [`measure_latency`] and `measure_encode_latency`.

    With `shuffle` (the default) the order of the calls is drawn anew every round (seeded): a fixed order lets
    whatever the first call of a round pays (threads waking up, caches refilled after the previous round) fall on one
    model. `record`, when given, receives `wall` and `cpu` (name -> seconds of each timed round, in the same rounds;
    CPU time is the process's, all threads), `load_average` (1-minute, before and after) and the settings."""
    from transformers.utils.logging import tqdm

    _check_rounds(repeats, warmup)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # nothing queued before the first timed call
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    rng, order = random.Random(seed), list(calls)
    load_before = load_average()
    with tqdm(total=warmup + repeats, desc="Timing", unit="round", disable=not show_progress) as progress:
        for round_index in range(warmup + repeats):
            if shuffle:
                rng.shuffle(order)
            for name in order:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                calls[name]()
                if round_index >= warmup:
                    wall[name].append(time.perf_counter() - start_wall)
                    cpu[name].append(time.process_time() - start_cpu)
            progress.update(1)
    if record is not None:
        record.update(
            wall=wall,
            cpu=cpu,
            load_average=[load_before, load_average()],
            repeats=repeats,
            warmup=warmup,
            shuffled=shuffle,
            threads=torch.get_num_threads(),
        )
    return {name: statistics.median(values) for name, values in wall.items()}


def _check_rounds(repeats: int, warmup: int) -> None:
    if repeats <= 0 or warmup < 0:
        raise ValueError(f"`repeats` must be > 0 and `warmup` >= 0, got {repeats} and {warmup}.")


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
    "layer_parameters",
    "load_average",
    "measure_latency",
    "model_macs",
    "time_round_robin",
]
