"""Which modules of an encoder can be factored (from its family's [`ArchitectureSpec`]), and how user rank options
resolve to per-module ranks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from numbers import Integral

from torch import nn

from .architecture import base_model_prefix, get_architecture, layer_names
from .layers import DroneLinear, DroneQKLinear


# BERT's role name -> module path inside one `BertLayer` (kept for drone_hf 0.1 imports; every family's table is in
# `drone_hf.architecture`). Pooler and classifier are never targets (output heads stay dense).
BERT_ROLES: dict[str, str] = dict(get_architecture("bert").linears)
_REGEX_PREFIX = "re:"


def check_supported_model(model: nn.Module) -> None:
    """Raises a `ValueError` unless `model` is a transformers model of a supported family (any head, or the bare
    encoder; a DRONE-compressed one included)."""
    if not hasattr(model, "config") or not isinstance(model, nn.Module):
        raise ValueError(
            f"`model` must be a transformers encoder model (e.g. from AutoModelForSequenceClassification), got "
            f"{type(model).__name__}."
        )
    get_architecture(model)


check_bert_classifier = check_supported_model  # drone_hf 0.1 name


def encoder_linear_roles(model: nn.Module) -> dict[str, str]:
    """Maps the full name of every encoder linear to its role, layer by layer (from the family's spec).

    Example:

    ```py
    >>> list(encoder_linear_roles(model).items())[0]  # doctest: +SKIP
    ('bert.encoder.layer.0.attention.self.query', 'query')
    ```
    """
    check_supported_model(model)
    spec = get_architecture(model)
    return {f"{layer}.{path}": role for layer in layer_names(model) for role, path in spec.linears.items()}


def encoder_linear_layers(model: nn.Module) -> dict[str, int]:
    """Maps the full name of every encoder linear (and attention block) to the index of its layer."""
    spec = get_architecture(model)
    paths = [*spec.linears.values(), *([spec.attention.block] if spec.attention else [])]
    return {f"{layer}.{path}": index for index, layer in enumerate(layer_names(model)) for path in paths}


def feeds_activation(model: nn.Module, name: str):
    """The elementwise activation the output of the encoder linear `name` goes through (its family's `activation`
    config attribute, e.g. GELU after BERT's `intermediate.dense`), or `None` for a linear whose output is not
    activated (attention projections, the FFN's second linear) or is gated (ModernBERT)."""
    from transformers.activations import ACT2FN

    spec = get_architecture(model)
    if spec.activation is None or encoder_linear_roles(model).get(name) != "intermediate":
        return None
    value = getattr(getattr(model, "config", None), spec.activation, None)
    if callable(value):
        return value
    if not isinstance(value, str) or value not in ACT2FN:
        return None
    return ACT2FN[value]


def shared_input_sources(model: nn.Module) -> dict[str, str]:
    """Maps each encoder linear to the linear whose input it reads (itself, or the query for K/V), so statistics of
    a shared input are accumulated once."""
    spec = get_architecture(model)
    sources = {}
    for layer in layer_names(model):
        for role, path in spec.linears.items():
            source = spec.shared_inputs.get(role, role)
            sources[f"{layer}.{path}"] = f"{layer}.{spec.linears[source]}"
    return sources


def shared_input_name(name: str, role: str) -> str:
    """BERT-only helper of drone_hf 0.1: the module whose input `name` shares. Use [`shared_input_sources`]."""
    spec = get_architecture("bert")
    source = spec.shared_inputs.get(role)
    return name if source is None else name[: -len(spec.linears[role])] + spec.linears[source]


def word_embedding_name(model: nn.Module) -> str:
    """Full name of the word (token) embedding of `model`."""
    return base_model_prefix(model) + get_architecture(model).word_embeddings


def as_int(value):
    """`value` as a Python int if it is an integer of any kind (numpy's included, bool excluded); else unchanged,
    for the caller's type check to report."""
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) else value


def _allowed_keys(model: nn.Module, argument: str) -> str:
    """What a key of `argument` may be, with examples from `model`."""
    roles = encoder_linear_roles(model)
    names = list(roles)
    examples = [name for name in names[:8] if roles[name] in ("query", "qkv", "intermediate")][:2] or names[:2]
    role_list = list(dict.fromkeys(roles.values()))
    return (
        f"Allowed in `{argument}`: full names of encoder linears such as {', '.join(repr(n) for n in examples)} "
        f"(as printed by `model.named_modules()`), a role (roles of this {get_architecture(model).model_type} model: "
        f"{role_list}), or a 're:' regex matched against full names (e.g. 're:.*\\.intermediate\\..*')."
    )


def _not_a_target(model: nn.Module, name: str, argument: str) -> ValueError | None:
    """The specific reason why the existing module `name` is not a compression target, or None if there is none."""
    module = dict(model.named_modules()).get(name)
    if module is None:
        return None
    if isinstance(module, (DroneLinear, DroneQKLinear)):
        return ValueError(
            f"`{name}` in `{argument}` is already factored (a {type(module).__name__} of rank {module.rank}); a "
            "factored layer cannot be factored again. Name the layers of this model that are still dense, or compress "
            "the original dense model at the rank you want."
        )
    spec = get_architecture(model)
    inside = any(name == f"{layer}.{path}" for layer in layer_names(model) for path in spec.linears.values())
    if isinstance(module, nn.Linear) and inside:
        return ValueError(
            f"`{name}` in `{argument}` is an encoder linear that `target_modules` does not select; add it to "
            f"`target_modules` or drop it from `{argument}`."
        )
    if isinstance(module, nn.Linear):
        return ValueError(
            f"`{name}` in `{argument}` is not a compression target (the pooler/classifier head is kept dense): only "
            f"the linears of the encoder layers are factored. {_allowed_keys(model, argument)}"
        )
    return ValueError(
        f"`{name}` in `{argument}` is a {type(module).__name__}, not an encoder linear that can be factored. "
        f"{_allowed_keys(model, argument)}"
    )


def factored_modules(model: nn.Module) -> list[str]:
    """Full names of the already factored linears and query/key projections of `model`."""
    return [name for name, m in model.named_modules() if isinstance(m, (DroneLinear, DroneQKLinear))]


def _regex(pattern: str, argument: str) -> re.Pattern:
    try:
        return re.compile(pattern[len(_REGEX_PREFIX) :])
    except re.error as error:
        raise ValueError(f"Invalid regex in `{argument}`: {pattern!r} ({error}).") from error


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str | None = None) -> list[str]:
    """Resolves role names, full module names and `re:` regexes to the encoder linears they select, in model order.

    Args:
        model (`PreTrainedModel`): The model (any supported family and head).
        target_modules (`Sequence[str]` or `str`, *optional*):
            Items among the family's roles (`query, key, value, attention_output, intermediate, output`, or `qkv` for
            a fused projection), full module names, or `"re:<regex>"` matched in full against module names. Defaults
            to every encoder linear.

    Returns:
        `list[str]`: The selected module names that are still dense `nn.Linear` layers.

    Raises:
        `ValueError`: for an unknown role or name, or a regex that selects nothing.
    """
    roles = encoder_linear_roles(model)
    modules = dict(model.named_modules())
    candidates = [name for name in roles if isinstance(modules.get(name), nn.Linear)]
    if target_modules is None:
        return candidates
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not isinstance(target_modules, Sequence):
        raise TypeError(
            f"`target_modules` must be a list of strings (roles, full module names or 're:' patterns), got "
            f"{type(target_modules).__name__}."
        )
    if len(target_modules) == 0:
        raise ValueError(
            "`target_modules` is empty: it would select no module. Pass None for every encoder linear, or name "
            "roles, full module names or 're:' patterns."
        )
    factored = {name for name in roles if isinstance(modules.get(name), (DroneLinear, DroneQKLinear))}
    selected: set[str] = set()
    for item in target_modules:
        if not isinstance(item, str):
            raise TypeError(f"`target_modules` items must be strings, got {item!r} ({type(item).__name__}).")
        if item.startswith(_REGEX_PREFIX):
            regex = _regex(item, "target_modules")
            matched = {name for name in candidates if regex.fullmatch(name)}
            if not matched:
                done = sorted(name for name in factored if regex.fullmatch(name))
                if done:
                    raise ValueError(
                        f"`target_modules` pattern {item!r} matches only layers that are already factored (e.g. "
                        f"`{done[0]}`); a factored layer cannot be factored again."
                    )
                raise ValueError(f"`target_modules` pattern {item!r} matches no encoder linear.")
            selected |= matched
        elif item in set(roles.values()):
            matched = {name for name in candidates if roles[name] == item}
            if not matched:
                raise ValueError(
                    f"Every `{item}` linear of this model is already factored (e.g. "
                    f"`{next(n for n in roles if roles[n] == item)}`); a factored layer cannot be factored again."
                )
            selected |= matched
        elif item in candidates:
            selected.add(item)
        else:
            specific = _not_a_target(model, item, "target_modules")
            if specific is not None:
                raise specific
            allowed = list(dict.fromkeys(roles.values())) + candidates
            raise ValueError(
                f"Unknown target module `{item}`.{_close(item, allowed)} {_allowed_keys(model, 'target_modules')}"
            )
    return [name for name in candidates if name in selected]


def attention_block_names(model: nn.Module) -> list[str]:
    """Full names of the attention blocks whose `Q·Kᵀ` DRONE can factor (`...attention.self` in BERT), layer by
    layer; empty for a family where it does not apply."""
    from .structure import attention_blocks

    return attention_blocks(model)


def resolve_ranks(
    targets: Sequence[str],
    *,
    rank: int | None = None,
    ranks: Mapping[str, int] | None = None,
    argument: str = "ranks",
    model: nn.Module | None = None,
) -> dict[str, int]:
    """Resolves a default `rank` and a `ranks` mapping into one rank per target module.

    Keys of `ranks` are full module names, `re:` patterns, or (with `model`, for linears) role names such as
    `"intermediate"`, which select every target of that role. Precedence for each target: an exact name > the first
    pattern (role or `re:` regex, in the mapping's order) that matches the whole name > `rank`. A target that gets
    no rank stays dense (absent means dense). Integer ranks of any kind (numpy's included) become Python ints.

    Raises:
        `TypeError`: for `ranks` that is not a mapping, or a key that is not a string.
        `ValueError`: for an exact name that is not a target (saying why when `model` is given: already factored, a
            head kept dense, not a linear), or a pattern that matches no target.
    """
    if ranks is not None and not isinstance(ranks, Mapping):
        raise TypeError(
            f"`{argument}` must be a mapping of module name, role or 're:<regex>' -> rank, got "
            f"{type(ranks).__name__} {ranks!r}."
        )
    ranks = dict(ranks or {})
    for key in ranks:
        if not isinstance(key, str):
            raise TypeError(
                f"`{argument}` keys must be strings (full module names, roles or 're:' patterns), got {key!r} "
                f"({type(key).__name__})."
            )
    roles = encoder_linear_roles(model) if model is not None and argument == "ranks" else {}
    role_names = set(roles.values())
    patterns = []
    exact = {}
    for key, value in ranks.items():
        value = as_int(value)
        if key.startswith(_REGEX_PREFIX):
            regex = _regex(key, argument)
            patterns.append((key, regex.fullmatch, value))
        elif key in role_names and key not in targets:
            patterns.append((key, lambda name, role=key: roles.get(name) == role, value))
        else:
            exact[key] = value
    for key in exact:
        if key not in targets:
            specific = _not_a_target(model, key, argument) if model is not None and argument == "ranks" else None
            if specific is not None:
                raise specific
            if model is not None and argument == "ranks":
                raise ValueError(
                    f"Unknown module in `{argument}` `{key}`.{_close(key, list(targets))} "
                    f"{_allowed_keys(model, argument)}"
                )
            raise ValueError(
                f"Unknown module in `{argument}` `{key}`.{_close(key, list(targets))} Keys must be full names of "
                f"target modules (e.g. {list(targets)[:2]}) or 're:' regexes matched against them."
            )
    for key, matches, _ in patterns:
        if not any(matches(name) for name in targets):
            raise ValueError(f"`{argument}` pattern {key!r} matches no target module.")
    resolved = {}
    for name in targets:
        if name in exact:
            resolved[name] = exact[name]
            continue
        value = next((value for _, matches, value in patterns if matches(name)), as_int(rank))
        if value is not None:
            resolved[name] = value
    return resolved


def _close(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Close matches: {matches}." if matches else ""


__all__ = [
    "BERT_ROLES",
    "attention_block_names",
    "check_bert_classifier",
    "check_supported_model",
    "encoder_linear_layers",
    "encoder_linear_roles",
    "factored_modules",
    "shared_input_sources",
    "word_embedding_name",
    "resolve_ranks",
    "resolve_target_modules",
    "shared_input_name",
]
