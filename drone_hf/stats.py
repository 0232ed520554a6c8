"""The statistics format, in one place: per target linear, the `(in+1) x (in+1)` float64 sum over calibration
tokens of `[x; 1][x; 1]^T` (uncentred second moment, input sum and token count together), and its checks and files.

[`collect_activation_stats`] returns an [`ActivationStats`]: a plain `dict` of those tensors that also records a
fingerprint of the model it was collected on, so that statistics of another model (same shapes, other weights) are
refused at compression time instead of silently giving wrong factors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .architecture import base_model_prefix


logger = logging.get_logger(__name__)
_FINGERPRINT_KEY = "drone_fingerprint"
_SAMPLES_PER_TENSOR = 16
_SYMMETRY_RTOL = 1e-6


class ActivationStats(dict):
    r"""
    The statistics of [`collect_activation_stats`]: a `dict` of module name -> augmented second moment (see
    [`split_stats`]), plus `fingerprint`, a record of the model the statistics were collected on (a few sampled
    weights per tensor, the names and shapes of its parameters, its dtype). [`compress_model`] and
    [`allocate_ranks`] compare it with the model they are given and refuse statistics of another model.

    A plain `dict` (e.g. from an older drone_hf, or rebuilt with a comprehension) has no fingerprint and is not
    checked. Set `stats.fingerprint = None` to use statistics on purpose with weights that changed since.
    """

    def __init__(self, *args, fingerprint: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint
        self.few_tokens_reported = False

    def copy(self) -> ActivationStats:
        copied = ActivationStats(self, fingerprint=self.fingerprint)
        copied.few_tokens_reported = self.few_tokens_reported
        return copied


def split_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Splits an augmented statistic into `(C, sum_x, n)`.

    Each statistic is the `(in+1) x (in+1)` float64 matrix `sum over tokens of [x; 1][x; 1]^T`: its top-left block is
    the uncentred second moment `C = X X^T`, its last column the sum of the inputs and its corner the token count.
    Keeping the three together lets bias-aware (homogeneous-coordinate) solvers use the same file.
    """
    return stats[:-1, :-1], stats[:-1, -1], float(stats[-1, -1])


# ----------------------------------------------------------------------------------------------- fingerprints


def _describe(model) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", None) or type(model).__name__
    layers = getattr(config, "num_hidden_layers", None)
    return f"{name!r} ({type(model).__name__}" + (f", {layers} layers)" if layers is not None else ")")


def model_fingerprint(model: torch.nn.Module) -> dict:
    """A cheap record of the weights statistics flow through: the names and shapes of the encoder's parameters (the
    head's are left out: it does not change what the encoder layers see) and 16 evenly spaced values of each.

    Returns:
        `dict`: `structure` (hash of names and shapes), `values` (float32 CPU tensor of the sampled weights), `dtype`,
        `digest` (short hash of both, for messages) and `model` (a description, for messages).
    """
    prefix = base_model_prefix(model)
    params = [(name, p) for name, p in model.named_parameters() if name.startswith(prefix)]
    samples = []
    for _, parameter in params:
        flat = parameter.detach().reshape(-1)
        count = min(_SAMPLES_PER_TENSOR, flat.numel())
        index = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)  # integer arithmetic: device-exact
        samples.append(flat[index.to(flat.device)].float().cpu())
    values = torch.cat(samples) if samples else torch.zeros(0)
    structure = hashlib.sha256(";".join(f"{n}:{tuple(p.shape)}" for n, p in params).encode()).hexdigest()
    digest = hashlib.sha256(structure.encode() + values.numpy().tobytes()).hexdigest()[:12]
    dtype = str(params[0][1].dtype).replace("torch.", "") if params else "float32"
    return {"structure": structure, "values": values, "dtype": dtype, "digest": digest, "model": _describe(model)}


