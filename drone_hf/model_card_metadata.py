"""Model-card metadata for DRONE checkpoints: validation of the user's card inputs, the YAML header (tags, datasets,
`eval_results`) and its idempotent merge into an existing card.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


DRONE_TAGS = ("drone_hf", "low-rank", "compression")
METRIC_VARIANTS = ("dense", "compressed", "compressed+distilled")
METRICS_EXAMPLE = {"dense": {"accuracy": 0.91}, "compressed": {"accuracy": 0.9}}
_METRIC_NAME_RE = re.compile(r"^(?P<metric>.+) \((?P<variant>dense|compressed|compressed\+distilled)\)$")
_KEY_ORDER = (
    "base_model",
    "library_name",
    "pipeline_tag",
    "tags",
    "datasets",
    "drone_hf",
    "model_name",
    "eval_results",
)


# ----------------------------------------------------------------------------------------------- argument checks


def _check_metrics(metrics: Mapping | None) -> dict[str, dict[str, float]]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be a dict of dicts such as {METRICS_EXAMPLE}, got {type(metrics).__name__}.")
    checked = {}
    for variant, values in metrics.items():
        if variant not in METRIC_VARIANTS:
            raise ValueError(f"Unknown `metrics` key {variant!r}; expected some of {list(METRIC_VARIANTS)}.")
        if not isinstance(values, Mapping):
            raise TypeError(f"`metrics[{variant!r}]` must map metric names to values, got {type(values).__name__}.")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ValueError(
                    f"`metrics[{variant!r}][{name!r}]` must be a number in [-1, 1] (a fraction, as returned by "
                    f"drone_hf.glue.glue_metrics; divide points by 100), got {value!r}."
                )
        checked[variant] = {str(name): float(value) for name, value in values.items()}
    return checked


def _check_speed(speed: Mapping | None) -> dict[str, Any] | None:
    if speed is None:
        return None
    if not isinstance(speed, Mapping):
        raise TypeError(f"`speed` must be a dict with `speedup` and `hardware`, got {type(speed).__name__}.")
    missing = [key for key in ("speedup", "hardware") if key not in speed]
    if missing:
        raise ValueError(f"`speed` is missing {missing}; expected `speedup`, `hardware` (+ `flop_bound`, `setting`).")
    for key in _SPEED_NUMBERS:
        value = speed.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"`speed[{key!r}]` must be a positive number, got {value!r}.")
    return {
        key: (float(value) if key in _SPEED_NUMBERS else str(value))
        for key, value in speed.items()
        if value is not None
    }


_SPEED_NUMBERS = ("speedup", "flop_bound", "cpu_time_speedup")
_DATASET_KEYS = ("id", "hub_id", "config", "split", "pretty")


def _dataset_info(dataset: str | Mapping | None) -> dict[str, str | None] | None:
    """`"sst2"`, `"glue/sst2"` or `"nyu-mll/glue/sst2"` -> the Hub GLUE dataset; `"local:<name>"` -> local files;
    anything else is a Hub dataset id. A mapping gives the fields itself: `id` (required), `hub_id` (`None` for data
    that is not on the Hub), `config`, `split` and `pretty` (the name shown in the card)."""
    if not dataset:
        return None
    if isinstance(dataset, Mapping):
        unknown = sorted(set(dataset) - set(_DATASET_KEYS))
        if unknown or not isinstance(dataset.get("id"), str) or not dataset["id"]:
            raise ValueError(f"A `dataset` mapping needs a str `id` and only the keys {list(_DATASET_KEYS)}.")
        info = {key: (None if dataset.get(key) is None else str(dataset[key])) for key in _DATASET_KEYS}
        info["pretty"] = info["pretty"] or info["id"]
        return info
    if not isinstance(dataset, str):
        raise TypeError(f"`dataset` must be a str such as 'sst2' or 'glue/sst2', got {type(dataset).__name__}.")
    from .glue_tasks import GLUE_HUB_ID, get_glue_task

    if dataset.startswith("local:"):
        return {"id": dataset, "hub_id": None, "config": None, "split": None, "pretty": dataset.removeprefix("local:")}
    name = dataset.removeprefix(f"{GLUE_HUB_ID}/").removeprefix("glue/")
    try:
        task = get_glue_task(name)
    except ValueError:
        return {"id": dataset, "hub_id": dataset, "config": None, "split": None, "pretty": dataset}
    return {
        "id": f"glue/{task.name}",
        "hub_id": GLUE_HUB_ID,
        "config": task.name,
        "split": task.dev_splits[0],
        "pretty": f"GLUE {task.local_dir}",
    }


def _hub_repo_id(name: str | None) -> str | None:
    """`name` if it can be a Hub model id (and is not a local folder), else None."""
    if not name or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


# -------------------------------------------------------------------------------------------------- YAML metadata


_TASK_NAMES = {
    "text-classification": "Text Classification",
    "token-classification": "Token Classification",
    "question-answering": "Question Answering",
}


def _eval_results(
    metrics: Mapping[str, Mapping[str, float]], dataset: Mapping | None, task_type: str = "text-classification"
) -> list[EvalResult]:
    dataset = dataset or {"hub_id": "custom", "pretty": "held-out evaluation data", "config": None, "split": None}
    task_type = task_type if task_type in _TASK_NAMES else "text-classification"
    return [
        EvalResult(
            task_type=task_type,
            task_name=_TASK_NAMES[task_type],
            dataset_type=dataset["hub_id"] or "custom",
            dataset_name=dataset["pretty"],
            dataset_config=dataset["config"],
            dataset_split=dataset["split"],
            metric_type=name,
            metric_value=round(value, 6),
            metric_name=f"{name} ({variant})",
        )
        for variant in METRIC_VARIANTS
        for name, value in metrics.get(variant, {}).items()
    ]


def _metrics_from_card(card: ModelCard) -> dict[str, dict[str, float]]:
    recovered: dict[str, dict[str, float]] = {}
    for result in card.data.eval_results or []:
        match = _METRIC_NAME_RE.match(result.metric_name or "")
        if match and isinstance(result.metric_value, (int, float)):
            recovered.setdefault(match["variant"], {})[match["metric"]] = float(result.metric_value)
    return recovered


_PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModel": "feature-extraction",
}


def _merge_metadata(
    data: ModelCardData, *, base_model, dataset, metrics, speed, model_name, tags, family=None, auto_class=None
) -> None:
    data.library_name = "transformers"
    data.pipeline_tag = data.pipeline_tag or _PIPELINE_TAGS.get(auto_class)
    glue = ["glue"] if dataset and str(dataset.get("id", "")).startswith("glue/") else []
    tags = [*([family] if family else []), *glue, *tags]
    if _hub_repo_id(base_model):
        data.base_model = base_model
    data.tags = list(dict.fromkeys([*(data.tags or []), *DRONE_TAGS, *tags]))
    if dataset and dataset["hub_id"]:
        known = [data.datasets] if isinstance(data.datasets, str) else list(data.datasets or [])
        data.datasets = list(dict.fromkeys([*known, dataset["hub_id"]]))
    if metrics:
        data.model_name = data.model_name or model_name
        others = [r for r in data.eval_results or [] if not _METRIC_NAME_RE.match(r.metric_name or "")]
        data.eval_results = others + _eval_results(
            metrics, dataset, _PIPELINE_TAGS.get(auto_class, "text-classification")
        )
    stored = dataset and (
        dataset["id"]  # the id alone when it says everything (GLUE tasks, plain Hub ids), else the whole record
        if _dataset_info(dataset["id"]) == dataset
        else {key: value for key, value in dataset.items() if value is not None}
    )
    owned = {key: value for key, value in {"dataset": stored, "speed": speed}.items() if value}
    if owned:
        data["drone_hf"] = owned
    else:
        data.pop("drone_hf")


__all__ = ["DRONE_TAGS", "METRICS_EXAMPLE", "METRIC_VARIANTS"]
