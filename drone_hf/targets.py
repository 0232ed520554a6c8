"""Which modules of a BERT classifier can be factored, and how user rank options resolve to per-module ranks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

from torch import nn
from transformers import BertForSequenceClassification


# Role name -> module path inside one `BertLayer`. Pooler and classifier are never targets (output heads stay dense).
BERT_ROLES: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
# Roles whose input is the input of another role: Q, K and V all read the attention block's input.
_SHARED_INPUT = {"key": "query", "value": "query"}
_REGEX_PREFIX = "re:"


def check_bert_classifier(model: nn.Module) -> None:
    """Raises a `ValueError` unless `model` is a BERT sequence classifier ([`DroneBertForSequenceClassification`]
    included)."""
    if not isinstance(model, BertForSequenceClassification):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"`model` must be a BertForSequenceClassification (model_type 'bert' or 'drone_bert'), got "
            f"{type(model).__name__} (model_type {model_type!r})."
        )


def encoder_linear_roles(model: nn.Module) -> dict[str, str]:
    """Maps the full name of every encoder linear of a BERT classifier to its role, layer by layer.

    Example:

    ```py
    >>> list(encoder_linear_roles(model).items())[0]  # doctest: +SKIP
    ('bert.encoder.layer.0.attention.self.query', 'query')
    ```
    """
    check_bert_classifier(model)
    prefix = f"{model.base_model_prefix}.encoder.layer"
    num_layers = len(getattr(model, model.base_model_prefix).encoder.layer)
    return {f"{prefix}.{i}.{path}": role for i in range(num_layers) for role, path in BERT_ROLES.items()}


def shared_input_name(name: str, role: str) -> str:
    """Returns the module whose input `name` shares (Q/K/V share the query's), so its statistics are computed once."""
    source = _SHARED_INPUT.get(role)
    return name if source is None else name[: -len(BERT_ROLES[role])] + BERT_ROLES[source]


def _unknown(kind: str, value: str, allowed: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(value, list(allowed), n=3, cutoff=0.6)
    hint = f" Close matches: {close}." if close else ""
    hint += f" Expected a role in {list(BERT_ROLES)}, a full encoder module name or a 're:' regex."
    return ValueError(f"Unknown {kind} `{value}`.{hint}")


def _regex(pattern: str, argument: str) -> re.Pattern:
    try:
        return re.compile(pattern[len(_REGEX_PREFIX) :])
    except re.error as error:
        raise ValueError(f"Invalid regex in `{argument}`: {pattern!r} ({error}).") from error


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str | None = None) -> list[str]:
    """Resolves role names, full module names and `re:` regexes to the encoder linears they select, in model order.

    Args:
        model (`BertForSequenceClassification`): The model.
        target_modules (`Sequence[str]` or `str`, *optional*):
            Items among the roles `query, key, value, attention_output, intermediate, output`, full module names, or
            `"re:<regex>"` matched in full against module names. Defaults to every encoder linear.

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
        elif item in BERT_ROLES:
            selected |= {name for name in candidates if roles[name] == item}
        elif item in candidates:
            selected.add(item)
        else:
            raise _unknown("target module", item, list(BERT_ROLES) + candidates)
    return [name for name in candidates if name in selected]


def attention_block_names(model: nn.Module) -> list[str]:
    """Full names of the self-attention blocks (`...attention.self`) of a BERT classifier, layer by layer."""
    roles = encoder_linear_roles(model)
    return [name[: -len(".query")] for name, role in roles.items() if role == "query"]


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
    "encoder_linear_roles",
    "resolve_ranks",
    "resolve_target_modules",
    "shared_input_name",
]
