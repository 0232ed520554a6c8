"""Reading your own task data for `drone_hf.data`: local CSV/TSV/JSON/JSONL files and Hub datasets, the text columns
and the label scheme (names, number of labels, value -> id)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging

from .task_metrics import REGRESSION_METRICS


if TYPE_CHECKING:
    import datasets

    from .data import DataSource

logger = logging.get_logger("drone_hf.data")
# Column pairs transformers' run_glue.py and the GLUE/SuperGLUE-style datasets use, tried before guessing.
_KNOWN_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)


def _require_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "Reading task data needs `datasets` (the `glue` extra): in your drone_hf clone, pip install -e '.[glue]'"
        ) from error
    return datasets


def read_file(path: str) -> datasets.Dataset:
    import pandas as pd

    datasets = _require_datasets()
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(
                path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False, encoding="utf-8-sig"
            )
        else:  # a JSON array (or {"data": [...]}) or JSON Lines, as datasets' json loader reads them
            try:
                frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
            except ValueError:
                frame = pd.read_json(path, lines=suffix != ".jsonl", dtype=False)
            if list(frame.columns) == ["data"]:
                frame = pd.DataFrame(list(frame["data"]))
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"Could not read {path!r} as {suffix[1:].upper()}: {error}") from error
    if frame.empty:
        raise ValueError(f"{path!r} has no rows.")
    return datasets.Dataset.from_pandas(frame.astype(object).where(frame.notna(), None), preserve_index=False)


def read_hub(source: DataSource, split: str) -> datasets.Dataset:
    datasets = _require_datasets()
    try:
        return datasets.load_dataset(source.dataset_name, source.dataset_config_name, split=split)
    except Exception as error:
        error.add_note(
            f"drone_hf: loading split `{split}` of the Hub dataset {source.dataset_name!r} failed. Offline, save it "
            "as CSV/JSON and pass `--train-file` / `--validation-file`."
        )
        raise


def read_splits(source: DataSource, splits: Sequence[str]) -> dict[str, datasets.Dataset]:
    """The raw rows of each of `splits` (`"train"` and/or `"validation"`): from the Hub dataset when `source` names
    one, else from `--train-file` / `--validation-file`, whose absence for a needed split is an error naming it."""
    raw: dict[str, datasets.Dataset] = {}
    for split in splits:
        if source.dataset_name:
            raw[split] = read_hub(source, source.train_split if split == "train" else source.validation_split)
        else:
            path = source.train_file if split == "train" else source.validation_file
            if path is None:
                option = "--train-file" if split == "train" else "--validation-file"
                raise ValueError(f"This command needs {split} rows: pass `{option}`.")
            raw[split] = read_file(path)
    return raw


def text_columns(source: DataSource, columns: Sequence[str], label: str) -> tuple[str, ...]:
    if source.text_columns:
        missing = [column for column in source.text_columns if column not in columns]
        if missing:
            raise ValueError(f"`--text-columns` {missing} are not columns of the data; its columns: {list(columns)}.")
        return tuple(source.text_columns)
    for group in _KNOWN_TEXT_COLUMNS:
        if set(group) <= set(columns):
            return group
    others = [column for column in columns if column not in (label, "idx", "id")]
    if 1 <= len(others) <= 2:
        return tuple(others)
    raise ValueError(f"Cannot tell the text columns among {list(columns)}: pass `--text-columns` (one or two names).")


def is_default_id2label(config) -> bool:
    names = getattr(config, "id2label", None) or {}
    return all(str(name) == f"LABEL_{int(i)}" for i, name in names.items())


def label_scheme(values: list, feature, metrics, model_config) -> tuple[tuple[str, ...] | None, int, Callable]:
    """Label names (or None), number of labels and the value -> label id (or float) encoder of a task."""
    if feature is not None and type(feature).__name__ == "ClassLabel":
        return tuple(feature.names), len(feature.names), int
    texts = [str(value).strip() for value in values]
    if "" in texts or any(value is None for value in values):
        raise ValueError("Some rows have an empty label: remove them or fill the label column.")
    wants_regression = bool(metrics) and all(name in REGRESSION_METRICS for name in metrics)
    numbers = _as_numbers(texts)
    integers = numbers is not None and all(float(n).is_integer() for n in numbers)
    model_labels = getattr(model_config, "num_labels", None)
    if wants_regression or model_labels == 1 or (numbers is not None and not integers):
        if numbers is None:
            raise ValueError(f"A regression needs numeric labels, got values such as {sorted(set(texts))[:5]}.")
        return None, 1, float
    if integers:
        count = max(int(max(numbers)) + 1, model_labels or 0)
        names = None
        if model_config is not None and not is_default_id2label(model_config):
            names = tuple(model_config.id2label[i] for i in range(model_config.num_labels))
        return names, count, lambda value: int(float(str(value).strip()))
    distinct = sorted(set(texts))
    known = {} if model_config is None or is_default_id2label(model_config) else dict(model_config.label2id)
    if known and set(distinct) <= set(known):
        names = tuple(name for name, _ in sorted(known.items(), key=lambda item: item[1]))
    else:
        if known:
            logger.warning(
                f"The model's labels {sorted(known)} do not cover the data's {distinct}: using sorted order."
            )
        names = tuple(distinct)
    lookup = {name: index for index, name in enumerate(names)}
    return names, len(names), lambda value: lookup[str(value).strip()]


def _as_numbers(texts: list[str]) -> list[float] | None:
    try:
        return [float(text) for text in texts]
    except ValueError:
        return None


__all__ = ["is_default_id2label", "label_scheme", "read_file", "read_hub", "text_columns"]