def _fingerprint_mismatch(recorded: Mapping, current: Mapping) -> str | None:
    """Why two fingerprints are not of the same weights, or None if they are."""
    if recorded.get("structure") != current["structure"]:
        return "their parameters have different names or shapes (another architecture, layer count or head size)"
    values, here = recorded["values"], current["values"]
    if recorded.get("dtype") == current["dtype"]:
        differ = int((values != here).sum())
    else:  # a cast (e.g. float32 -> float16) moves each weight by at most the coarser dtype's rounding
        dtypes = [getattr(torch, d) for d in (recorded["dtype"], current["dtype"])]
        coarser = max(dtypes, key=lambda d: torch.finfo(d).eps)
        close = torch.isclose(values, here, rtol=2 * torch.finfo(coarser).eps, atol=torch.finfo(coarser).tiny)
        differ = int((~close).sum())
    if differ:
        return f"{differ} of {values.numel()} sampled weights differ"
    return None


def check_fingerprint(stats, model: torch.nn.Module) -> None:
    """Raises a `ValueError` if `stats` records a model whose weights are not `model`'s (statistics without a
    fingerprint, e.g. a plain dict, are not checked)."""
    recorded = getattr(stats, "fingerprint", None)
    if not recorded:
        return
    current = model_fingerprint(model)
    reason = _fingerprint_mismatch(recorded, current)
    if reason is None:
        return
    raise ValueError(
        f"`stats` were collected on a different model than the `model` given: they come from {recorded['model']} "
        f"(weights fingerprint {recorded['digest']}), `model` is {current['model']} (fingerprint "
        f"{current['digest']}): {reason}. Statistics describe the inputs each layer saw in the model they were "
        "collected through, so they are wrong for other weights: collect them on this model with "
        "`collect_activation_stats(model, dataloader)`. (To use them anyway with weights you changed on purpose, set "
        "`stats.fingerprint = None`.)"
    )


def _encode_fingerprint(fingerprint: Mapping) -> str:
    record = {k: v for k, v in fingerprint.items() if k != "values"}
    record["values"] = base64.b64encode(fingerprint["values"].numpy().astype("<f4").tobytes()).decode()
    return json.dumps(record)


def _decode_fingerprint(text: str) -> dict | None:
    try:
        record = json.loads(text)
        raw = base64.b64decode(record["values"])
        record["values"] = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
        return record
    except (ValueError, KeyError, TypeError):
        logger.warning("Ignoring an unreadable model fingerprint in a statistics file; it will not be checked.")
        return None


# ---------------------------------------------------------------------------------------------------- checks


def warn_if_few_tokens(stats: Mapping, widths: Mapping[str, int]) -> None:
    """Logs a warning when the statistics of some modules were accumulated over fewer tokens than the module has
    inputs: their second moment is then rank-deficient (once per [`ActivationStats`] object).

    Args:
        widths: Module name -> input width (`in_features`), for the modules to check.
    """
    if getattr(stats, "few_tokens_reported", False):
        return
    short = {}
    for name, width in widths.items():
        tensor = stats.get(name)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[0] > 1:
            tokens = float(tensor[-1, -1])
            if 0 < tokens < width:
                short[name] = (int(round(tokens)), width)
    if isinstance(stats, ActivationStats):
        stats.few_tokens_reported = True
    if not short:
        return
    name, (tokens, width) = max(short.items(), key=lambda item: item[1][1])
    fewest = min(t for t, _ in short.values())
    logger.warning(
        f"Calibration saw {fewest} tokens, fewer than the inputs of {len(short)} of {len(widths)} target modules "
        f"(e.g. `{name}`: {tokens} tokens for {width} inputs). Their second moments have rank at most the number of "
        "tokens, so the factorisation is rank-deficient: it only fits the directions those tokens span and is "
        f"arbitrary in the others. Calibrate on at least {width} non-padding tokens (many times more is better, e.g. "
        "a few hundred sentences)."
    )


