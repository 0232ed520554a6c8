"""Kept for imports written against drone_hf 0.1: the BERT sequence classifier now lives in `modeling_drone.py`."""

from .modeling_drone import DroneBertForSequenceClassification


__all__ = ["DroneBertForSequenceClassification"]
