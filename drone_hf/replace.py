"""The single helper that swaps `nn.Linear` modules for [`DroneLinear`] (all-or-nothing).

Imported by `modeling_drone_bert.py`, so it is copied for the Hub remote-code path and imports only siblings.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.utils import logging

from .attention import DroneBertSelfAttention
from .layers import DroneLinear


logger = logging.get_logger(__name__)


def _close_matches(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Close matches: {matches}." if matches else ""


def validate_drone_ranks(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Checks that every key of `ranks` names an `nn.Linear` (or an existing [`DroneLinear`] of the same rank) of
    `model` and that `0 < rank < min(in, out)`.

    Raises:
        `ValueError`: naming the module, the rank and the allowed range.
    """
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, DroneLinear))]
    for name, rank in ranks.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"Unknown module `{name}` in the ranks.{_close_matches(name, linear_names)}")
        if isinstance(module, DroneLinear):
            if module.rank != rank:
                raise ValueError(f"Module `{name}` is already factored at rank {module.rank}, cannot set rank {rank}.")
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"Module `{name}` is a {type(module).__name__}; only nn.Linear can be factored."
                f"{_close_matches(name, linear_names)}"
            )
        limit = min(module.in_features, module.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < limit:
            raise ValueError(
                f"Rank for `{name}` ({module.out_features}x{module.in_features}) must be an int in [1, {limit - 1}], "
                f"got {rank!r}."
            )


def replace_linear_with_drone(
    model: nn.Module,
    ranks: Mapping[str, int],
    *,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[str]:
    """Replaces each `nn.Linear` named in `ranks` by a [`DroneLinear`] of that rank, in place.

    Everything is validated before the first swap, so a bad entry leaves the model untouched.

    Args:
        model (`nn.Module`): The model to modify.
        ranks (`Mapping[str, int]`): Full module name to rank.
        factors (`Mapping[str, tuple[Tensor, Tensor]]`, *optional*):
            Full module name to `(down, up)` weights. Without it the new layers are allocated with the right shapes
            (on the original layer's device and dtype) and left for `from_pretrained` or `_init_weights` to fill.

    Returns:
        `list[str]`: The names of the replaced modules, in the order given.

    Raises:
        `ValueError`: for an unknown module, a module that is not `nn.Linear`, or a rank outside `[1, min(in, out))`.
    """
    validate_drone_ranks(model, ranks)
    factors = factors or {}
    unknown = sorted(set(factors) - set(ranks))
    if unknown:
        raise ValueError(f"`factors` has modules without a rank: {unknown}.")
    for name, (down, up) in factors.items():
        old, rank = model.get_submodule(name), ranks[name]
        if down.shape != (rank, old.in_features) or up.shape != (old.out_features, rank):
            raise ValueError(
                f"Factors for `{name}` must be ({rank}, {old.in_features}) and ({old.out_features}, {rank}), "
                f"got {tuple(down.shape)} and {tuple(up.shape)}."
            )
    replaced = []
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        if isinstance(old, DroneLinear):
            continue
        if name in factors:
            down, up = factors[name]
            bias = None if old.bias is None else old.bias.detach()
            new = DroneLinear.from_factors(down.to(old.weight), up.to(old.weight), bias)
        else:
            new = DroneLinear(
                old.in_features,
                old.out_features,
                rank,
                bias=old.bias is not None,
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
        model.set_submodule(name, new)
        replaced.append(name)
    if replaced:
        logger.info(f"Replaced {len(replaced)} nn.Linear modules with DroneLinear.")
    return replaced


def validate_attention_ranks(model: nn.Module, attention_ranks: Mapping[str, int]) -> None:
    """Checks that every key of `attention_ranks` names a BERT self-attention block and `0 < rank < d_h`.

    Raises:
        `ValueError`: naming the module, the rank and the allowed range.
    """
    modules = dict(model.named_modules())
    attention_names = [n for n, m in modules.items() if isinstance(m, BertSelfAttention)]
    for name, rank in attention_ranks.items():
        module = modules.get(name)
        if not isinstance(module, BertSelfAttention):
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"`{name}` in the attention ranks is {found}; expected a BertSelfAttention such as "
                f"'bert.encoder.layer.0.attention.self'.{_close_matches(name, attention_names)}"
            )
        head = module.attention_head_size
        if isinstance(module, DroneBertSelfAttention):
            if module.qk_rank != rank:
                raise ValueError(f"`{name}` is already factored at rank {module.qk_rank}, cannot set rank {rank}.")
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < head:
            raise ValueError(
                f"Attention rank for `{name}` (head size {head}) must be an int in [1, {head - 1}], got {rank!r}."
            )


def replace_attention_with_drone(
    model: nn.Module,
    attention_ranks: Mapping[str, int],
    *,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> list[str]:
    """Replaces each BERT self-attention block named in `attention_ranks` by a [`DroneBertSelfAttention`] whose
    per-head query/key width is that rank, in place (all-or-nothing, like [`replace_linear_with_drone`]).

    Args:
        model (`nn.Module`): The model to modify.
        attention_ranks (`Mapping[str, int]`): Self-attention module name to per-head query/key rank.
        factors (`Mapping[str, tuple]`, *optional*): Module name to `(q_weight, q_bias, k_weight, k_bias)` of shapes
            `(heads * rank, hidden)` and `(heads * rank,)`. The value projection module is moved over unchanged.

    Returns:
        `list[str]`: The names of the replaced modules.
    """
    validate_attention_ranks(model, attention_ranks)
    factors = factors or {}
    unknown = sorted(set(factors) - set(attention_ranks))
    if unknown:
        raise ValueError(f"`factors` has attention modules without a rank: {unknown}.")
    for name, tensors in factors.items():
        old, rank = model.get_submodule(name), attention_ranks[name]
        width, hidden = old.num_attention_heads * rank, old.query.in_features
        expected = [(width, hidden), (width,), (width, hidden), (width,)]
        if [tuple(t.shape) for t in tensors] != expected:
            raise ValueError(
                f"Factors for `{name}` must have shapes {expected}, got {[tuple(t.shape) for t in tensors]}."
            )
    replaced = []
    for name, rank in attention_ranks.items():
        old = model.get_submodule(name)
        if isinstance(old, DroneBertSelfAttention):
            continue
        reference = old.query.weight
        new = DroneBertSelfAttention(old.config, rank, is_causal=old.is_causal, layer_idx=old.layer_idx)
        new.to(device=reference.device, dtype=reference.dtype)
        new.value = old.value  # unchanged (dense or already a DroneLinear): move the module itself
        if name in factors:
            q_weight, q_bias, k_weight, k_bias = (t.to(reference) for t in factors[name])
            with torch.no_grad():
                new.query.weight.copy_(q_weight)
                new.query.bias.copy_(q_bias)
                new.key.weight.copy_(k_weight)
                new.key.bias.copy_(k_bias)
        new.train(old.training)
        model.set_submodule(name, new)
        replaced.append(name)
    if replaced:
        logger.info(f"Replaced {len(replaced)} BertSelfAttention modules with DroneBertSelfAttention.")
    return replaced


__all__ = [
    "replace_attention_with_drone",
    "replace_linear_with_drone",
    "validate_attention_ranks",
    "validate_drone_ranks",
]
