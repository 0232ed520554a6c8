"""Kept for imports written against drone_hf 0.1: module-tree rewriting lives in `structure.py`."""

from .structure import (
    replace_attention_with_drone,
    replace_linear_with_drone,
    validate_attention_ranks,
    validate_drone_ranks,
)


__all__ = [
    "replace_attention_with_drone",
    "replace_linear_with_drone",
    "validate_attention_ranks",
    "validate_drone_ranks",
]
