"""Edits of an exported ONNX graph for ONNX Runtime's CPU kernels, each written back only if ONNX Runtime then gives
the graph's output as before ([`replace_if_same`]). [`export_onnx`] runs the attention edits on its trace and
[`split_skip_layer_norms`] on the optimiser's result.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def drop_reshape_round_trips(path: Path, example: dict[str, torch.Tensor]) -> None:
    """Feeds each `MultiHeadAttention` the projection output itself, and its consumers its output itself.

    The trace goes through transformers' per-head layout and back: `(batch, tokens, width)` -> view to
    `(batch, tokens, heads, head width)` -> `MultiHeadAttention`'s `(batch, tokens, width)`, and the same round trip
    after it; each reshape computes its dynamic target shape in ~6 small ops (Shape, Slice, Unsqueeze, Concat), about
    40 nodes per layer that the fused op does not need. The round trips are bypassed and the dead nodes pruned; the
    result is kept only if ONNX Runtime gives the same output as the graph before on `example` (else the graph is
    left as traced).
    """
    import onnx

    proto = onnx.load(str(path))
    nodes = list(proto.graph.node)
    producer = {output: node for node in nodes for output in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reshape_pair_source(name: str) -> str | None:  # x -> Reshape -> Reshape -> name: x
        second = producer.get(name)
        first = producer.get(second.input[0]) if second is not None and second.op_type == "Reshape" else None
        if first is None or first.op_type != "Reshape":
            return None
        source = producer.get(first.input[0])
        return first.input[0] if source is not None and source.op_type in ("Add", "MatMul", "Reshape") else None

    renamed = {}
    for node in nodes:
        if node.op_type != "MultiHeadAttention":
            continue
        for index in range(3):
            source = reshape_pair_source(node.input[index])
            if source is not None:
                node.input[index] = source
        first = [user for user in consumers.get(node.output[0], []) if user.op_type == "Reshape"]
        second = [user for user in consumers.get(first[0].output[0], []) if user.op_type == "Reshape"] if first else []
        if len(first) == 1 and len(second) == 1:
            renamed[second[0].output[0]] = node.output[0]
    graph_outputs = {output.name for output in proto.graph.output}
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in renamed and name not in graph_outputs:
                node.input[index] = renamed[name]
    replace_if_same(proto, path, example, atol=1e-6)


def drop_qk_padding(path: Path, example: dict[str, torch.Tensor]) -> int:
    """Feeds each `MultiHeadAttention` its narrowed query and key as projected, `heads x rank` wide, instead of
    zero-padded back to the head size; returns how many blocks changed.

    [`DroneQKLinear`] pads each head's `rank` columns with zeros so that the family's attention code, which reshapes
    by the head size, runs unchanged; the trace keeps that as a `Pad` per projection (7% of a MiniLM budget model's
    ONNX Runtime time at batch 8 x 128). `MultiHeadAttention` takes a query/key head width other than the value's
    and its `scale` attribute keeps the original `1/sqrt(head size)`, and the padded columns only add zeros to the
    scores, so both pads are bypassed: the scores are computed at the rank. Kept only if ONNX Runtime gives the same
    output as before on `example` (to float32 summation order); a block whose query and key do not both follow the
    pattern keeps its pads.
    """
    import onnx

    proto = onnx.load(str(path))
    producer = {output: node for node in proto.graph.node for output in node.output}

    def narrow_source(name: str) -> str | None:  # narrow -> Reshape (heads, rank) -> Pad -> Reshape -> name: narrow
        flat = producer.get(name)
        pad = producer.get(flat.input[0]) if flat is not None and flat.op_type in ("Reshape", "Flatten") else None
        split = producer.get(pad.input[0]) if pad is not None and pad.op_type == "Pad" else None
        return split.input[0] if split is not None and split.op_type == "Reshape" else None

    changed = 0
    for node in proto.graph.node:
        if node.op_type != "MultiHeadAttention":
            continue
        sources = [narrow_source(node.input[index]) for index in (0, 1)]
        if all(sources):
            node.input[0], node.input[1] = sources
            changed += 1
    if changed and not replace_if_same(proto, path, example, atol=1e-5, rtol=1e-5):
        changed = 0
    return changed


def replace_if_same(proto, path: Path, example: dict[str, torch.Tensor], *, atol: float, rtol: float = 0.0) -> bool:
    """Prunes the nodes of `proto` (an edited copy of the graph at `path`) whose outputs nobody uses, then the
    initializers nobody reads, and writes it over `path` only if ONNX Runtime gives the same output on `example` as
    the graph at `path`, within the larger of `atol` and `rtol` times the largest output; returns whether it did (any
    failure to run counts as different)."""
    import onnx

    from .onnx_export import onnx_session  # (onnx_export imports this module at its top)

    graph_outputs = {output.name for output in proto.graph.output}
    while True:  # prune nodes none of whose outputs is used
        used = {name for node in proto.graph.node for name in node.input} | graph_outputs
        dead = [node for node in proto.graph.node if not any(output in used for output in node.output)]
        if not dead:
            break
        for node in dead:
            proto.graph.node.remove(node)
    unread = [tensor for tensor in proto.graph.initializer if tensor.name not in used]
    for tensor in unread:  # (ONNX Runtime would warn about each one when it loads the graph)
        proto.graph.initializer.remove(tensor)
    candidate = path.with_name(path.name + ".slim")
    onnx.save(proto, str(candidate))
    try:
        feed = {name: tensor.numpy() for name, tensor in example.items()}
        before = onnx_session(path).run(None, feed)[0]
        after = onnx_session(candidate).run(None, feed)[0]
        limit = max(atol, rtol * float(abs(before).max()))
        same = before.shape == after.shape and float(abs(before - after).max()) <= limit
    except Exception:  # noqa: BLE001  (any failure means: keep the graph as it was)
        same = False
    if same:
        os.replace(candidate, path)
    else:
        candidate.unlink()
    return same


def split_skip_layer_norms(path: Path, example: dict[str, torch.Tensor]) -> int:
    """Replaces each `com.microsoft.SkipLayerNormalization` (the optimiser's fused residual add and LayerNorm) by
    `Add` (input + skip), `Add` (+ bias, if any) and the standard `LayerNormalization`; returns how many it split.

    ONNX Runtime's CPU kernel for the fused op is plain scalar C++ (a serial sum per row and a division per element),
    while `Add` and `LayerNormalization` are vectorised: at (8, 128, 768) on 2 threads the fused op takes 2.09 ms and
    the three ops 0.53 ms (onnxruntime 1.32, AMD EPYC Zen 2), which is 4% of dense all-mpnet-base-v2's time and more
    of a compressed model's. The skip is added before the bias because ONNX Runtime's session-time fusion matches
    the other order (bias, then skip) and an unbiased `Add` of two equal shapes, and would fuse them back. A node
    whose mean or inverse-deviation output is used stays fused; the graph is kept only if ONNX Runtime gives the same
    output as before on `example` (to float32 summation order).
    """
    import onnx
    from onnx import helper

    proto = onnx.load(str(path))
    used = {name for node in proto.graph.node for name in node.input} | {output.name for output in proto.graph.output}
    nodes, split = [], 0
    for node in proto.graph.node:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != "SkipLayerNormalization" or any(name in used for name in outputs[1:3] if name):
            nodes.append(node)
            continue
        source, skip, gamma, beta, bias = list(node.input) + [""] * (5 - len(node.input))
        epsilon = next(helper.get_attribute_value(item) for item in node.attribute if item.name == "epsilon")
        total = outputs[3] or f"{outputs[0]}/residual"
        added = f"{outputs[0]}/skip_added" if bias else total
        nodes.append(helper.make_node("Add", [source, skip], [added], name=f"{node.name}/skip"))
        if bias:
            nodes.append(helper.make_node("Add", [added, bias], [total], name=f"{node.name}/bias"))
        norm_inputs = [total, gamma] + ([beta] if beta else [])
        nodes.append(
            helper.make_node(
                "LayerNormalization", norm_inputs, [outputs[0]], name=f"{node.name}/norm", axis=-1, epsilon=epsilon
            )
        )
        split += 1
    if not split:
        return 0
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return split if replace_if_same(proto, path, example, atol=1e-5, rtol=1e-5) else 0
