"""Speed-ups that can be published: models timed round-robin in one process (a new order every round), wall-clock and
CPU time side by side, the per-round spread and the load average, and a check that withholds a number a shared
machine made wrong (above the FLOP bound, a wide spread, wall clock and CPU time disagreeing) instead of printing it.

Why both clocks: on a busy machine the wall clock of a round includes the time other processes held the cores, in
either direction (a burst of load during the dense model's call inflates the speed-up, one during the compressed
model's deflates it); the CPU time this process spent is what the work cost, and changes much less. On this project's
2-core machine the same pair measured 0.83x to 4.0x wall-clock while its CPU-time ratio stayed at 1.28-1.33x.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


BOUND_TOLERANCE = 1.05
"""A measured speed-up above `BOUND_TOLERANCE x` its FLOP bound is flagged: the layers the FLOP count leaves out
(softmax, LayerNorm, activations, embeddings) are not made faster by factoring, so a real speed-up stays below it."""
SPREAD_LIMIT = 0.25
"""Per-round speed-ups whose interquartile range exceeds `SPREAD_LIMIT` of their median are flagged (a quiet 2-core
machine gives 0.05-0.10)."""


def threads_phrase(count: int) -> str:
    """`'1 thread'` / `'2 threads'`."""
    return f"{count} thread{'' if count == 1 else 's'}"


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 4:
        median = statistics.median(values)
        return min(values), median, max(values)
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def speed_flags(
    speedup: float,
    flop_bound: float | None,
    *,
    cpu_speedup: float | None = None,
    spread: float = 0.0,
    low=None,
    high=None,
) -> list[str]:
    """Reasons not to publish a measured speed-up (empty when there is none); see the module docstring."""
    flags = []
    if flop_bound is not None and speedup > BOUND_TOLERANCE * flop_bound:
        flags.append(f"the wall-clock speed-up {speedup:.2f}x is above its FLOP bound {flop_bound:.2f}x")
    if flop_bound is not None and cpu_speedup is not None and cpu_speedup > BOUND_TOLERANCE * flop_bound:
        flags.append(f"the CPU-time ratio {cpu_speedup:.2f}x is above the FLOP bound {flop_bound:.2f}x")
    if spread > SPREAD_LIMIT:
        where = f" ({low:.2f}x to {high:.2f}x)" if low is not None and high is not None else ""
        flags.append(f"the per-round speed-ups spread {100 * spread:.0f}% of their median{where}")
    if cpu_speedup is not None and speedup < 1 / BOUND_TOLERANCE and cpu_speedup > BOUND_TOLERANCE:
        flags.append(f"the wall clock says slower ({speedup:.2f}x) but CPU time says faster ({cpu_speedup:.2f}x)")
    return flags


@dataclass
class SpeedComparison:
    r"""
    The result of [`compare_speed`].

    Attributes:
        reference (`str`): The model the others are compared with.
        models (`dict[str, dict]`): Per model: `latency_ms`, `cpu_ms` (medians) and, except for the reference,
            `speedup` (wall clock), `cpu_speedup` (CPU time; `None` on a GPU), `spread` and `speedup_range` (the
            interquartile range of the per-round speed-ups, relative and absolute), `flop_bound`, `flags` and
            `published` (no flags).
        load_average (`list`): The machine's 1-minute load average before and after timing.
        threads (`int`), repeats (`int`), cpu_count (`int`), device (`str`).
    """

    reference: str
    models: dict[str, dict[str, Any]]
    load_average: list = field(default_factory=list)
    threads: int = 1
    repeats: int = 0
    cpu_count: int | None = None
    device: str = "cpu"

    def flags(self, name: str) -> list[str]:
        return list(self.models[name].get("flags", []))

    def note(self, names: Sequence[str] | None = None) -> str:
        """One paragraph for a terminal: how it was timed, and why a number is withheld, if one is."""
        load = ", ".join("?" if value is None else f"{value:.2f}" for value in self.load_average)
        text = (
            f"Timing: {self.repeats} rounds, order shuffled every round, {threads_phrase(self.threads)}, load average "
            f"{load} (before, after) on {self.cpu_count} cores."
        )
        for name in names or [n for n in self.models if n != self.reference]:
            entry = self.models[name]
            if entry.get("flags"):
                cpu = "" if entry["cpu_speedup"] is None else f", CPU-time ratio {entry['cpu_speedup']:.2f}x"
                text += (
                    f" {name}: speed-up not reported (measured {entry['speedup']:.2f}x wall-clock{cpu}): "
                    + "; ".join(entry["flags"])
                    + ". Re-run on a quieter machine"
                    + (", or with fewer threads" if self.threads > 1 else "")
                    + "."
                )
        return text

    def card_speed(self, name: str, hardware: str, setting: str) -> dict[str, Any]:
        """The `speed` of `drone_hf.create_or_update_model_card` for model `name` (withheld when flagged)."""
        entry = self.models[name]
        speed = {
            "speedup": entry["speedup"],
            "hardware": hardware,
            "setting": (
                f"{setting}, median of {self.repeats} shuffled round-robin rounds, {threads_phrase(self.threads)}"
            ),
        }
        if entry.get("flop_bound") is not None:
            speed["flop_bound"] = entry["flop_bound"]
        if entry.get("cpu_speedup") is not None:
            speed["cpu_time_speedup"] = entry["cpu_speedup"]
        if entry.get("flags"):
            speed["withheld"] = "; ".join(entry["flags"])
        return speed


def compare_speed(
    models: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    *,
    reference: str | None = None,
    flop_bounds: Mapping[str, float] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    show_progress: bool = False,
) -> SpeedComparison:
    r"""
    Times `models` round-robin on the same `inputs` ([`~profiling.measure_latency`]) and compares each with
    `reference`: wall-clock and CPU-time ratios of the medians, the spread of the per-round ratios, and the flags of
    [`speed_flags`] against each model's FLOP bound.

    Args:
        models (`Mapping[str, nn.Module]`): Name -> model.
        inputs (`Mapping[str, Tensor]`): Keyword inputs (e.g. a batch of 8 sequences of 128 tokens).
        reference (`str`, *optional*): The baseline's name (default: the first model).
        flop_bounds (`Mapping[str, float]`, *optional*): Name -> dense / model multiply-adds.
        repeats (`int`, *optional*, defaults to 20), warmup (`int`, *optional*, defaults to 3): Rounds.
        show_progress (`bool`, *optional*, defaults to `False`): A progress bar over the rounds.

    Returns:
        [`SpeedComparison`]
    """
    from .profiling import measure_latency

    record: dict = {}
    measure_latency(models, inputs, repeats=repeats, warmup=warmup, record=record, show_progress=show_progress)
    device = next(next(iter(models.values())).parameters()).device
    return compare_recorded(record, reference=reference, flop_bounds=flop_bounds, device=device.type)


def compare_recorded(
    record: Mapping[str, Any],
    *,
    reference: str | None = None,
    flop_bounds: Mapping[str, float] | None = None,
    device: str = "cpu",
) -> SpeedComparison:
    """The [`SpeedComparison`] of a `record` filled by `drone_hf.profiling.time_round_robin` (any timed calls, e.g.
    `encode()` of sentence-transformers models); see [`compare_speed`]."""
    names = list(record["wall"])
    reference = reference or names[0]
    on_cpu = device == "cpu"
    base_wall, base_cpu = record["wall"][reference], record["cpu"][reference]
    entries = {}
    for name in names:
        wall, cpu = record["wall"][name], record["cpu"][name]
        entry: dict[str, Any] = {
            "latency_ms": 1000 * statistics.median(wall),
            "cpu_ms": 1000 * statistics.median(cpu) if on_cpu else None,
        }
        if name != reference:
            ratios = [dense / this for dense, this in zip(base_wall, wall)]
            low, median, high = _quartiles(ratios)
            bound = (flop_bounds or {}).get(name)
            speedup = statistics.median(base_wall) / statistics.median(wall)
            cpu_speedup = statistics.median(base_cpu) / statistics.median(cpu) if on_cpu else None
            spread = (high - low) / median
            flags = speed_flags(speedup, bound, cpu_speedup=cpu_speedup, spread=spread, low=low, high=high)
            entry.update(
                speedup=speedup,
                cpu_speedup=cpu_speedup,
                spread=spread,
                speedup_range=[low, high],
                flop_bound=bound,
                flags=flags,
                published=not flags,
            )
        entries[name] = entry
    return SpeedComparison(
        reference=reference,
        models=entries,
        load_average=record["load_average"],
        threads=record["threads"],
        repeats=len(base_wall),
        cpu_count=os.cpu_count(),
        device=device,
    )


__all__ = [
    "BOUND_TOLERANCE",
    "SPREAD_LIMIT",
    "SpeedComparison",
    "compare_recorded",
    "compare_speed",
    "speed_flags",
    "threads_phrase",
]
