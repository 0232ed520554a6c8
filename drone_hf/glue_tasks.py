"""The nine GLUE tasks: their Hub columns, labels, metrics and local TSV layout, looked up by [`get_glue_task`]."""

from __future__ import annotations

import re
from dataclasses import dataclass


GLUE_HUB_ID = "nyu-mll/glue"
GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")

_DEFAULT_FILES = (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))
_MNLI_FILES = (
    ("train", "train.tsv"),
    ("validation_matched", "dev_matched.tsv"),
    ("validation_mismatched", "dev_mismatched.tsv"),
    ("test_matched", "test_matched.tsv"),
    ("test_mismatched", "test_mismatched.tsv"),
)
_PAIR_METRICS = ("accuracy", "f1", "combined_score")


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task: Hub columns, labels, metrics and local GLUE TSV layout.

    Args:
        name: Canonical task name, as in `GLUE_TASKS` and the Hub config name of `nyu-mll/glue`.
        text_keys: Hub text column names, in tokenizer order (first segment, optional second segment).
        num_labels: Number of classes (1 for the STS-B regression task).
        is_regression: Whether the label is a float score (STS-B).
        metric_names: Keys returned by [`glue_metrics`] for this task.
        main_metric: The metric to select checkpoints on (e.g. `TrainingArguments(metric_for_best_model=...)`).
        dev_splits: The split names of the labelled development set(s).
        label_names: Class names, index = label id, exactly as the Hub `ClassLabel`; `None` for regression.
        local_dir: Folder name of the task in the GLUE TSV layout (`download_glue_data.py`).
        tsv_text_columns: TSV header names of the text columns, aligned with `text_keys`.
        tsv_label_column: TSV header name of the label column.
        tsv_column_names: Column names for header-less files (CoLA train/dev), else `None`.
        local_files: `(split, file name)` pairs of the local layout.
        split_aliases: `(alias, split)` pairs, e.g. MNLI `validation` -> `validation_matched`.
    """

    name: str
    text_keys: tuple[str, ...]
    num_labels: int
    is_regression: bool
    metric_names: tuple[str, ...]
    main_metric: str
    dev_splits: tuple[str, ...]
    label_names: tuple[str, ...] | None
    local_dir: str
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str
    tsv_column_names: tuple[str, ...] | None = None
    local_files: tuple[tuple[str, str], ...] = _DEFAULT_FILES
    split_aliases: tuple[tuple[str, str], ...] = ()

    @property
    def splits(self) -> tuple[str, ...]:
        """All accepted split names (canonical names first, then aliases)."""
        return tuple(split for split, _ in self.local_files) + tuple(alias for alias, _ in self.split_aliases)


def _task(name, text_keys, label_names, local_dir, tsv_text_columns, tsv_label_column="label", **kwargs) -> GlueTask:
    kwargs.setdefault("metric_names", ("accuracy",))
    kwargs.setdefault("main_metric", kwargs["metric_names"][0])
    kwargs.setdefault("dev_splits", ("validation",))
    return GlueTask(
        name=name,
        text_keys=text_keys,
        num_labels=len(label_names) if label_names else 1,
        is_regression=label_names is None,
        label_names=label_names,
        local_dir=local_dir,
        tsv_text_columns=tsv_text_columns,
        tsv_label_column=tsv_label_column,
        **kwargs,
    )


_NLI = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")
# One task per entry reads better as a table than one argument per line.
# fmt: off
GLUE_TASK_INFO: dict[str, GlueTask] = {
    "cola": _task(
        "cola", ("sentence",), ("unacceptable", "acceptable"), "CoLA", ("sentence",),
        metric_names=("matthews_correlation",), tsv_column_names=("source", "label", "original_mark", "sentence"),
    ),
    "sst2": _task("sst2", ("sentence",), ("negative", "positive"), "SST-2", ("sentence",)),
    "mrpc": _task(
        "mrpc", _PAIR, ("not_equivalent", "equivalent"), "MRPC", ("#1 String", "#2 String"), "Quality",
        metric_names=_PAIR_METRICS, main_metric="f1",
    ),
    "qqp": _task(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "QQP", ("question1", "question2"),
        "is_duplicate", metric_names=_PAIR_METRICS, main_metric="f1",
    ),
    "stsb": _task("stsb", _PAIR, None, "STS-B", _PAIR, "score",
                  metric_names=("pearson", "spearmanr", "combined_score")),
    "mnli": _task(
        "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "MNLI", _PAIR, "gold_label",
        dev_splits=("validation_matched", "validation_mismatched"), local_files=_MNLI_FILES,
        split_aliases=(("validation", "validation_matched"), ("test", "test_matched")),
    ),
    "qnli": _task("qnli", ("question", "sentence"), _NLI, "QNLI", ("question", "sentence")),
    "rte": _task("rte", _PAIR, _NLI, "RTE", _PAIR),
    "wnli": _task("wnli", _PAIR, ("not_entailment", "entailment"), "WNLI", _PAIR),
}
# fmt: on


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_glue_task(task: str | GlueTask) -> GlueTask:
    """Look up a GLUE task by name, case-insensitively and ignoring `-`/`_` (`"SST-2"`, `"sts-b"`, `"MNLI"`).

    Args:
        task: Task name (or a `GlueTask`, returned unchanged).

    Returns:
        The task's `GlueTask` entry from `GLUE_TASK_INFO`.

    Raises:
        ValueError: If `task` is not one of the nine GLUE tasks.

    Example:
        >>> get_glue_task("STS-B").is_regression
        True
    """
    if isinstance(task, GlueTask):
        return task
    key = _normalise(task) if isinstance(task, str) else None
    if key not in GLUE_TASK_INFO:
        raise ValueError(f"Unknown GLUE task `{task}`; expected one of {list(GLUE_TASKS)} (case-insensitive).")
    return GLUE_TASK_INFO[key]


__all__ = ["GLUE_HUB_ID", "GLUE_TASKS", "GLUE_TASK_INFO", "GlueTask", "get_glue_task"]
