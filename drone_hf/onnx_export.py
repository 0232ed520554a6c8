"""Export to ONNX for ONNX Runtime, with the attention fused for dense and DRONE models alike.

ONNX Runtime's transformer optimiser (`onnxruntime.transformers.optimizer`) fuses a BERT-like attention block into one
`Attention` op only when it finds the stock pattern: three `MatMul`s reading the layer input, each followed by a bias
`Add`, then the score product, mask `Add` and softmax. It finds it in a TorchScript export (`dynamo=False`) of the
eager attention; it finds nothing in an SDPA export, nor in any `dynamo=True` export (measured on all-MiniLM-L6-v2:
6/6 fused against 0/6, torch 2.13, onnxruntime 1.32). A factored query, key or value (`DroneLinear`: two `MatMul`s) or
a narrowed query/key breaks the pattern, so a naive export of a compressed model keeps an unfused attention core
(about 20 small ops per layer), which costs most at batch 1.

[`export_onnx`] therefore routes, at export time only and on a copy of the model, every attention block whose
projections are not three equal-width dense linears through ONNX Runtime's own fused kernel for already-projected
inputs, `com.microsoft.MultiHeadAttention` (query, key, value, additive mask, `scale`): the factored projections stay
`MatMul`s of their own rank and the attention core is one op (the trace's reshapes to the per-head layout and back
around it are bypassed, [`drop_reshape_round_trips`]; a narrowed query/key enters it `heads x rank` wide, not
zero-padded back to the head size, [`drop_qk_padding`], so the scores are computed at the rank). Blocks with dense
projections keep the stock eager pattern, which the optimiser fuses into `Attention` (packed Q/K/V product) as it
does for the dense model. This works for every family whose attention goes through transformers' attention-function
registry (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, ALBERT) and for MPNet, whose attention code (with its relative
position bias, which joins the mask as `attention_bias`) is replaced on the copy for every block, dense ones too
([`_OWN_ATTENTION`]); DeBERTa-v2 and ModernBERT export unfused.

With `optimize=True` the optimiser's `SkipLayerNormalization` nodes are split again into the residual `Add`s and the
standard `LayerNormalization` ([`split_skip_layer_norms`]): ONNX Runtime's CPU kernel for the fused op is scalar code,
about four times slower than the three vectorised ops, which is 4% of a dense base-size encoder's time on the CPU.

The result is checked against PyTorch before anything is written (`max_abs_diff` in the report); a mismatch raises.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import types
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .defaults import ONNX_OPSET, ONNX_OPSETS
from .onnx_graph import (
    drop_qk_padding,
    drop_reshape_round_trips,
    split_skip_layer_norms,
)


ONNX_EXTRA = "onnx"
MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
REPORT_FILE = "onnx_export.json"
DEFAULT_OPSET, OPSETS = ONNX_OPSET, ONNX_OPSETS
FUSED_OP_TYPES = (
    "Attention",
    "MultiHeadAttention",
    "QAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)
"""Node types of ONNX Runtime's fused transformer kernels counted by [`fused_op_counts`]."""
ATOL = 1e-4
"""Largest difference between ONNX Runtime's and PyTorch's float32 outputs [`export_onnx`] accepts, times the largest
output magnitude when that is above 1 (observed: about 1e-6 on MiniLM logits)."""

