"""Per-family facts as data: where an encoder keeps its layers, linears, attention and word embedding.

One frozen [`ArchitectureSpec`] per supported `model_type`, looked up with [`get_architecture`]. The engine
(calibration, compression, allocation, held-out evaluation, costs, model card, CLI) reads these specs and never names a
family. Adding a family is one [`register_architecture`] call.

Part of the format layer: it imports only the standard library, so the `trust_remote_code` copy can ship it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


DRONE_MODEL_TYPE_PREFIX = "drone_"


@dataclass(frozen=True)
class AttentionSpec:
    r"""
    Where DRONE's per-head `Q·Kᵀ` factorisation applies inside one layer.

    Args:
        block (`str`): Path, inside one layer, of the module that owns the query and key projections (the name
            stored in `drone_attention_ranks`), e.g. `"attention.self"`.
        query (`str`): Attribute of `block` holding the query `nn.Linear`.
        key (`str`): Attribute of `block` holding the key `nn.Linear`.
    """

    block: str
    query: str
    key: str


@dataclass(frozen=True)
class ArchitectureSpec:
    r"""
    The structural facts drone_hf needs about one encoder family.

    Args:
        model_type (`str`): The family's `config.model_type` (e.g. `"roberta"`).
        layers (`str`): Path, relative to the base model, of the encoder layers; `*` matches one index, e.g.
            `"encoder.layer.*"` or ALBERT's `"encoder.albert_layer_groups.*.albert_layers.*"`.
        linears (`Mapping[str, str]`): Role name -> path of that linear inside one layer. The role names are shared
            across families (`query, key, value, attention_output, intermediate, output`; `qkv` for a fused
            projection), so `target_modules=["query", "value"]` means the same thing everywhere.
        shared_inputs (`Mapping[str, str]`): Role -> role whose input it reads (Q/K/V read the same tensor), so the
            statistics are accumulated once.
        attention (`AttentionSpec`, *optional*): Where the `Q·Kᵀ` factorisation applies; `None` when it does not.
        attention_unsupported (`str`, *optional*): Why it does not (raised as the error when it is asked for).
        word_embeddings (`str`): Path, relative to the base model, of the token `nn.Embedding`.
        layerwise (`bool`, *optional*, defaults to `True`): Whether each layer module runs once, in order, so that
            held-out evaluation may cache a layer's output and re-run only the layers after it (False for ALBERT,
            whose one layer runs `num_hidden_layers` times).
        extra_linear_inputs (`bool`, *optional*, defaults to `False`): Whether some target linears also read tensors
            that are not per-token hidden states (DeBERTa's relative-position embeddings go through its query/key
            projections); those rows are counted unmasked in the statistics.
        activation (`str`, *optional*, defaults to `"hidden_act"`): The config attribute naming the elementwise
            activation that the `intermediate` linear's output goes through (read by `method="drone-act"`); `None`
            where that output is not activated elementwise (ModernBERT's gated MLP).
    """

    model_type: str
    layers: str
    linears: Mapping[str, str]
    word_embeddings: str
    shared_inputs: Mapping[str, str] = field(default_factory=dict)
    attention: AttentionSpec | None = None
    attention_unsupported: str | None = None
    layerwise: bool = True
    extra_linear_inputs: bool = False
    activation: str | None = "hidden_act"

    def __post_init__(self):
        object.__setattr__(self, "linears", MappingProxyType(dict(self.linears)))
        object.__setattr__(self, "shared_inputs", MappingProxyType(dict(self.shared_inputs)))
        for role, source in self.shared_inputs.items():
            if role not in self.linears or source not in self.linears:
                raise ValueError(f"`shared_inputs` of {self.model_type!r} names an unknown role: {role} -> {source}.")
        if (self.attention is None) == (self.attention_unsupported is None):
            raise ValueError(f"{self.model_type!r}: give exactly one of `attention` and `attention_unsupported`.")

    @property
    def layer_regex(self) -> re.Pattern:
        """Regex matching a layer's path relative to the base model; its groups are the layer's indices."""
        return re.compile("^" + re.escape(self.layers).replace(r"\*", r"(\d+)") + "$")


_ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec, *, exist_ok: bool = False) -> ArchitectureSpec:
    """Adds `spec` to the registry (keyed by `spec.model_type`).

    Raises:
        `ValueError`: if another spec is registered under that `model_type` and `exist_ok` is False.
    """
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"`spec` must be an ArchitectureSpec, got {type(spec).__name__}.")
    existing = _ARCHITECTURES.get(spec.model_type)
    if existing is not None and existing != spec and not exist_ok:
        raise ValueError(f"An architecture is already registered for model_type {spec.model_type!r}.")
    _ARCHITECTURES[spec.model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    """The registered `model_type`s, sorted."""
    return sorted(_ARCHITECTURES)


def base_model_type(model_type: str) -> str:
    """`"drone_roberta"` -> `"roberta"`; a dense type is returned as is."""
    return model_type[len(DRONE_MODEL_TYPE_PREFIX) :] if model_type.startswith(DRONE_MODEL_TYPE_PREFIX) else model_type


def get_architecture(model_or_config) -> ArchitectureSpec:
    """The spec of a model, a config or a `model_type` string (a DRONE type maps to its family).

    Raises:
        `ValueError`: naming the type and listing the supported ones.
    """
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    spec = _ARCHITECTURES.get(base_model_type(model_type)) if isinstance(model_type, str) else None
    if spec is None:
        name = type(model_or_config).__name__ if not isinstance(model_or_config, str) else "model_type"
        raise ValueError(
            f"drone_hf does not support model_type {model_type!r} ({name}); supported: {supported_model_types()}. "
            "A new family is one `drone_hf.register_architecture(ArchitectureSpec(...))` call."
        )
    return spec


def base_model_prefix(model) -> str:
    """`"bert."` for a model with a head (`model.bert` is its encoder), `""` for a bare encoder."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and prefix in getattr(model, "_modules", {}) else ""


def layer_names(model) -> list[str]:
    """Full names of the encoder layers of `model`, in execution order (from its spec's `layers` pattern).

    Raises:
        `ValueError`: for an unsupported family, or a model in which the pattern finds no layer.
    """
    spec = get_architecture(model)
    prefix, regex = base_model_prefix(model), spec.layer_regex
    found = []
    for name, _ in model.named_modules():
        match = regex.match(name[len(prefix) :]) if name.startswith(prefix) else None
        if match:
            found.append((tuple(int(index) for index in match.groups()), name))
    if not found:
        raise ValueError(f"No encoder layer matches `{prefix}{spec.layers}` in this {spec.model_type} model.")
    return [name for _, name in sorted(found)]


_BERT_LIKE_LINEARS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_QKV_SHARED = {"key": "query", "value": "query"}


def _bert_like(model_type: str) -> ArchitectureSpec:
    return ArchitectureSpec(
        model_type=model_type,
        layers="encoder.layer.*",
        linears=_BERT_LIKE_LINEARS,
        shared_inputs=_QKV_SHARED,
        attention=AttentionSpec(block="attention.self", query="query", key="key"),
        word_embeddings="embeddings.word_embeddings",
    )


for _family in ("bert", "roberta", "xlm-roberta", "electra"):
    register_architecture(_bert_like(_family))

register_architecture(
    ArchitectureSpec(
        model_type="distilbert",
        layers="transformer.layer.*",
        linears={
            "query": "attention.q_lin",
            "key": "attention.k_lin",
            "value": "attention.v_lin",
            "attention_output": "attention.out_lin",
            "intermediate": "ffn.lin1",
            "output": "ffn.lin2",
        },
        shared_inputs=_QKV_SHARED,
        attention=AttentionSpec(block="attention", query="q_lin", key="k_lin"),
        word_embeddings="embeddings.word_embeddings",
        activation="activation",
    )
)
register_architecture(
    ArchitectureSpec(
        model_type="mpnet",
        layers="encoder.layer.*",
        linears={
            "query": "attention.attn.q",
            "key": "attention.attn.k",
            "value": "attention.attn.v",
            "attention_output": "attention.attn.o",
            "intermediate": "intermediate.dense",
            "output": "output.dense",
        },
        shared_inputs=_QKV_SHARED,
        attention=AttentionSpec(block="attention.attn", query="q", key="k"),
        word_embeddings="embeddings.word_embeddings",
    )
)
register_architecture(
    ArchitectureSpec(
        model_type="deberta-v2",
        layers="encoder.layer.*",
        linears={
            "query": "attention.self.query_proj",
            "key": "attention.self.key_proj",
            "value": "attention.self.value_proj",
            "attention_output": "attention.output.dense",
            "intermediate": "intermediate.dense",
            "output": "output.dense",
        },
        # query_proj/key_proj also project the relative-position embeddings, so their inputs differ from value's.
        attention_unsupported=(
            "DeBERTa-v2's disentangled attention reuses the query/key projections on its relative-position "
            "embeddings, so a Q·Kᵀ factorisation fitted on hidden states would change the position terms; factor "
            "its query/key as plain linears (`target_modules`) instead."
        ),
        word_embeddings="embeddings.word_embeddings",
        extra_linear_inputs=True,
    )
)
register_architecture(
    ArchitectureSpec(
        model_type="modernbert",
        layers="layers.*",
        linears={"qkv": "attn.Wqkv", "attention_output": "attn.Wo", "intermediate": "mlp.Wi", "output": "mlp.Wo"},
        attention_unsupported=(
            "ModernBERT applies rotary position embeddings between its fused Wqkv projection and the scores, so "
            "the scores are not a fixed bilinear form Q·Kᵀ of the hidden states; factor `qkv` as a linear instead."
        ),
        word_embeddings="embeddings.tok_embeddings",
        activation=None,  # mlp.Wi's output is split into an input and a gate (GLU): not elementwise
    )
)

# ALBERT: one layer module shared by all passes; its statistics pool every pass, and held-out scoring runs it whole.
register_architecture(
    ArchitectureSpec(
        model_type="albert",
        layers="encoder.albert_layer_groups.*.albert_layers.*",
        linears={
            "query": "attention.query",
            "key": "attention.key",
            "value": "attention.value",
            "attention_output": "attention.dense",
            "intermediate": "ffn",
            "output": "ffn_output",
        },
        shared_inputs=_QKV_SHARED,
        attention=AttentionSpec(block="attention", query="query", key="key"),
        word_embeddings="embeddings.word_embeddings",
        layerwise=False,
    )
)


__all__ = [
    "ArchitectureSpec",
    "AttentionSpec",
    "base_model_prefix",
    "base_model_type",
    "get_architecture",
    "layer_names",
    "register_architecture",
    "supported_model_types",
]
