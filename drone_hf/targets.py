"""Which modules of an encoder can be factored (from its family's [`ArchitectureSpec`]), and how user rank options
resolve to per-module ranks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

from torch import nn

from .architecture import base_model_prefix, get_architecture, layer_names


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


def _unknown(kind: str, value: str, allowed: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(value, list(allowed), n=3, cutoff=0.6)
    hint = f" Close matches: {close}." if close else ""
    hint += " Expected a role, a full encoder module name or a 're:' regex."
    return ValueError(f"Unknown {kind} `{value}`.{hint}")


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
    selected: set[str] = set()
    for item in target_modules:
        if not isinstance(item, str):
            raise TypeError(f"`target_modules` items must be strings, got {item!r} ({type(item).__name__}).")
        if item.startswith(_REGEX_PREFIX):
            regex = _regex(item, "target_modules")
            matched = {name for name in candidates if regex.fullmatch(name)}
            if not matched:
                raise ValueError(f"`target_modules` pattern {item!r} matches no encoder linear.")
            selected |= matched
        elif item in set(roles.values()):
            selected |= {name for name in candidates if roles[name] == item}
        elif item in candidates:
            selected.add(item)
        else:
            allowed = list(dict.fromkeys(roles.values()))
            error = _unknown("target module", item, allowed + candidates)
            raise ValueError(f"{error} The roles of this {get_architecture(model).model_type} model: {allowed}.")
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
) -> dict[str, int]:
    """Resolves a default `rank` and a `ranks` mapping into one rank per target module.

    Precedence for each target: an exact name in `ranks` > the first `re:` pattern of `ranks` (in order) that matches
    the whole name > `rank`. A target that gets no rank stays dense (absent means dense).

    Raises:
        `ValueError`: for an exact name that is not a target, or a pattern that matches no target.
    """
    ranks = dict(ranks or {})
    exact = {key: value for key, value in ranks.items() if not key.startswith(_REGEX_PREFIX)}
    patterns = [(key, _regex(key, argument), value) for key, value in ranks.items() if key.startswith(_REGEX_PREFIX)]
    for key in exact:
        if key not in targets:
            raise _unknown(f"module in `{argument}`", key, list(targets))
    for key, regex, _ in patterns:
        if not any(regex.fullmatch(name) for name in targets):
            raise ValueError(f"`{argument}` pattern {key!r} matches no target module.")
    resolved = {}
    for name in targets:
        if name in exact:
            resolved[name] = exact[name]
            continue
        value = next((value for _, regex, value in patterns if regex.fullmatch(name)), rank)
        if value is not None:
            resolved[name] = value
    return resolved


__all__ = [
    "BERT_ROLES",
    "attention_block_names",
    "check_bert_classifier",
    "check_supported_model",
    "encoder_linear_layers",
    "encoder_linear_roles",
    "shared_input_sources",
    "word_embedding_name",
    "resolve_ranks",
    "resolve_target_modules",
    "shared_input_name",
]
