"""The public API, imported by `import drone_hf`, and the one place where Auto-registration happens.

Importing this module registers, for every supported family (`drone_hf.architecture`), a DRONE config
(`"drone_bert"`, `"drone_roberta"`, ...) with `AutoConfig` and a DRONE model class for every head transformers' Auto
mappings have for that family (`AutoModel`, `AutoModelForSequenceClassification`, `...TokenClassification`,
`...QuestionAnswering`, `...MultipleChoice`, ...). `drone_hf/__init__.py` imports it on `import drone_hf`, except in
the `drone-hf` command, which parses its arguments first (so that `drone-hf --help` does not wait for torch) and
imports it before any command runs.
"""

from __future__ import annotations

import importlib.util

from .allocation import allocate_by_energy, allocate_ranks, breakeven_rank
from .architecture import ArchitectureSpec, AttentionSpec, get_architecture, register_architecture
from .arguments import DroneCompressionArguments, DroneDistillationArguments
from .attention import DroneBertSelfAttention
from .calibration import ActivationStatsCollector, collect_activation_stats
from .compress import compress_model
from .configuration_drone import DRONE_FORMAT_VERSION, DroneConfig, drone_config_class
from .deployment import quantize_model
from .embedding import DroneEmbedding, replace_embedding_with_drone, token_frequencies
from .factorize import data_weighted_error, drone_factorize, drone_refit, drone_spectrum, svd_factorize
from .hub import create_or_update_model_card, push_compressed_to_hub
from .int8 import DroneInt8Linear, DroneInt8QKLinear
from .kernel_costs import KernelCosts
from .layers import DroneLinear, DroneQKLinear
from .methods import FactorizationMethod, register_method
from .modeling_drone import DroneBertForSequenceClassification, DroneModelMixin, drone_model_class
from .projective import ProjectiveClusteringResult, choose_kj, projective_clustering
from .registration import register_drone_auto_classes
from .sequential import refit_sequential
from .stats import ActivationStats, load_activation_stats, save_activation_stats, split_stats
from .structure import replace_attention_with_drone, replace_linear_with_drone
from .targets import BERT_ROLES, resolve_ranks, resolve_target_modules


register_drone_auto_classes()

if importlib.util.find_spec("peft") is not None:  # never imports peft where it is not installed
    from .peft_lora import register_peft_dispatch

    register_peft_dispatch()  # LoRA by role name on factored layers (drone_hf/peft_lora.py)

# Everything imported above (what `drone_hf/__init__.py` star-imports); the documented public list is its `__all__`.
__all__ = [
    "ActivationStats",
    "ActivationStatsCollector",
    "ArchitectureSpec",
    "AttentionSpec",
    "BERT_ROLES",
    "DRONE_FORMAT_VERSION",
    "DroneBertForSequenceClassification",
    "DroneBertSelfAttention",
    "DroneCompressionArguments",
    "DroneConfig",
    "DroneDistillationArguments",
    "DroneEmbedding",
    "DroneInt8Linear",
    "DroneInt8QKLinear",
    "DroneLinear",
    "DroneModelMixin",
    "DroneQKLinear",
    "FactorizationMethod",
    "KernelCosts",
    "ProjectiveClusteringResult",
    "allocate_by_energy",
    "allocate_ranks",
    "breakeven_rank",
    "choose_kj",
    "collect_activation_stats",
    "compress_model",
    "create_or_update_model_card",
    "data_weighted_error",
    "drone_config_class",
    "drone_factorize",
    "drone_refit",
    "drone_model_class",
    "drone_spectrum",
    "get_architecture",
    "load_activation_stats",
    "projective_clustering",
    "push_compressed_to_hub",
    "quantize_model",
    "register_architecture",
    "refit_sequential",
    "register_drone_auto_classes",
    "register_method",
    "replace_attention_with_drone",
    "replace_embedding_with_drone",
    "replace_linear_with_drone",
    "resolve_ranks",
    "resolve_target_modules",
    "save_activation_stats",
    "split_stats",
    "svd_factorize",
    "token_frequencies",
]
