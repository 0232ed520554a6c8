"""LoRA (peft) on compressed models: which modules to target.

peft adapts `nn.Linear` layers and matches `target_modules` against module names itself, so the usual
`LoraConfig(target_modules=["query", "value"])` lands on a [`DroneLinear`] (a factored layer, not an `nn.Linear`) and
peft refuses it ("Target module DroneLinear(...) is not supported"). A factored layer is two `nn.Linear` factors,
`down` and `up`: LoRA goes on them. [`lora_target_modules`] turns the usual names into those modules (dense layers stay
themselves), and `model.add_adapter(LoraConfig(target_modules=["query", "value"]))` on a DRONE model does it for you.

A LoRA update of a factor merges exactly into that factor (`up + B A` has the shape of `up`), so `merge_and_unload()`
gives back a DRONE model with the same ranks, which saves and reloads like any other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn


FACTORS = ("down", "up")


def lora_target_modules(
    model: nn.Module, target_modules: Sequence[str] | str, *, factors: Sequence[str] = FACTORS
) -> list[str]:
    r"""
    The full names of the modules peft can adapt for `target_modules` given as peft takes them: a dense `nn.Linear`
    as itself, a factored [`DroneLinear`] as its factors (`<name>.down`, `<name>.up`).

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
        `ValueError`: if nothing matches, a factor name is unknown, or a matched module is the narrowed query/key
            projection of a DRONE attention block (a `DroneQKLinear`, which LoRA cannot adapt: target the other
            modules, or compress without DRONE attention).

    Example:

    ```py
    >>> from peft import LoraConfig, get_peft_model
    >>> config = LoraConfig(target_modules=drone_hf.lora_target_modules(small, ["query", "value"]))
    >>> tuned = get_peft_model(small, config)  # doctest: +SKIP
    >>> merged = tuned.merge_and_unload()  # the same ranks: save_pretrained / from_pretrained as usual
    ```
    """
    from .layers import DroneLinear, DroneQKLinear

    unknown = sorted(set(factors) - set(FACTORS))
    if unknown or not factors:
        raise ValueError(f"`factors` must be some of {list(FACTORS)}, got {list(factors)}.")
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        matches = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        suffixes = list(target_modules)
        matches = lambda name: any(name == s or name.endswith(f".{s}") for s in suffixes)  # noqa: E731
    names, refused = [], []
    for name, module in model.named_modules():
        if not name or not matches(name):
            continue
        if isinstance(module, DroneLinear):
            names += [f"{name}.{factor}" for factor in factors]
        elif isinstance(module, DroneQKLinear):
            refused.append(name)
        elif isinstance(module, nn.Linear):
            names.append(name)
    if refused:
        raise ValueError(
            f"{refused} are the narrowed query/key projections of DRONE attention blocks (`DroneQKLinear`): LoRA "
            "cannot adapt them. Leave them out of `target_modules` (e.g. target value, attention output and the "
            "feed-forward layers), or compress without DRONE attention."
        )
    if not names:
        raise ValueError(f"`target_modules` {target_modules!r} matches no linear or factored layer of the model.")
    return names


def translate_lora_config(model: nn.Module, config):
    """`config` (a peft config) with its `target_modules` passed through [`lora_target_modules`] when they name
    factored layers; returned unchanged otherwise (e.g. `"all-linear"`, or targets that are all dense)."""
    from .layers import DroneLinear

    targets = getattr(config, "target_modules", None)
    if not targets or targets == "all-linear":
        return config
    modules = dict(model.named_modules())
    if isinstance(targets, str):
        hits = [m for n, m in modules.items() if n and re.fullmatch(targets, n)]
    else:
        hits = [m for n, m in modules.items() if any(n == t or n.endswith(f".{t}") for t in targets)]
    if not any(isinstance(module, DroneLinear) for module in hits):
        return config
    import copy

    translated = copy.copy(config)
    translated.target_modules = set(lora_target_modules(model, targets))
    return translated


__all__ = ["FACTORS", "lora_target_modules", "translate_lora_config"]