_IMPLEMENTATION = "drone_hf_onnx"  # the attention implementation registered with transformers for the export
_FUSE = "_drone_onnx_heads"  # attribute set on the copy's attention blocks routed through MultiHeadAttention
_USED = "_drone_onnx_fused"  # set when the trace went through the fused route for that block
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def require_onnx():
    """`(onnx, onnxruntime)`, or a `ModuleNotFoundError` that names the `onnx` extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        missing = (error.name or "onnx").split(".")[0]
        raise ModuleNotFoundError(
            f"ONNX export needs `onnx` and `onnxruntime` (`{missing}` is not installed); they come with the "
            f"`{ONNX_EXTRA}` extra: pip install -e '.[{ONNX_EXTRA}]' in your drone_hf clone.",
            name=missing,
        ) from error
    return onnx, onnxruntime


# ------------------------------------------------------------------------------------ the fused attention op


class _MultiHeadAttention(torch.autograd.Function):
    """Softmax attention of `(batch, tokens, heads * width)` projections with an additive mask: computed in PyTorch,
    exported as `com.microsoft.MultiHeadAttention` (query/key width may differ from the value width)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, num_heads: int, scale: float):
        def split(tensor):
            return tensor.unflatten(-1, (num_heads, -1)).transpose(1, 2)

        scores = split(query) @ split(key).transpose(-1, -2) * scale
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(-1) @ split(value)).transpose(1, 2).flatten(-2)

    @staticmethod
    def symbolic(g, query, key, value, mask, num_heads: int, scale: float):
        from torch.onnx._internal.torchscript_exporter import symbolic_helper

        missing = symbolic_helper._optional_input_placeholder_tensor(g)
        if mask is None or symbolic_helper._is_none(mask):
            mask = missing
        # Inputs: query, key, value, bias, key_padding_mask, attention_bias (batch or 1, heads or 1, tokens, tokens).
        output = g.op(
            "com.microsoft::MultiHeadAttention",
            query,
            key,
            value,
            missing,
            missing,
            mask,
            num_heads_i=num_heads,
            scale_f=scale,
        )
        output.setType(value.type())  # (batch, tokens, heads * value width), as the value input
        return output


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: attend) as the additive float mask `MultiHeadAttention` takes; others as they
    are."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def _export_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function of the export: the family's eager attention (the pattern ONNX Runtime fuses into
    `Attention`) for blocks with dense projections, `MultiHeadAttention` for the blocks flagged by [`_flag_blocks`]."""
    heads = getattr(module, _FUSE, None)
    if heads is None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            from transformers.models.bert.modeling_bert import eager_attention_forward as eager
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    heads, default_scale = heads
    scale = float(scaling) if isinstance(scaling, (int, float)) else default_scale
    attention_mask = _additive(attention_mask, query.dtype)

    def merge(tensor):  # (batch, heads, tokens, width) -> (batch, tokens, heads * width)
        return tensor.transpose(1, 2).flatten(-2)

    output = _MultiHeadAttention.apply(merge(query), merge(key), merge(value), attention_mask, heads, scale)
    setattr(module, _USED, True)
    return output.unflatten(-1, (heads, -1)), None


def _register_attention() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(_IMPLEMENTATION, _export_attention)
    AttentionMaskInterface.register(_IMPLEMENTATION, eager_mask)  # additive float masks, as eager attention uses


def _mpnet_attention(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
    """`MPNetSelfAttention.forward` of the export: its relative position bias and the additive mask are one
    `attention_bias` of `MultiHeadAttention` (the stock graph, with the bias added to the scores, is one ONNX Runtime
    does not fuse, dense or not)."""
    heads, scale = getattr(self, _FUSE)
    query, key, value = self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)
    bias, mask = position_bias, _additive(attention_mask, query.dtype)
    if mask is not None:
        bias = mask if bias is None else bias + mask
    setattr(self, _USED, True)
    output = self.o(_MultiHeadAttention.apply(query, key, value, bias, heads, scale))
    return (output, None) if output_attentions else (output,)


_OWN_ATTENTION = {"mpnet": _mpnet_attention}
"""Families whose attention blocks compute the scores in their own code (not through transformers' attention-function
registry): model type -> the block `forward` the export binds on the copy. Every block of theirs goes through
`MultiHeadAttention`, dense ones too, since the optimiser fuses none of them."""


def _flag_blocks(model: nn.Module) -> list[str]:
    """Marks the attention blocks of `model` (a copy) whose query/key/value are not three dense linears of one width
    (factored, narrowed or int8), and every block of a family in [`_OWN_ATTENTION`] (whose export `forward` is bound
    on it): those go through `MultiHeadAttention`. Returns their names."""
    from .architecture import get_architecture, layer_names

    try:
        spec = get_architecture(model)
        layers = layer_names(model)
    except ValueError:
        return []
    if spec.attention is None:
        return []
    block_path = spec.attention.block
    value_path = spec.linears.get("value", "")
    if not value_path.startswith(block_path + "."):
        return []
    names = (spec.attention.query, spec.attention.key, value_path[len(block_path) + 1 :])
    modules = dict(model.named_modules())
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    own = _OWN_ATTENTION.get(spec.model_type)
    flagged = []
    for layer in layers:
        block = modules.get(f"{layer}.{block_path}")
        if block is None or heads is None:
            continue
        projections = [modules.get(f"{layer}.{block_path}.{name}") for name in names]
        dense = all(type(p) is nn.Linear for p in projections) and len({p.out_features for p in projections}) == 1
        if not dense or own is not None:
            setattr(block, _FUSE, (int(heads), float((config.hidden_size // heads) ** -0.5)))
            if own is not None:
                block.forward = types.MethodType(own, block)
            flagged.append(f"{layer}.{block_path}")
    return flagged


# ------------------------------------------------------------------------------------------------ the export


class _Exported(nn.Module):
    """Positional inputs -> the model's first output (what `torch.onnx.export` traces)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_name: str):
        super().__init__()
        self.model, self.input_names, self.output_name = model, tuple(input_names), output_name

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors)), return_dict=True)[self.output_name]


