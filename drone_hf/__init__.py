"""drone_hf: data-aware low-rank compression (DRONE) of fine-tuned encoders, as Hugging Face citizens.

Importing this package registers, for every supported family (`drone_hf.architecture`), a DRONE config
(`"drone_bert"`, `"drone_roberta"`, ...) with `AutoConfig` and a DRONE model class for every head transformers' Auto
mappings have for that family (`AutoModel`, `AutoModelForSequenceClassification`, `...TokenClassification`,
`...QuestionAnswering`, `...MultipleChoice`, ...). This is the one place where registration happens.
"""

from __future__ import annotations

from .allocation import allocate_by_energy, allocate_ranks, breakeven_rank
from .architecture import ArchitectureSpec, AttentionSpec, get_architecture, register_architecture
from .arguments import DroneCompressionArguments, DroneDistillationArguments
from .attention import DroneBertSelfAttention
from .calibration import ActivationStatsCollector, collect_activation_stats
from .compress import compress_model
from .configuration_drone import DRONE_FORMAT_VERSION, DroneConfig, drone_config_class
from .deployment import quantize_model
from .embedding import DroneEmbedding, replace_embedding_with_drone, token_frequencies
from .factorize import data_weighted_error, drone_factorize, drone_spectrum, svd_factorize
from .hub import create_or_update_model_card, push_compressed_to_hub
from .int8 import DroneInt8Linear, DroneInt8QKLinear
from .kernel_costs import KernelCosts
from .layers import DroneLinear, DroneQKLinear
from .methods import FactorizationMethod, register_method
from .modeling_drone import DroneBertForSequenceClassification, DroneModelMixin, drone_model_class
from .projective import ProjectiveClusteringResult, choose_kj, projective_clustering
from .registration import register_drone_auto_classes
from .stats import ActivationStats, load_activation_stats, save_activation_stats, split_stats
from .structure import replace_attention_with_drone, replace_linear_with_drone
from .targets import BERT_ROLES, resolve_ranks, resolve_target_modules


__version__ = "0.1.0"


register_drone_auto_classes()

# Trainer-side names (callback, distillation) import transformers' Trainer and datasets: loaded on first use.
_LAZY = {
    "DroneCompressionCallback": ".callbacks",
    "DroneDistillationTrainer": ".distillation",
    "compress_sentence_transformer": ".sentence_embeddings",
    "distill": ".distillation",
    "distillation_loss": ".distillation_losses",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
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
    "get_architecture",
    "load_activation_stats",
    "projective_clustering",
    "push_compressed_to_hub",
    "quantize_model",
    "register_architecture",
    "register_method",
    "resolve_target_modules",
    "save_activation_stats",
    "svd_factorize",
    "token_frequencies",
]
