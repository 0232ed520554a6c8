"""The one place that rewrites a module tree: factored linears, narrowed query/key projections, the clustered word
embedding, and the swaps an allocation tries.

Every function validates everything before the first swap (all-or-nothing). Imported by the modelling file, so it is
copied for the Hub remote-code path and imports only torch, transformers and siblings.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping

import torch
from torch import nn
from transformers.utils import logging

from .architecture import get_architecture, layer_names
from .embedding import replace_embedding_with_drone
from .int8 import replace_linear_with_int8
from .layers import DroneLinear, DroneQKLinear


logger = logging.get_logger(__name__)


def _close_matches(name: str, candidates: list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f" Close matches: {matches}." if matches else ""


def resolve_module_name(model: nn.Module, name: str, modules: Mapping[str, nn.Module] | None = None) -> str:
    """Maps a module name stored in a config to this model's name for it.

    A checkpoint stores names as they were in the model that was compressed: `"bert.encoder.layer.0..."` for a
    classifier, `"encoder.layer.0..."` for a bare encoder. Loading a classifier folder into `AutoModel` (or a bare
    encoder into a head class) adds or strips the base-model prefix, as transformers does for the weights.
    """
    modules = dict(model.named_modules()) if modules is None else modules
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        candidate = name[len(prefix) + 1 :] if name.startswith(f"{prefix}.") else f"{prefix}.{name}"
        if candidate in modules:
            return candidate
    return name


def resolve_module_names(model: nn.Module, mapping: Mapping[str, object] | None) -> dict:
    """[`resolve_module_name`] applied to every key of `mapping`."""
    modules = dict(model.named_modules())
    return {resolve_module_name(model, name, modules): value for name, value in (mapping or {}).items()}


def swap_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Puts `module` at `name` and returns the module that was there."""
    old = model.get_submodule(name)
    model.set_submodule(name, module)
    return old


# ----- factored linears -----
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
        logger.debug(f"Replaced {len(replaced)} nn.Linear modules with DroneLinear.")
    return replaced


def sync_drone_ranks(model: nn.Module) -> dict[str, int]:
    """Brings `model.config.drone_ranks` in line with the factored layers' own ranks (a LoRA merge raises them in
    place: `drone_hf.lora_layers`) and returns the entries it changed, keyed as the config keys them.

    Raises:
        `ValueError`: if a module the config lists as factored is not a [`DroneLinear`] any more (the tensors would
            not match `config.json`).
    """
    ranks = dict(getattr(model.config, "drone_ranks", None) or {})
    modules = dict(model.named_modules())
    changed = {}
    for name, rank in ranks.items():
        module = modules.get(resolve_module_name(model, name, modules))
        if hasattr(module, "get_base_layer"):  # wrapped by a peft adapter layer
            module = module.get_base_layer()
        if not isinstance(module, DroneLinear):
            found = "missing" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"`config.drone_ranks` lists `{name}` (rank {rank}) but that module is {found}, not a DroneLinear; "
                "the checkpoint would not match its config."
            )
        if module.rank != rank:
            changed[name] = module.rank
    if changed:
        model.config.drone_ranks = {**ranks, **changed}
        logger.info(f"config.drone_ranks follows the factored layers: {changed}.")
    return changed


# ----- narrowed attention scores -----
def attention_blocks(model: nn.Module) -> list[str]:
    """Full names of the modules that own each layer's query/key projections (the keys of `drone_attention_ranks`)."""
    spec = get_architecture(model)
    if spec.attention is None:
        return []
    return [f"{layer}.{spec.attention.block}" for layer in layer_names(model)]


def qk_linear_names(model: nn.Module, block_name: str) -> tuple[str, str]:
    """Full names of the query and key projections of the attention block `block_name`."""
    spec = get_architecture(model).attention
    return f"{block_name}.{spec.query}", f"{block_name}.{spec.key}"


def attention_geometry(model: nn.Module, block_name: str) -> tuple[nn.Module, nn.Module, int, int]:
    """`(query, key, num_heads, head_size)` of the attention block `block_name` of `model`."""
    spec = get_architecture(model).attention
    block = model.get_submodule(block_name)
    query, key = getattr(block, spec.query), getattr(block, spec.key)
    if isinstance(query, DroneQKLinear):
        return query, key, query.num_heads, query.head_size
    num_heads = model.config.num_attention_heads
    return query, key, num_heads, query.out_features // num_heads


def _refuse_attention(model: nn.Module) -> None:
    spec = get_architecture(model)
    if spec.attention is None:
        raise ValueError(
            f"DRONE attention (`attention_rank(s)`) does not apply to {spec.model_type}: {spec.attention_unsupported}"
        )


