"""LoRA (peft) on compressed models.

peft adapts `nn.Linear` layers and finds the layer kind of each module that `target_modules` names in its own table,
which has no entry for the kinds of a compressed model. [`register_peft_dispatch`] (run once by `import drone_hf` when
peft is installed) adds them in front of that table, so the usual `LoraConfig(target_modules=["query", "value"])`
works: a factored [`DroneLinear`] gets a [`~drone_hf.lora_layers.DroneLoraLinear`] (the LoRA of the dense layer; its
merge concatenates the factors to rank `k + r`, exactly), a narrowed query/key projection a
[`~drone_hf.lora_layers.DroneLoraQKLinear`], and an int8 module or the clustered word embedding an error that says
what to do instead. peft's own behaviour for every other module is unchanged.

[`lora_target_modules`] is the other way: LoRA on the two `nn.Linear` factors of each factored layer (`up + B A` has
the shape of `up`), so `merge_and_unload()` keeps every rank.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

from torch import nn
from transformers.utils import logging

from .embedding import DroneEmbedding
from .int8 import DroneInt8Linear, DroneInt8QKLinear
from .layers import DroneLinear, DroneQKLinear


logger = logging.get_logger(__name__)

FACTORS = ("down", "up")

# The first arguments of peft's `LoraModel._create_new_module` (checked against peft 0.21).
_DISPATCH_ARGUMENTS = ["lora_config", "adapter_name", "target"]


def lora_refusal(module: nn.Module, name: str) -> str | None:
    """Why LoRA cannot adapt `module` (named `name`), as an error message, or `None` when it can."""
    if isinstance(module, (DroneInt8Linear, DroneInt8QKLinear)):
        kind = f"a dynamic int8 module ({type(module).__name__})"
    elif isinstance(module, DroneLinear) and not all(isinstance(module.get_submodule(f), nn.Linear) for f in FACTORS):
        kind = "a factored layer with dynamic int8 factors"
    else:
        kind = None
    if kind:
        return (
            f"`{name}` is {kind}, int8 buffers that do not train: LoRA cannot adapt it. Apply LoRA to the float "
            "compressed model, `merge_and_unload()`, then quantise (`drone_hf.quantize_model`)."
        )
    if isinstance(module, DroneEmbedding):
        return (
            f"`{name}` is the projectively clustered word embedding (DroneEmbedding): LoRA cannot adapt it. Leave it "
            "out of `target_modules`, or compress without `embedding=`."
        )
    return None


def lora_target_modules(
    model: nn.Module, target_modules: Sequence[str] | str, *, factors: Sequence[str] = FACTORS
) -> list[str]:
    r"""
    LoRA on the factors: the full names of the modules to adapt so that `merge_and_unload()` keeps every rank, for
    `target_modules` given as peft takes them. A factored [`DroneLinear`] becomes its factors (`<name>.down`,
    `<name>.up`), a dense `nn.Linear` and a narrowed query/key projection (`DroneQKLinear`, merged in place) stay
    themselves.

    Passing the role names to peft directly (`LoraConfig(target_modules=["query", "value"])`) adapts each factored
    layer as a whole instead, and its merge raises the rank by `r` (see `drone_hf.lora_layers`).

    Args:
        model (`nn.Module`): A (compressed) model.
        target_modules (`Sequence[str]` or `str`): Module names or name suffixes (`["query", "value"]`, matched as
            peft matches them: the whole name or its last dotted parts), or one regular expression matched against
            the whole name (peft's string form).
        factors (`Sequence[str]`, *optional*, defaults to `("down", "up")`): The factors of a factored layer to
            adapt: both, or only `("up",)` (the output side, `out x rank`) or `("down",)`.

    Returns:
        `list[str]`: full module names, for `LoraConfig(target_modules=...)`.

    Raises:
        `ValueError`: if nothing matches, a factor name is unknown, or a matched module is an int8 module or the
            clustered word embedding (which LoRA cannot adapt).

    Example:

    ```py
    >>> from peft import LoraConfig, get_peft_model
    >>> config = LoraConfig(target_modules=drone_hf.lora_target_modules(small, ["query", "value"]))
    >>> tuned = get_peft_model(small, config)  # doctest: +SKIP
    >>> merged = tuned.merge_and_unload()  # the same ranks: save_pretrained / from_pretrained as usual
    ```
    """
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown or not factors:
        raise ValueError(f"`factors` must be some of {list(FACTORS)}, got {list(factors)}.")
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        matches = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        suffixes = list(target_modules)
        matches = lambda name: any(name == s or name.endswith(f".{s}") for s in suffixes)  # noqa: E731
    names = []
    for name, module in model.named_modules():
        if not name or not matches(name):
            continue
        refusal = lora_refusal(module, name)
        if refusal:
            raise ValueError(refusal)
        if isinstance(module, DroneLinear):
            names += [f"{name}.{factor}" for factor in factors]
        elif isinstance(module, (nn.Linear, DroneQKLinear)):
            names.append(name)
    if not names:
        raise ValueError(f"`target_modules` {target_modules!r} matches no linear or factored layer of the model.")
    return names


def dispatch_drone_lora(target: nn.Module, adapter_name: str, lora_config, **kwargs) -> nn.Module | None:
    """peft's dispatcher signature: the LoRA layer for a module kind of a compressed model, `None` for any other
    module (and for a kind the user mapped with `LoraConfig._register_custom_module`, which peft then uses).

    Raises:
        `ValueError`: for a module kind LoRA cannot adapt (int8 modules, the clustered word embedding).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    custom = getattr(lora_config, "_custom_modules", None) or {}
    if any(isinstance(base, kind) for kind in custom):
        return None
    refusal = lora_refusal(base, kwargs.get("target_name") or type(base).__name__)
    if refusal:
        raise ValueError(refusal)
    if isinstance(base, DroneLinear):
        from .lora_layers import DroneLoraLinear

        return DroneLoraLinear(target, adapter_name, config=lora_config, **kwargs)
    if isinstance(base, DroneQKLinear):
        from .lora_layers import DroneLoraQKLinear

        return DroneLoraQKLinear(target, adapter_name, config=lora_config, **kwargs)
    return None


def register_peft_dispatch() -> bool:
    """Puts [`dispatch_drone_lora`] in front of peft's LoRA dispatchers (`LoraModel._create_new_module`), so that
    `get_peft_model`, `PeftModel.from_pretrained` and transformers' `add_adapter` adapt the module
    kinds of compressed models. Idempotent; peft's behaviour for every other module is unchanged.

    Returns:
        `bool`: whether the dispatch is in place. `False` (logged) when peft is not installed or its
            `_create_new_module` is not the one this was written against (`(lora_config, adapter_name, target,
            **kwargs)`, as in peft 0.21); role names then reach peft's own error, and
            [`lora_target_modules`] still works.
    """
    try:
        from peft.tuners.lora.model import LoraModel
    except ImportError:
        return False
    current = LoraModel.__dict__.get("_create_new_module")
    function = current.__func__ if isinstance(current, staticmethod) else None
    if getattr(function, "_drone_hf_dispatch", False):
        return True
    if function is None or list(inspect.signature(function).parameters)[:3] != _DISPATCH_ARGUMENTS:
        logger.info(
            "drone_hf: this peft's LoRA dispatch is not the one drone_hf extends; LoRA by role name on factored "
            "layers is not available (use `drone_hf.lora_target_modules`)."
        )
        return False

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch_drone_lora(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else function(lora_config, adapter_name, target, **kwargs)

    _create_new_module._drone_hf_dispatch = True
    _create_new_module.__wrapped__ = function
    _create_new_module.__doc__ = function.__doc__
    LoraModel._create_new_module = staticmethod(_create_new_module)
    return True


__all__ = ["FACTORS", "dispatch_drone_lora", "lora_refusal", "lora_target_modules", "register_peft_dispatch"]
