"""drone_hf: data-aware low-rank compression (DRONE) of fine-tuned encoders, as Hugging Face citizens.

`import drone_hf` imports the public API (`drone_hf/_api.py`) and registers, for every supported family, a DRONE config
(`"drone_bert"`, `"drone_roberta"`, ...) with `AutoConfig` and a DRONE model class for every head transformers' Auto
mappings have for that family. The one exception is the `drone-hf` command (`drone-hf ...`, `python -m drone_hf ...`):
it parses its arguments before torch and transformers are imported, so `drone-hf --help` answers at once, and imports
the library (registration included) before any command runs ([`_load_library`]).
"""

from __future__ import annotations

import os
import sys


__version__ = "0.1.0"


def _started_as_command() -> bool:
    """Whether this interpreter runs the `drone-hf` command: the console script, or `python -m drone_hf[.cli]`."""
    if os.path.basename(sys.argv[0]).removesuffix(".exe") == "drone-hf":
        return True
    arguments = iter(list(getattr(sys, "orig_argv", sys.argv))[1:])
    for argument in arguments:
        if argument in ("-X", "-W", "--check-hash-based-pycs"):
            next(arguments, None)  # an interpreter option and its value
        elif argument.startswith("-m"):
            return (argument[2:] or next(arguments, "")) in ("drone_hf", "drone_hf.cli")
        elif argument == "-c" or not argument.startswith("-"):
            return False  # the interpreter runs code or a script, not a module
    return False


if not _started_as_command():
    from ._api import *  # noqa: F403  (the public API; registers the DRONE model types)


def _load_library() -> None:
    """Imports the public API into this module and registers the DRONE model types with the Auto classes (what
    `import drone_hf` does, deferred in the `drone-hf` command). Idempotent."""
    import importlib

    api = importlib.import_module("._api", __name__)
    globals().update({name: getattr(api, name) for name in api.__all__})


# Trainer-side names (callback, distillation) import transformers' Trainer and datasets: loaded on first use.
_LAZY = {
    "DroneCompressionCallback": ".callbacks",
    "DroneDistillationTrainer": ".distillation",
    "compress_sentence_transformer": ".sentence_embeddings",
    "distill": ".distillation",
    "distillation_loss": ".distillation_losses",
    "export_onnx": ".onnx_export",
    "lora_target_modules": ".peft_lora",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and "_api" not in globals():  # the `drone-hf` command before it loaded the library
        _load_library()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The public API. Everything imported above stays importable (`drone_hf.split_stats`, ...); internals are documented
# in their own modules.
__all__ = [
    "__version__",
    "ActivationStats",
    "ArchitectureSpec",
    "AttentionSpec",
    "BERT_ROLES",
    "DRONE_FORMAT_VERSION",
    "DroneBertForSequenceClassification",
    "DroneBertSelfAttention",
    "DroneCompressionArguments",
    "DroneCompressionCallback",
    "DroneConfig",
    "DroneDistillationArguments",
    "DroneDistillationTrainer",
    "DroneEmbedding",
    "DroneInt8Linear",
    "DroneInt8QKLinear",
    "DroneLinear",
    "DroneModelMixin",
    "DroneQKLinear",
    "FactorizationMethod",
    "KernelCosts",
    "ProjectiveClusteringResult",
    "allocate_ranks",
    "choose_kj",
    "collect_activation_stats",
    "compress_model",
    "compress_sentence_transformer",
    "create_or_update_model_card",
    "distill",
    "distillation_loss",
    "drone_config_class",
    "drone_factorize",
    "drone_model_class",
    "export_onnx",
    "get_architecture",
    "load_activation_stats",
    "lora_target_modules",
    "projective_clustering",
    "push_compressed_to_hub",
    "quantize_model",
    "refit_sequential",
    "register_architecture",
    "register_drone_auto_classes",
    "register_method",
    "resolve_target_modules",
    "save_activation_stats",
    "svd_factorize",
    "token_frequencies",
]
