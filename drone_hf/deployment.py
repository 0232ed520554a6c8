"""The deployment form of a compressed model: its dtype (`compress_model(..., dtype=)`) and dynamic int8 quantisation
(`compress_model(..., quantize="int8")`, [`quantize_model`]).

Statistics, factors and rank choices are computed in float64/float32 as always; the finished model is cast once to the
deployment dtype, or its encoder linears are quantised once to int8. Both save with `save_pretrained` as ordinary
safetensors and reload with `from_pretrained` after `import drone_hf` in the same form: transformers 5 loads a
checkpoint in the dtype its `config.json` names (`dtype="auto"` is the default of `from_pretrained`), and the int8
modules are rebuilt from `config.drone_quantization`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.utils import logging

from .candidates import restore_modules
from .defaults import DEPLOYMENT_DTYPE_NAMES
from .int8 import INT8_METHOD, DroneInt8Linear, DroneInt8QKLinear, replace_linear_with_int8
from .layers import DroneQKLinear


logger = logging.get_logger(__name__)


DEPLOYMENT_DTYPES = {name: getattr(torch, name) for name in DEPLOYMENT_DTYPE_NAMES}
"""The dtypes a compressed model can be deployed in (name -> torch dtype)."""

QUANTIZE_METHODS = {"int8": INT8_METHOD}
"""`quantize=` value -> `config.drone_quantization["method"]`."""


def resolve_dtype(dtype: torch.dtype | str | None, argument: str = "dtype") -> torch.dtype | None:
    """`None`, a torch dtype of [`DEPLOYMENT_DTYPES`] or its name (`"bfloat16"`, `"torch.bfloat16"`) -> the dtype.

    Raises:
        `ValueError`: naming `argument`, the value and the allowed dtypes.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in DEPLOYMENT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DEPLOYMENT_DTYPES:
        return DEPLOYMENT_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"`{argument}` must be one of {list(DEPLOYMENT_DTYPES)} (a torch.dtype or its name) or None (keep the "
        f"model's), got {dtype!r}."
    )


def resolve_quantize(quantize: str | None) -> str | None:
    """`None` or `"int8"` (case-insensitive) -> the same, lower-cased.

    Raises:
        `ValueError`: naming `quantize`, the value and the allowed values.
    """
    if quantize is None:
        return None
    if isinstance(quantize, str) and quantize.lower() in QUANTIZE_METHODS:
        return quantize.lower()
    raise ValueError(
        f"`quantize` must be one of {list(QUANTIZE_METHODS)} (dynamic int8 of the encoder linears) or None, got "
        f"{quantize!r}."
    )


