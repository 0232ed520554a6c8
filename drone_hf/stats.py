"""The statistics format, in one place: per target linear, the `(in+1) x (in+1)` float64 sum over calibration
tokens of `[x; 1][x; 1]^T` (uncentred second moment, input sum and token count together), and its checks and files."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file


def split_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Splits an augmented statistic into `(C, sum_x, n)`.

    Each statistic is the `(in+1) x (in+1)` float64 matrix `sum over tokens of [x; 1][x; 1]^T`: its top-left block is
    the uncentred second moment `C = X X^T`, its last column the sum of the inputs and its corner the token count.
    Keeping the three together lets bias-aware (homogeneous-coordinate) solvers use the same file.
    """
    return stats[:-1, :-1], stats[:-1, -1], float(stats[-1, -1])


def check_stats(stats, targets: Sequence[str], shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Checks statistics against the targets' weight shapes `(out, in)` and returns the augmented statistic per
    target.

    Raises:
        `TypeError` / `ValueError`: for something that is not a statistics dict, a missing target, a wrong shape
            (statistics of another model), NaN/Inf, or 0 tokens.
    """
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"`stats` must be the dict returned by collect_activation_stats, got {type(stats).__name__}. "
            "Pass method='svd' to compress without data."
        )
    missing = [name for name in targets if name not in stats]
    if missing:
        raise ValueError(
            f"`stats` has no statistics for {len(missing)} target modules, e.g. {missing[:3]}; collect them with the "
            "same `target_modules`."
        )
    moments = {}
    for name in targets:
        tensor, expected = stats[name], shapes[name][1] + 1
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (expected, expected):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"`stats[{name!r}]` must have shape ({expected}, {expected}) for this model, got {got}: were the "
                "statistics computed on another model?"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`stats[{name!r}]` contains NaN or Inf.")
        if split_stats(tensor)[2] <= 0:
            raise ValueError(f"`stats[{name!r}]` was accumulated over 0 tokens.")
        moments[name] = tensor
    return moments


def save_activation_stats(stats: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping | None = None):
    """Saves statistics to a safetensors file (shared tensors are written once per name)."""
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in stats.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)  # never leave a half-written file under the final name


def load_activation_stats(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads statistics written by [`save_activation_stats`]."""
    stats = load_file(os.fspath(path))
    bad = [name for name, t in stats.items() if t.dim() != 2 or t.shape[0] != t.shape[1] or not math.isfinite(t.sum())]
    if bad:
        raise ValueError(f"`{path}` is not an activation-statistics file: bad tensors {bad}.")
    return stats


__all__ = ["check_stats", "load_activation_stats", "save_activation_stats", "split_stats"]
