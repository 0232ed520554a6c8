"""Measured matrix-product costs in the deployment form (dtype, or dynamic int8) on the machine at hand.

Counting multiply-adds says a rank-`k` pair pays below `k (in + out) < in * out`. Kernels disagree: two skinny
products cost more per multiply-add than one square one, more so in bfloat16 without AMX tiles or in int8 (each half
also quantises its input). [`KernelCosts`] times the dense and factored products of each shape round-robin
([`time_round_robin`]) on random data of the deployment batch, so that an allocation for that form keeps only the
ranks that are actually faster than the dense layer, and splits an accuracy budget by measured shares of the time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .candidates import breakeven_rank
from .deployment import resolve_dtype, resolve_quantize


SecondsFn = Callable[[str, tuple[int, ...], "int | None"], float]
"""`(kind, shape, rank) -> seconds`: `kind` is `"linear"` (shape `(out, in)`) or `"qk"` (`(in, heads, head)`, one
query or key projection); `rank` is `None` for the dense product."""


class KernelCosts:
    r"""
    Seconds of the products a rank allocation chooses between, in one deployment form, measured once per shape and
    cached.

    - `"linear"`: a dense `nn.Linear(in, out)` against the factored pair `up(down(x))` at rank `k`;
    - `"qk"`: a dense query (or key) projection against the narrowed one ([`DroneQKLinear`]: `heads * k` outputs,
      zero-padded per head).

    Each call times the dense product together with the ranks not yet measured, round-robin, and rescales them to the
    first dense measurement of that shape, so that drift in machine load between calls cancels.

    Args:
        dtype (`torch.dtype` or `str`, *optional*, defaults to `torch.float32`): `float32`, `bfloat16` or `float16`.
        quantize (`str`, *optional*): `"int8"`: time the dynamic int8 modules (`DroneInt8Linear`) instead (float32
            activations, CPU).
        tokens (`int`, *optional*, defaults to 1024): Rows of the activations (batch x sequence; 8 x 128).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`).
        repeats (`int`, *optional*, defaults to 5), warmup (`int`, *optional*, defaults to 2): Timed and untimed
            rounds.
        seconds_fn (`SecondsFn`, *optional*): Replaces the measurement (a cost table measured elsewhere, or tests).

    Example:

    ```py
    >>> costs = KernelCosts(torch.bfloat16)  # doctest: +SKIP
    >>> costs.paying_ranks(1536, 384, [32, 64, 96, 128, 192, 256])  # doctest: +SKIP
    [32, 64, 96, 128]
    ```
    """

    def __init__(
        self,
        dtype: torch.dtype | str = torch.float32,
        *,
        quantize: str | None = None,
        tokens: int = 1024,
        device: str | torch.device = "cpu",
        repeats: int = 5,
        warmup: int = 2,
        seconds_fn: SecondsFn | None = None,
    ):
        self.dtype = resolve_dtype(dtype) or torch.float32
        self.quantize = resolve_quantize(quantize)
        if self.quantize is not None and self.dtype != torch.float32:
            raise ValueError(f"`quantize={self.quantize!r}` is timed with float32 activations, got `dtype={dtype}`.")
        for name, value, low in (("tokens", tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
        self.tokens, self.repeats, self.warmup = tokens, repeats, warmup
        self.device = torch.device(device)
        if self.quantize is not None and self.device.type != "cpu":
            raise ValueError(f"`quantize={self.quantize!r}` runs on the CPU only, got `device={self.device}`.")
        self.seconds_fn = seconds_fn
        self._seconds: dict[tuple, dict[int | None, float]] = {}
        self.threads = torch.get_num_threads()

    # ----- what an allocation asks -----
    def seconds(self, kind: str, shape: tuple[int, ...], ranks: Sequence[int | None]) -> dict[int | None, float]:
        """Seconds of the product `kind` of `shape` at each of `ranks` (`None`: dense), measured if not cached."""
        if kind not in ("linear", "qk"):
            raise ValueError(f"`kind` must be 'linear' or 'qk', got {kind!r}.")
        key = (kind, tuple(shape))
        cached = self._seconds.setdefault(key, {})
        missing = [rank for rank in dict.fromkeys(ranks) if rank not in cached]
        if missing:
            if self.seconds_fn is not None:
                cached.update({rank: float(self.seconds_fn(kind, key[1], rank)) for rank in missing})
            else:
                measured = self._measure(kind, key[1], [None, *[r for r in missing if r is not None]])
                scale = cached[None] / measured[None] if None in cached else 1.0
                cached.update({rank: seconds * scale for rank, seconds in measured.items() if rank not in cached})
        return {rank: cached[rank] for rank in ranks}

    def paying_ranks(self, out_features: int, in_features: int, ranks: Sequence[int]) -> list[int]:
        """The ranks of `ranks` whose factored pair is measured faster than the dense `(out, in)` linear (only ranks
        below the multiply-add break-even are timed: the others cannot pay)."""
        limit = breakeven_rank(out_features, in_features)
        ranks = sorted({k for k in ranks if 0 < k <= limit})
        times = self.seconds("linear", (out_features, in_features), [None, *ranks])
        return [k for k in ranks if times[k] < times[None]]

    def paying_qk_ranks(self, in_features: int, num_heads: int, head_size: int, ranks: Sequence[int]) -> list[int]:
        """The per-head ranks of `ranks` whose narrowed query/key projection is measured faster than the dense one."""
        ranks = sorted({k for k in ranks if 0 < k < head_size})
        times = self.seconds("qk", (in_features, num_heads, head_size), [None, *ranks])
        return [k for k in ranks if times[k] < times[None]]

    def breakeven_rank(self, out_features: int, in_features: int, multiple: int = 8) -> int:
        """Largest multiple of `multiple` (up to the multiply-add break-even) whose factored pair is measured faster
        than the dense linear, or 0 if none is. Times every multiple: for reports and tables."""
        ranks = range(multiple, breakeven_rank(out_features, in_features) + 1, multiple)
        return max(self.paying_ranks(out_features, in_features, ranks), default=0)

    def dense_linear_seconds(self, out_features: int, in_features: int) -> float:
        return self.seconds("linear", (out_features, in_features), [None])[None]

    def dense_attention_seconds(self, in_features: int, num_heads: int, head_size: int) -> float:
        """The query and key projections of one dense attention block: the time DRONE attention acts on (the score
        product runs at the full head width either way, since [`DroneQKLinear`] pads each head back)."""
        return 2 * self.seconds("qk", (in_features, num_heads, head_size), [None])[None]

    def describe(self) -> str:
        from .profiling import cpu_name

        form = "dynamic int8" if self.quantize else str(self.dtype).removeprefix("torch.")
        where = cpu_name() if self.device.type == "cpu" else str(self.device)
        source = "given seconds_fn" if self.seconds_fn is not None else f"{where}, {self.threads} threads"
        return f"seconds measured in {form} at {self.tokens} tokens ({source})"

    def summary(self) -> dict:
        """What was measured: the form, the machine and every timing (`"kind (shape)"` -> rank -> seconds)."""
        return {
            "description": self.describe(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.quantize,
            "tokens": self.tokens,
            "threads": self.threads,
            "device": str(self.device),
            "seconds": {
                f"{kind} {'x'.join(map(str, shape))}": {"dense" if k is None else str(k): v for k, v in times.items()}
                for (kind, shape), times in self._seconds.items()
            },
        }

    # ----- measuring -----
    def _measure(self, kind: str, shape: tuple[int, ...], ranks: list[int | None]) -> dict[int | None, float]:
        from .profiling import time_round_robin

        generator = torch.Generator().manual_seed(0)

        def tensor(*size):
            return torch.randn(*size, generator=generator).div_(size[-1] ** 0.5).to(self.device, self.dtype)

        with torch.inference_mode():
            inputs = tensor(self.tokens, shape[0] if kind == "qk" else shape[1])
            modules = {rank: self._module(kind, shape, rank, tensor) for rank in ranks}
            calls = {rank: (lambda m=module: m(inputs)) for rank, module in modules.items()}
            if self.device.type == "cuda":
                calls = {rank: _synchronised(call, self.device) for rank, call in calls.items()}
            return time_round_robin(calls, repeats=self.repeats, warmup=self.warmup)

    def _module(self, kind: str, shape: tuple[int, ...], rank: int | None, tensor) -> nn.Module:
        from .int8 import DroneInt8Linear, replace_linear_with_int8
        from .layers import DroneLinear, DroneQKLinear

        if kind == "qk":
            in_features, heads, head = shape
            width = heads * (head if rank is None else rank)
            if rank is None:
                module = nn.Linear(in_features, width)
            else:
                module = DroneQKLinear.from_factors(tensor(width, in_features), tensor(width), heads, head)
        else:
            out_features, in_features = shape
            if rank is None:
                module = nn.Linear(in_features, out_features)
            else:
                factors = tensor(rank, in_features), tensor(out_features, rank), tensor(out_features)
                module = DroneLinear.from_factors(*factors)
        module = module.to(self.device, self.dtype).eval()
        if self.quantize is None:
            return module
        if isinstance(module, nn.Linear):
            return DroneInt8Linear.from_linear(module)
        wrapper = nn.Module()
        wrapper.layer = module
        names = ["layer"] if isinstance(module, DroneQKLinear) else ["layer.down", "layer.up"]
        replace_linear_with_int8(wrapper, names)
        return wrapper.layer


def _synchronised(call, device):
    def run():
        call()
        torch.cuda.synchronize(device)

    return run


__all__ = ["KernelCosts", "SecondsFn"]