def _input_names(model: nn.Module) -> list[str]:
    import inspect

    parameters = inspect.signature(model.forward).parameters
    names = [name for name in _INPUTS if name in parameters]
    if "input_ids" not in names:
        raise ValueError(f"{type(model).__name__}.forward takes no `input_ids`: only token-id encoders export.")
    if "token_type_ids" in names and getattr(model.config, "type_vocab_size", 1) <= 1:
        names.remove("token_type_ids")  # RoBERTa-style: one segment, nothing to feed
    return names


def _example(model: nn.Module, names: Sequence[str], batch: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids with a padded tail in every other row, pad ids where masked."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    vocab = getattr(config, "vocab_size", 100)
    pad = getattr(config, "pad_token_id", None) or 0
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, tokens), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, max(1, tokens // 2) :] = 0
    inputs = {"input_ids": torch.where(mask.bool(), ids, torch.full_like(ids, pad)), "attention_mask": mask}
    if "token_type_ids" in names:
        segments = torch.zeros_like(ids)
        segments[:, tokens // 3 :] = 1
        inputs["token_type_ids"] = segments * mask
    return {name: inputs[name] for name in names}


def _check_exportable(model: nn.Module) -> None:
    from .int8 import DroneInt8Linear

    if any(isinstance(module, DroneInt8Linear) for module in model.modules()) or getattr(
        model.config, "drone_quantization", None
    ):
        raise ValueError(
            "`model` holds drone_hf int8 layers (compressed with quantize='int8'), which ONNX cannot express: export "
            "the float model and pass `quantize='int8'` to export_onnx (ONNX Runtime's dynamic int8)."
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The TorchScript exporter's deprecation and tracer warnings (the trace is checked against PyTorch instead), and
    ONNX Runtime's tool advice logged on the root logger ("consider pre-processing before quantization")."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def fused_op_counts(model) -> dict[str, int]:
    """How many nodes of each of ONNX Runtime's fused transformer kinds ([`FUSED_OP_TYPES`]) an ONNX model (a path or
    a `ModelProto`) holds, plus `nodes`, its total node count."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    counts = Counter(node.op_type for node in proto.graph.node)
    return {**{kind: counts.get(kind, 0) for kind in FUSED_OP_TYPES}, "nodes": len(proto.graph.node)}


def onnx_session(path, threads: int | None = None):
    """An `onnxruntime.InferenceSession` on the CPU with `threads` intra-op threads (default: ONNX Runtime's)."""
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_onnx(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
    quantize: str | None = None,
    fuse_attention: bool = True,
) -> dict:
    """[`export_onnx`] into an existing folder, file by file (no atomic replacement; the CLI writes into its staging
    folder with it)."""
    require_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ValueError(f"`opset` must be an int in [{OPSETS.start}, {OPSETS.stop - 1}], got {opset!r}.")
    if quantize not in (None, "int8"):
        raise ValueError(f"`quantize` must be None or 'int8', got {quantize!r}.")
    if not hasattr(model, "config"):
        raise TypeError(f"`model` must be a transformers model (with a `config`), got {type(model).__name__}.")
    _check_exportable(model)
    folder = Path(folder)
    names = _input_names(model)

    exported = copy.deepcopy(model).to("cpu", torch.float32).eval().requires_grad_(False)  # `model` stays untouched
    flagged = _flag_blocks(exported) if fuse_attention else []
    _register_attention()
    exported.set_attn_implementation(_IMPLEMENTATION if fuse_attention else "eager")
    example = _example(model, names, batch=2, tokens=16, seed=0)
    with torch.no_grad():
        first = exported(**example, return_dict=True)
    output_name = next(iter(first.keys()))
    output_axes = {0: "batch"} if first[output_name].dim() < 3 else {0: "batch", 1: "sequence"}
    path = folder / MODEL_FILE
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            _Exported(exported, names, output_name).eval(),  # the exporter restores the wrapper's mode, recursively
            tuple(example.values()),
            str(path),
            input_names=names,
            output_names=[output_name],
            dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names}, output_name: output_axes},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    unrouted = [name for name in flagged if not getattr(dict(exported.named_modules())[name], _USED, False)]
    fused_blocks = len(flagged) - len(unrouted)
    narrowed_blocks = 0
    if fused_blocks:
        drop_reshape_round_trips(path, example)
        narrowed_blocks = drop_qk_padding(path, example)
    split_norms = 0
    if optimize:
        _optimize(path, exported.config)
        split_norms = split_skip_layer_norms(path, example)
    files = [MODEL_FILE]
    if quantize == "int8":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet():  # ONNX shape inference does not type MultiHeadAttention's output: it is float32
            quantize_dynamic(
                str(path),
                str(folder / INT8_FILE),
                weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        files.append(INT8_FILE)

    exported.set_attn_implementation(getattr(model.config, "_attn_implementation", None) or "sdpa")
    for name in flagged:  # the family's own attention code again: the export is compared with the model's own forward
        vars(exported.get_submodule(name)).pop("forward", None)
    differences, scale = _compare(exported, folder, files, names, seed=1)
    if differences[MODEL_FILE] > ATOL * max(1.0, scale):
        for name in files:
            (folder / name).unlink(missing_ok=True)
        raise RuntimeError(
            f"The ONNX export of {type(model).__name__} differs from PyTorch by {differences[MODEL_FILE]:.3g} (more "
            f"than {ATOL:g} x max(1, largest output {scale:.3g})) on its outputs, so it was not saved. Please report "
            "this with the model's config."
        )
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    report = {
        "format": "onnx",
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "opset": opset,
        "inputs": names,
        "output": output_name,
        "optimized": bool(optimize),
        "quantize": quantize,
        "attention_blocks_multihead": fused_blocks,
        "attention_blocks_narrow_scores": narrowed_blocks,
        "attention_blocks_unfused_route": unrouted,
        "skip_layer_norms_split": split_norms,
        "files": {
            name: {"fused_ops": fused_op_counts(folder / name), "max_abs_diff": differences[name]} for name in files
        },
        "versions": _versions(),
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _optimize(path: Path, config) -> None:
    """ONNX Runtime's transformer optimiser (`model_type="bert"`: the encoder fusions) on `path`, in place."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    with _quiet():
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads or 0, hidden_size=hidden or 0)
        optimized.save_model_to_file(str(path))


def _compare(
    model: nn.Module, folder: Path, files: Sequence[str], names: Sequence[str], seed: int
) -> tuple[dict[str, float], float]:
    """Max absolute difference of each ONNX file's output from `model`'s, over two shapes with padded rows (one is
    not the traced shape), and the largest absolute value of `model`'s outputs."""
    differences, scale = dict.fromkeys(files, 0.0), 0.0
    sessions = {name: onnx_session(folder / name) for name in files}
    for batch, tokens in ((2, 16), (3, 23)):
        inputs = _example(model, names, batch, tokens, seed)
        with torch.no_grad():
            expected = model(**inputs, return_dict=True)[0].float().numpy()
        scale = max(scale, float(abs(expected).max()))
        feed = {name: tensor.numpy() for name, tensor in inputs.items()}
        for name, session in sessions.items():
            got = session.run(None, feed)[0]
            differences[name] = max(differences[name], float(abs(got - expected).max()))
    return differences, scale


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _owned_files(folder: Path) -> list[str]:
    """What an earlier export in `folder` holds that a new one replaces (or removes when it does not write it)."""
    from .cli_checks import TOKENIZER_FILES

    names = {MODEL_FILE, INT8_FILE, REPORT_FILE, "config.json", *TOKENIZER_FILES}
    return sorted(name for name in names if (folder / name).exists())


def export_onnx(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
    quantize: str | None = None,
    fuse_attention: bool = True,
) -> dict:
    r"""
    Exports a dense or DRONE model to ONNX for ONNX Runtime, checks it against PyTorch, and writes the folder an ONNX
    Runtime user needs: `model.onnx`, `config.json`, the tokenizer (if given), and `onnx_export.json` (the report).
    `model` is not modified.

    The graph is a TorchScript trace (`dynamo=False`, the form ONNX Runtime's optimiser fuses) with dynamic batch and
    sequence axes. Attention blocks whose projections are factored or narrowed are emitted as ONNX Runtime's fused
    `com.microsoft.MultiHeadAttention` (see the module docstring), so the exported model runs on ONNX Runtime only
    (any version since 1.17), not on other ONNX back ends; pass `fuse_attention=False` for a plain-ONNX graph.

    Args:
        model (`PreTrainedModel`): A token-id encoder (any head), dense or compressed by drone_hf, float (any dtype;
            exported in float32). Models compressed with `quantize="int8"` are refused: export the float model and
            pass `quantize="int8"` here.
        folder (`str` or `os.PathLike`): Created if missing; an earlier export there is replaced at once.
        tokenizer (*optional*): Saved beside the model (`save_pretrained`).
        opset (`int`, *optional*, defaults to 17): ONNX opset, 14 to 20.
        optimize (`bool`, *optional*, defaults to `False`): Run ONNX Runtime's transformer optimiser
            (`optimize_model(..., model_type="bert")`: fused `Attention`, `BiasGelu`, ...) and save its result as
            `model.onnx`, for ONNX Runtime's CPU provider: its `SkipLayerNormalization` nodes are split into `Add` +
            `LayerNormalization`, which run faster there (report key `skip_layer_norms_split`).
        quantize (`str`, *optional*): `"int8"` also writes `model_int8.onnx`: ONNX Runtime's dynamic int8
            (`quantize_dynamic`, int8 weights) of `model.onnx`.
        fuse_attention (`bool`, *optional*, defaults to `True`): Emit `MultiHeadAttention` for attention blocks the
            optimiser cannot fuse.

    Returns:
        `dict`: The report also written to `onnx_export.json`: inputs, output, opset, per file the fused-op counts
        ([`fused_op_counts`]) and the largest difference from PyTorch on two padded batches, and the versions.

    Raises:
        `ModuleNotFoundError`: without `onnx` / `onnxruntime` (the `onnx` extra).
        `ValueError`: for a bad `opset` or `quantize`, or an int8 drone_hf model.
        `RuntimeError`: if ONNX Runtime's float32 output differs from PyTorch's by more than [`ATOL`] (times the
            output's magnitude above 1); nothing is written then.

    Example:

    ```py
    >>> import drone_hf, onnxruntime  # doctest: +SKIP
    >>> report = drone_hf.export_onnx(small, "small-onnx", tokenizer=tokenizer, optimize=True, quantize="int8")
    >>> session = onnxruntime.InferenceSession("small-onnx/model_int8.onnx")
    >>> logits = session.run(None, dict(tokenizer(["a fine film"], return_tensors="np")))[0]
    ```
    """
    from .saving import atomic_save

    require_onnx()
    target = Path(folder).expanduser()
    with atomic_save(target, owned_files=_owned_files, name=target.name) as staging:
        return write_onnx(
            model,
            staging,
            tokenizer=tokenizer,
            opset=opset,
            optimize=optimize,
            quantize=quantize,
            fuse_attention=fuse_attention,
        )


__all__ = [
    "ATOL",
    "FUSED_OP_TYPES",
    "INT8_FILE",
    "MODEL_FILE",
    "REPORT_FILE",
    "export_onnx",
    "fused_op_counts",
    "onnx_session",
    "require_onnx",
    "write_onnx",
]
