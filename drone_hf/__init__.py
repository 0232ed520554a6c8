"""drone_hf: data-aware low-rank compression (DRONE) of fine-tuned BERT classifiers, as Hugging Face citizens.

Importing this package registers `"drone_bert"` with `AutoConfig` and `AutoModelForSequenceClassification`; it is the
one place where registration happens.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForSequenceClassification

from .allocation import allocate_by_energy, allocate_ranks, breakeven_rank
from .arguments import DroneCompressionArguments, DroneDistillationArguments
from .attention import DroneBertSelfAttention
from .calibration import (
    ActivationStatsCollector,
    collect_activation_stats,
    load_activation_stats,
    save_activation_stats,
    split_stats,
)
from .callbacks import DroneCompressionCallback
from .compress import compress_model
from .configuration_drone import DRONE_FORMAT_VERSION, DroneConfig
from .distillation import DroneDistillationTrainer, distill, distillation_loss
from .embedding import DroneEmbedding, replace_embedding_with_drone, token_frequencies
from .factorize import data_weighted_error, drone_factorize, drone_spectrum, svd_factorize
from .hub import create_or_update_model_card, push_compressed_to_hub
from .layers import DroneLinear
from .modeling_drone_bert import DroneBertForSequenceClassification
from .projective import ProjectiveClusteringResult, choose_kj, projective_clustering
from .replace import replace_attention_with_drone, replace_linear_with_drone
from .targets import BERT_ROLES, resolve_ranks, resolve_target_modules


__version__ = "0.1.0"


def _register() -> None:
    # exist_ok=True keeps importlib.reload and re-run notebook cells working; a *different* class already registered
    # under our model type is a real collision and must raise.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    existing = CONFIG_MAPPING._extra_content.get(DroneConfig.model_type)
    if existing is not None and existing.__qualname__ != DroneConfig.__qualname__:
        raise ValueError(f"Model type {DroneConfig.model_type!r} is already registered to {existing!r}.")
    AutoConfig.register(DroneConfig.model_type, DroneConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(DroneConfig, DroneBertForSequenceClassification, exist_ok=True)


_register()

__all__ = [
    "BERT_ROLES",
    "DRONE_FORMAT_VERSION",
    "ActivationStatsCollector",
    "DroneBertForSequenceClassification",
    "DroneBertSelfAttention",
    "DroneCompressionArguments",
    "DroneCompressionCallback",
    "DroneConfig",
    "DroneDistillationArguments",
    "DroneDistillationTrainer",
    "DroneEmbedding",
    "ProjectiveClusteringResult",
    "choose_kj",
    "projective_clustering",
    "DroneLinear",
    "__version__",
    "allocate_by_energy",
    "allocate_ranks",
    "breakeven_rank",
    "collect_activation_stats",
    "compress_model",
    "create_or_update_model_card",
    "data_weighted_error",
    "distill",
    "distillation_loss",
    "drone_factorize",
    "drone_spectrum",
    "load_activation_stats",
    "push_compressed_to_hub",
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