def validate_attention_ranks(model: nn.Module, attention_ranks: Mapping[str, int]) -> None:
    """Checks that every key of `attention_ranks` names an attention block of `model` and that `0 < rank < d_h`.

    Raises:
        `ValueError`: naming the module, the rank and the allowed range, or the family's reason when its attention
            cannot be factored (rotary position embeddings, relative-position projections).
    """
    if not attention_ranks:
        return
    _refuse_attention(model)
    blocks = attention_blocks(model)
    for name, rank in attention_ranks.items():
        if name not in blocks:
            found = dict(model.named_modules()).get(name)
            found = "no such module" if found is None else f"a {type(found).__name__}, not an attention block"
            raise ValueError(
                f"`{name}` in the attention ranks is {found}; expected one of the attention blocks such as "
                f"{blocks[0]!r}.{_close_matches(name, blocks)}"
            )
        query, _, _, head = attention_geometry(model, name)
        if isinstance(query, DroneQKLinear):
            if query.rank != rank:
                raise ValueError(f"`{name}` is already factored at rank {query.rank}, cannot set rank {rank}.")
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < head:
            raise ValueError(
                f"Attention rank for `{name}` (head size {head}) must be an int in [1, {head - 1}], got {rank!r}."
            )


def narrowed_attention_block(
    model: nn.Module, name: str, rank: int, tensors: tuple[torch.Tensor, ...] | None = None
) -> nn.Module:
    """A shallow copy of the attention block `name` whose query/key are [`DroneQKLinear`] of per-head width `rank`
    (filled from `(q_weight, q_bias, k_weight, k_bias)` when given); every other child is shared with the original."""
    spec = get_architecture(model).attention
    block = model.get_submodule(name)
    query, key, num_heads, head = attention_geometry(model, name)
    new = copy.copy(block)
    new._modules, new._parameters, new._buffers = dict(block._modules), dict(block._parameters), dict(block._buffers)
    reference = query.weight
    for attribute, old, index in ((spec.query, query, 0), (spec.key, key, 2)):
        if tensors is None:
            layer = DroneQKLinear(
                old.in_features,
                num_heads,
                head,
                rank,
                bias=old.bias is not None,
                device=reference.device,
                dtype=reference.dtype,
            )
        else:
            weight, bias = tensors[index].to(reference), tensors[index + 1].to(reference)
            layer = DroneQKLinear.from_factors(weight, bias if old.bias is not None else None, num_heads, head)
        setattr(new, attribute, layer)
    return new


def replace_attention_with_drone(
    model: nn.Module,
    attention_ranks: Mapping[str, int],
    *,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> list[str]:
    """Narrows the query/key projections of each attention block named in `attention_ranks` to that per-head width,
    in place (all-or-nothing, like [`replace_linear_with_drone`]); the value projection is left as it is.

    Args:
        model (`nn.Module`): The model to modify.
        attention_ranks (`Mapping[str, int]`): Attention block name to per-head query/key rank.
        factors (`Mapping[str, tuple]`, *optional*): Block name to `(q_weight, q_bias, k_weight, k_bias)` of shapes
            `(heads * rank, hidden)` and `(heads * rank,)`.

    Returns:
        `list[str]`: The names of the changed blocks.
    """
    validate_attention_ranks(model, attention_ranks)
    factors = factors or {}
    unknown = sorted(set(factors) - set(attention_ranks))
    if unknown:
        raise ValueError(f"`factors` has attention modules without a rank: {unknown}.")
    for name, tensors in factors.items():
        query, _, num_heads, _ = attention_geometry(model, name)
        width, hidden = num_heads * attention_ranks[name], query.in_features
        expected = [(width, hidden), (width,), (width, hidden), (width,)]
        if [tuple(t.shape) for t in tensors] != expected:
            raise ValueError(
                f"Factors for `{name}` must have shapes {expected}, got {[tuple(t.shape) for t in tensors]}."
            )
    replaced = []
    for name, rank in attention_ranks.items():
        if isinstance(attention_geometry(model, name)[0], DroneQKLinear):
            continue
        block = narrowed_attention_block(model, name, rank, factors.get(name))
        block.train(model.get_submodule(name).training)
        model.set_submodule(name, block)
        replaced.append(name)
    if replaced:
        logger.debug(f"Narrowed the query/key projections of {len(replaced)} attention blocks.")
    return replaced


def apply_drone_structure(model: nn.Module, config) -> None:
    """Gives `model` the structure its DRONE config describes (shapes only; the weights come from the checkpoint or
    from `compress_model`): attention blocks first (a factored value linear then lands in the right block), then the
    factored linears, then the clustered word embedding, then the int8 modules (which may be the halves of factored
    linears). Names are resolved with [`resolve_module_name`]."""
    replace_attention_with_drone(model, resolve_module_names(model, config.drone_attention_ranks))
    replace_linear_with_drone(model, resolve_module_names(model, config.drone_ranks))
    embedding = config.drone_embedding
    if embedding:
        embedding = {**embedding, "module": resolve_module_name(model, embedding["module"])}
    replace_embedding_with_drone(model, embedding)
    quantization = getattr(config, "drone_quantization", None)
    if quantization:
        replace_linear_with_int8(model, list(resolve_module_names(model, dict.fromkeys(quantization["modules"]))))


__all__ = [
    "apply_drone_structure",
    "attention_blocks",
    "attention_geometry",
    "narrowed_attention_block",
    "qk_linear_names",
    "replace_attention_with_drone",
    "replace_linear_with_drone",
    "resolve_module_name",
    "resolve_module_names",
    "swap_module",
    "sync_drone_ranks",
    "validate_attention_ranks",
    "validate_drone_ranks",
]