def _check_one(name: str, tensor, expected: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"`stats[{name!r}]` must be a torch.Tensor (as collect_activation_stats returns), got "
            f"{type(tensor).__name__}; convert it with torch.as_tensor."
        )
    if tensor.shape != (expected, expected):
        raise ValueError(
            f"`stats[{name!r}]` must have shape ({expected}, {expected}) for this model, got {tuple(tensor.shape)}: "
            "were the statistics computed on another model?"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"`stats[{name!r}]` must be a floating-point tensor, got {tensor.dtype}.")
    if not torch.isfinite(tensor).all():
        bad = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise ValueError(
            f"`stats[{name!r}]` contains {bad} (NaN or Inf): the statistics are corrupt; collect them again."
        )
    tensor = tensor.double()
    count, diagonal = float(tensor[-1, -1]), tensor.diagonal()
    scale = float(diagonal.abs().max())
    if count < 0 or float(diagonal.min()) < -_SYMMETRY_RTOL * scale:
        raise ValueError(
            f"`stats[{name!r}]` is not positive semi-definite (token count {count:g}, smallest diagonal entry "
            f"{float(diagonal.min()):.3g}): it is not a sum of [x; 1][x; 1]^T as collect_activation_stats builds; "
            "collect the statistics again."
        )
    if count == 0:
        raise ValueError(f"`stats[{name!r}]` was accumulated over 0 tokens.")
    asymmetry = float((tensor - tensor.T).abs().max())
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"`stats[{name!r}]` is not symmetric (largest |S - S^T| entry {asymmetry:.3g}, diagonal up to "
            f"{scale:.3g}): not a second moment as collect_activation_stats builds; collect the statistics again."
        )


def check_stats(
    stats, targets: Sequence[str], shapes: Mapping[str, tuple[int, int]], *, model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Checks statistics against the targets' weight shapes `(out, in)` (and, with `model`, against the fingerprint
    of the model they were collected on) and returns the augmented statistic per target. Logs a warning for
    modules that saw fewer tokens than they have inputs.

    Raises:
        `TypeError` / `ValueError`: for something that is not a statistics dict, statistics of another model, a
            missing target, a wrong shape, NaN/Inf, 0 tokens, or a matrix that is not symmetric positive
            semi-definite. (Indefinite matrices with a valid diagonal are caught by the factorisation itself.)
    """
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"`stats` must be the dict returned by collect_activation_stats, got {type(stats).__name__}. "
            "Pass method='svd' to compress without data."
        )
    if model is not None:
        check_fingerprint(stats, model)
    missing = [name for name in targets if name not in stats]
    if missing:
        raise ValueError(
            f"`stats` has no statistics for {len(missing)} target modules, e.g. {missing[:3]}; collect them with the "
            "same `target_modules`."
        )
    moments = {}
    for name in targets:
        _check_one(name, stats[name], shapes[name][1] + 1)
        moments[name] = stats[name]
    warn_if_few_tokens(stats, {name: shapes[name][1] for name in targets})
    return moments


# ------------------------------------------------------------------------------------------------------ files


def save_activation_stats(stats: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping | None = None):
    """Saves statistics to a safetensors file (shared tensors are written once per name), with the fingerprint of
    the model they came from (see [`ActivationStats`]) in the file's metadata."""
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in stats.items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    fingerprint = getattr(stats, "fingerprint", None)
    if fingerprint:
        metadata[_FINGERPRINT_KEY] = _encode_fingerprint(fingerprint)
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def load_activation_stats(path: str | os.PathLike) -> ActivationStats:
    """Loads statistics written by [`save_activation_stats`] (with the fingerprint of their model, if recorded)."""
    stats = load_file(os.fspath(path))
    bad = [name for name, t in stats.items() if t.dim() != 2 or t.shape[0] != t.shape[1] or not math.isfinite(t.sum())]
    if bad:
        raise ValueError(f"`{path}` is not an activation-statistics file: bad tensors {bad}.")
    with safe_open(os.fspath(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(_FINGERPRINT_KEY)
    return ActivationStats(stats, fingerprint=_decode_fingerprint(text) if text else None)


__all__ = [
    "ActivationStats",
    "check_fingerprint",
    "check_stats",
    "load_activation_stats",
    "model_fingerprint",
    "save_activation_stats",
    "split_stats",
    "warn_if_few_tokens",
]
