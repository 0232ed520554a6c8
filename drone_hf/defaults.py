"""Defaults shared by the API, the command line and the callback, in a module that imports nothing: the `drone-hf`
command builds its parser from them before torch and transformers are imported."""

from __future__ import annotations


DEFAULT_METHOD = "drone"
"""The one default of `compress_model`, the CLI, the callback and the allocation: the paper's closed form (see the
README's design notes for why not `"drone-bc"`)."""

BUILTIN_METHODS = ("drone", "drone-bc", "drone-act", "svd")
"""The methods `drone_hf.methods` registers on import (more can be added with `register_method`)."""

ONNX_OPSET = 17
"""The default opset of `export_onnx` / `drone-hf export --onnx` (17 and up keep `LayerNormalization` one node)."""

ONNX_OPSETS = range(14, 21)
"""Opsets the TorchScript exporter writes and ONNX Runtime's transformer fusions read."""

DEFAULT_SAFETY_MARGIN = 1.0
"""Paired standard errors of the held-out drop that an accuracy budget's joint checks add to it before comparing with
the budget (`allocate_ranks(safety_margin=)`, `DroneCompressionArguments.safety_margin`, `--safety-margin`)."""

DEPLOYMENT_DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtypes a compressed model can be deployed in (`compress_model(dtype=)`, `--dtype`), also those the accuracy
budget's screening can run in (`screening_dtype`, `--screening-dtype`)."""

DISTILL_LR_SCHEDULES = ("constant", "linear")
"""The learning-rate schedules of sentence-embedding distillation (`distill_options["lr_schedule"]` of
`compress_sentence_transformer`, `drone-hf compress-embeddings --distill-lr-schedule`): constant, or decayed linearly
to 0 at the last step."""


__all__ = [
    "BUILTIN_METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_SAFETY_MARGIN",
    "DEPLOYMENT_DTYPE_NAMES",
    "DISTILL_LR_SCHEDULES",
    "ONNX_OPSET",
    "ONNX_OPSETS",
]