def resolve_deployment(dtype, quantize) -> tuple[torch.dtype | None, str | None]:
    """Resolves `dtype=`/`quantize=` ([`resolve_dtype`], [`resolve_quantize`]) and checks that they combine, without a
    model: the checks [`compress_model`], [`DroneCompressionArguments`] and [`DroneCompressionCallback`] share.

    Raises:
        `ValueError`: for a value outside the allowed ones, or `quantize` with a half dtype (int8 models keep their
            float parts in float32, the kernels' activation dtype).
    """
    dtype, quantize = resolve_dtype(dtype), resolve_quantize(quantize)
    if quantize is not None and dtype not in (None, torch.float32):
        raise ValueError(
            f"`quantize={quantize!r}` cannot be combined with `dtype={dtype}`: an int8 model keeps its other "
            "parts (embeddings, LayerNorm, attention products) in float32, the int8 kernel's activation dtype. "
            "Pass `dtype=None` or `torch.float32`."
        )
    return dtype, quantize


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` has int8 modules."""
    return any(isinstance(m, (DroneInt8Linear, DroneInt8QKLinear)) for m in model.modules())


def cpu_has_half_units(dtype: torch.dtype) -> bool | None:
    """Whether this CPU multiplies `dtype` (bfloat16 / float16) natively, as oneDNN reports it (AVX-512 BF16, AMX,
    AVX-512 FP16): `False` means emulated (an AVX2-only CPU), `None` that this torch build cannot say."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, probe)()) if probe is not None else None
    except (AttributeError, RuntimeError):
        return None


def check_deployment(model: nn.Module, dtype, quantize) -> tuple[torch.dtype | None, str | None]:
    """Validates `dtype=`/`quantize=` of [`compress_model`] against `model` before any expensive work.

    Returns:
        `(dtype, quantize)`, resolved ([`resolve_dtype`], [`resolve_quantize`]).

    Raises:
        `ValueError`: for a value outside the allowed ones, an int8 model as input (compress the float model, then
            quantise), `quantize` with a model that is not on the CPU (the int8 kernels are CPU kernels), or `quantize`
            with a half dtype (int8 models keep their float parts in float32, the kernels' activation dtype).
    """
    dtype, quantize = resolve_deployment(dtype, quantize)
    parameter = next(model.parameters(), None)
    on_cpu = parameter is None or parameter.device.type == "cpu"
    if dtype in (torch.bfloat16, torch.float16) and on_cpu and cpu_has_half_units(dtype) is False:
        logger.warning(
            f"`dtype={str(dtype).removeprefix('torch.')}` on a CPU without {dtype} matrix units (oneDNN reports none, "
            f"`torch.backends.cpu.get_cpu_capability()` is {torch.backends.cpu.get_cpu_capability()!r}): it runs "
            "emulated, several times slower than float32 here (measured 8.5x on an AVX2-only EPYC), and so do a "
            "budget's kernel timings and joint checks. Deploy where the CPU has them (AVX-512 BF16 / AMX), or use "
            "float32 or `quantize='int8'` on this machine."
        )
    if is_quantized(model):
        raise ValueError(
            "`model` already has int8 modules (`drone_quantization`): int8 weights cannot be factored or re-cast. "
            "Compress the float model and pass `quantize='int8'` to `compress_model`."
        )
    if quantize is not None:
        device = parameter.device if parameter is not None else torch.device("cpu")
        if device.type != "cpu":
            raise ValueError(
                f"`quantize={quantize!r}` needs a model on the CPU: its dynamic int8 product is the fbgemm/onednn CPU "
                f"kernel (`quantized::linear_dynamic`), and the model is on {device}. Move it with `model.to('cpu')`, "
                "or deploy on the GPU in `dtype=torch.bfloat16` instead."
            )
        if dtype is None and parameter is not None and parameter.dtype != torch.float32:
            raise ValueError(
                f"`quantize={quantize!r}` needs a float32 model (the int8 kernel's activation dtype), got one in "
                f"{parameter.dtype}; pass `dtype=torch.float32` to cast the result, or load the model in float32."
            )
    return dtype, quantize


def int8_module_names(model: nn.Module) -> list[str]:
    """The modules [`quantize_model`] quantises by default: every `nn.Linear` inside the encoder layers (dense ones and
    the `down`/`up` halves of factored ones) and every narrowed query/key projection. Pooler and task head stay in
    float (a tiny share of the time; the logits are most sensitive to them)."""
    from .architecture import layer_names

    names = []
    for layer in layer_names(model):
        for name, module in model.get_submodule(layer).named_modules():
            if isinstance(module, (nn.Linear, DroneQKLinear)) and not isinstance(module, DroneInt8QKLinear):
                names.append(f"{layer}.{name}")
    return names


def swap_in_int8(model: nn.Module) -> Callable[[], None]:
    """Puts dynamic int8 modules in place of `model`'s [`int8_module_names`] (as [`quantize_model`] would, without
    copying or touching its config) and returns a function that puts the float modules back: a budget's joint checks
    score each candidate as it will ship in int8 (as [`swap_in_dtype`] does for a dtype)."""
    names = int8_module_names(model)
    originals = {name: model.get_submodule(name) for name in names}
    replace_linear_with_int8(model, names)
    return lambda: restore_modules(model, originals)


def swap_in_dtype(model: nn.Module, dtype: torch.dtype | str) -> Callable[[], None]:
    """Casts every floating parameter and buffer of `model` to `dtype` in place (as `model.to(dtype)`, which is how
    `compress_model(dtype=)` ships it) and returns a function that puts the original tensors back, bit for bit: a
    budget's joint checks score each candidate in its deployment dtype without losing the float32 working copy."""
    dtype = resolve_dtype(dtype)
    saved = []
    for tensor in [*model.parameters(), *model.buffers()]:  # shared (tied) tensors appear once
        if tensor.is_floating_point() and tensor.dtype != dtype:
            saved.append((tensor, tensor.data))
            tensor.data = tensor.data.to(dtype)

    def restore() -> None:
        for tensor, data in saved:
            tensor.data = data

    return restore


def _to_drone_model(model: nn.Module) -> nn.Module:
    """A new DRONE model of `model`'s family and head with the same weights (a copy if it already is one)."""
    from .modeling_drone import DroneModelMixin

    if isinstance(model, DroneModelMixin):
        return copy.deepcopy(model)
    from .compress import _build_compressed

    return _build_compressed(model, {}, {}, {}, {}, "none", None)


def quantize_model(model: nn.Module, quantize: str = "int8", *, modules: Sequence[str] | None = None) -> nn.Module:
    r"""
    Returns a **new** model whose encoder linears are dynamic int8 modules (see `drone_hf.int8`); `model` is not
    modified. Works on a DRONE model (its factored `down`/`up` halves are quantised too) and on a dense model of a
    supported family (which becomes the DRONE class of its family with no factored layer, so that it saves and
    reloads the same way).

    Args:
        model (`PreTrainedModel`): A float model on the CPU.
        quantize (`str`, *optional*, defaults to `"int8"`): The only method: per-output-channel symmetric int8
            weights (as `quantize_dynamic` with `per_channel_dynamic_qconfig`), activations quantised per call.
        modules (`Sequence[str]`, *optional*): Full names of the `nn.Linear` / narrowed query/key modules to
            quantise; defaults to [`int8_module_names`].

    Returns:
        The int8 model; `config.drone_quantization` lists the quantised modules and `config.drone_format_version` is 2.

    Example:

    ```py
    >>> small = drone_hf.compress_model(model, stats, rank=96)  # doctest: +SKIP
    >>> small_int8 = drone_hf.quantize_model(small)  # doctest: +SKIP
    >>> small_int8.save_pretrained("minilm-sst2-drone-int8")  # doctest: +SKIP
    ```
    """
    from .targets import check_supported_model

    check_supported_model(model)
    _, quantize = check_deployment(model, None, quantize)
    if quantize is None:
        raise ValueError(f"`quantize` must be one of {list(QUANTIZE_METHODS)}, got None.")
    new = _to_drone_model(model)
    _quantize_in_place(new, quantize, list(modules) if modules is not None else None)
    return new


def _quantize_in_place(model: nn.Module, quantize: str, modules: list[str] | None = None) -> None:
    names = int8_module_names(model) if modules is None else modules
    if not names:
        raise ValueError("`modules` is empty: nothing to quantise.")
    replace_linear_with_int8(model, names)
    model.config.drone_quantization = {"method": QUANTIZE_METHODS[quantize], "modules": list(names)}
    model.config.drone_format_version = max(2, model.config.drone_format_version)
    model.config.dtype = torch.float32


def deployed_copy(model: nn.Module, dtype: torch.dtype | str | None = None, quantize: str | None = None) -> nn.Module:
    """A **new** model in the deployment form (`model` is not modified): [`quantize_model`] for `quantize`, a cast
    deep copy for `dtype`, a deep copy otherwise. For dense references timed or scored in the same form as a
    compressed model."""
    dtype, quantize = check_deployment(model, dtype, quantize)
    new = copy.deepcopy(model)
    if dtype is not None:
        new.to(dtype)
        new.config.dtype = dtype
    return quantize_model(new, quantize) if quantize is not None else new


def describe_deployment(dtype: torch.dtype | str | None, quantize: str | None) -> str:
    """`"float32"`, `"bfloat16"`, `"float16"` or `"int8 dynamic (float32 activations)"`: the form, in words."""
    dtype, quantize = resolve_deployment(dtype, quantize)
    if quantize is not None:
        return f"{quantize} dynamic (float32 activations)"
    return str(dtype or torch.float32).removeprefix("torch.")


def prepare_for_deployment(model: nn.Module, dtype: torch.dtype | str | None, quantize: str | None) -> nn.Module:
    """Casts a freshly compressed model to `dtype` and/or quantises it (in place; both already checked by
    [`check_deployment`]; names are accepted, as there); returns it."""
    dtype, quantize = resolve_deployment(dtype, quantize)
    if dtype is not None:
        model.to(dtype)
        model.config.dtype = dtype
    if quantize is not None:
        _quantize_in_place(model, quantize)
    return model


__all__ = [
    "DEPLOYMENT_DTYPES",
    "QUANTIZE_METHODS",
    "check_deployment",
    "cpu_has_half_units",
    "deployed_copy",
    "describe_deployment",
    "int8_module_names",
    "is_quantized",
    "prepare_for_deployment",
    "quantize_model",
    "resolve_deployment",
    "resolve_dtype",
    "resolve_quantize",
    "swap_in_dtype",
    "swap_in_int8",
]
