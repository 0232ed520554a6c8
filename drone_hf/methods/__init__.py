"""The factorisation methods: a registry keyed by name, one file per method.

A method turns one linear's weight (and, if it is data-aware, the statistics of its inputs) into a
[`LinearDecomposition`] that yields the factors at any rank and the energy each rank discards, so that compression and
rank allocation share it; it does the same for an attention block's query/key pair. The engine never branches on a
method's name: adding a method is one file and one [`register_method`] line.
"""

from __future__ import annotations

from ..defaults import DEFAULT_METHOD  # the one default of the API, CLI and callback (read by the CLI before torch)
from .base import AttentionFactors, FactorizationMethod, LinearDecomposition, get_method, method_names, register_method
from .drone import DroneActivationMethod, DroneBiasCorrectedMethod, DroneMethod
from .svd import SvdMethod


def resolve_method(method: str, bias_correction: bool | None = None) -> str:
    """The registered method name for `method` and the drone_hf 0.1 flag `bias_correction` (`True` selects
    `"drone-bc"`; `None`/`False` leave `method` as it is).

    Raises:
        `ValueError`: for an unknown method, a non-bool flag, or `bias_correction=True` with a method other than DRONE.
    """
    get_method(method)
    if bias_correction is None or bias_correction is False:
        return method
    if bias_correction is not True:
        raise ValueError(f"`bias_correction` must be True or False, got {bias_correction!r}.")
    if method not in ("drone", "drone-bc"):
        raise ValueError(
            f"`bias_correction=True` needs `method='drone'` (together they select method 'drone-bc'), got "
            f"method={method!r}."
        )
    return "drone-bc"


register_method(DroneMethod)
register_method(DroneBiasCorrectedMethod)
register_method(DroneActivationMethod)
register_method(SvdMethod)


__all__ = [
    "DEFAULT_METHOD",
    "AttentionFactors",
    "DroneActivationMethod",
    "DroneBiasCorrectedMethod",
    "DroneMethod",
    "FactorizationMethod",
    "LinearDecomposition",
    "SvdMethod",
    "get_method",
    "method_names",
    "register_method",
    "resolve_method",
]
