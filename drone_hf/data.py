"""Your own labelled text for the `drone-hf` command and `examples/run_glue.py`: a GLUE task name (the shortcut), a Hub
dataset, or local CSV/TSV/JSON/JSONL files, with the text and label columns and the metrics to report.

[`DataSource`] says where the rows are (checked without reading anything); [`load_task_data`] reads them, finds the
text and label columns and the label names, and returns a [`TaskData`] that tokenises any split and scores
predictions. The command-line options that build a [`DataSource`] are in `drone_hf/data_arguments.py`, the file and
Hub reading in `drone_hf/data_reading.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data_reading import is_default_id2label, label_scheme, read_splits, text_columns
from .glue_tasks import get_glue_task
from .task_metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, metric_name, task_metrics


if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

FILE_TYPES = (".csv", ".tsv", ".json", ".jsonl")


@dataclass(frozen=True)
class DataSource:
    r"""
    Where a task's rows are: exactly one of a GLUE `task`, a Hub `dataset_name`, or local `train_file` /
    `validation_file` (CSV, TSV, JSON or JSON Lines). Checked on construction; nothing is read.

    Args:
        task (`str`, *optional*): GLUE task name (`"sst2"`, `"MRPC"`, ...): columns, labels and metrics are known.
        data_dir (`str`, *optional*): Local GLUE TSV folder for `task` (default: the Hub, `nyu-mll/glue`).
        dataset_name (`str`, *optional*), dataset_config_name (`str`, *optional*): A Hub dataset and its config.
        train_file (`str`, *optional*), validation_file (`str`, *optional*): Local files.
        train_split (`str`, *optional*, defaults to `"train"`), validation_split (`str`, *optional*, defaults to
            `"validation"`): Split names of the Hub dataset.
        text_columns (`tuple[str, ...]`, *optional*): One or two text columns (a pair is encoded as one sequence
            pair). Defaults to a known pair (`sentence1`/`sentence2`, `premise`/`hypothesis`, ...), `sentence` or
            `text`, else the one or two text columns other than the label.
        label_column (`str`, *optional*): Defaults to `label` (or `labels`).
        metrics (`tuple[str, ...]`, *optional*): `accuracy`, `f1`, `mcc`, `pearson`, `spearman`; the first is the
            main one (reported first, and the one a `--max-accuracy-drop` budget is spent on). Defaults to
            accuracy, or Pearson and Spearman for a regression.

    Raises:
        `ValueError`: for no source or several, options that do not apply to the source, a file type other than
            `.csv`, `.tsv`, `.json`, `.jsonl`, or more than two text columns.
        `FileNotFoundError`: for a local file that does not exist.
    """

    task: str | None = None
    data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    metrics: tuple[str, ...] | None = None

    def __post_init__(self):
        sources = {
            "--task": self.task,
            "--dataset-name": self.dataset_name,
            "--train-file/--validation-file": self.train_file or self.validation_file,
        }
        given = [option for option, value in sources.items() if value]
        if len(given) != 1:
            raise ValueError(
                f"Pass one source of data: a GLUE `--task`, a Hub `--dataset-name`, or local `--train-file` / "
                f"`--validation-file` (CSV, TSV, JSON or JSONL); got {given or 'none'}."
            )
        if self.data_dir and not self.task:
            raise ValueError("`--data-dir` is the local GLUE folder of `--task`; local files go in `--train-file`.")
        if self.dataset_config_name and not self.dataset_name:
            raise ValueError("`--dataset-config-name` needs `--dataset-name`.")
        if self.task:
            get_glue_task(self.task)  # ValueError for an unknown task
            chosen = {
                "--text-columns": self.text_columns,
                "--label-column": self.label_column,
                "--metric": self.metrics,
            }
            extra = [option for option, value in chosen.items() if value]
            if extra:
                raise ValueError(
                    f"{extra} do not apply to the GLUE task {self.task!r}: its columns, labels and official metrics "
                    "are known. Use them with `--dataset-name` or `--train-file`/`--validation-file`."
                )
        for option, path in (("--train-file", self.train_file), ("--validation-file", self.validation_file)):
            if path is None:
                continue
            if Path(path).suffix.lower() not in FILE_TYPES:
                raise ValueError(f"`{option}` {path!r} must be one of {list(FILE_TYPES)} (by its extension).")
            if not Path(path).is_file():
                raise FileNotFoundError(f"`{option}` {path!r} is not a file.")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"`--text-columns` takes one or two columns (a text or a pair), got {self.text_columns}.")
        for name in self.metrics or ():
            metric_name(name)


class TaskData:
    r"""
    A labelled text-classification (or regression) task: where its splits are, its text and label columns, label
    names and metrics. Built by [`load_task_data`] (or [`TaskData.from_glue`]); a GLUE task is read with
    `drone_hf.glue` and scored with its official metrics.

    Attributes:
        name (`str`): `"sst2"`, a Hub dataset id, or the training (else validation) file name.
        text_columns (`tuple[str, ...]`), label_column (`str`).
        label_names (`tuple[str, ...]` or `None`): Class names by label id, when the data has them.
        num_labels (`int`): 1 for a regression.
        metric_names (`tuple[str, ...]`): The metrics reported; the first is the main one.
    """

    task_type = "text-classification"

    def __init__(
        self,
        *,
        name: str,
        source: DataSource,
        text_columns: Sequence[str],
        label_column: str,
        label_names: Sequence[str] | None,
        num_labels: int,
        metric_names: Sequence[str],
        raw: Mapping[str, Any] | None = None,
        encode_label: Callable[[Any], Any] | None = None,
    ):
        self.name, self.source = name, source
        self.text_columns, self.label_column = tuple(text_columns), label_column
        self.label_names = None if label_names is None else tuple(label_names)
        self.num_labels, self.metric_names = num_labels, tuple(metric_names)
        self._raw: dict[str, Any] = dict(raw or {})
        self._encode_label = encode_label or (lambda value: value)

    @classmethod
    def from_glue(cls, task: str, data_dir: str | None = None) -> TaskData:
        """The GLUE task `task` (its data read by `drone_hf.glue` from `data_dir` or the Hub, when loaded)."""
        info = get_glue_task(task)
        return cls(
            name=info.name,
            source=DataSource(task=info.name, data_dir=data_dir),
            text_columns=info.text_keys,
            label_column="label",
            label_names=info.label_names,
            num_labels=info.num_labels,
            metric_names=info.metric_names,
        )

    @property
    def glue(self):
        """The `GlueTask` entry, or `None` for your own data."""
        return get_glue_task(self.source.task) if self.source.task else None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.glue.main_metric if self.glue else self.metric_names[0]

    @property
    def id2label(self) -> dict[int, str] | None:
        """Label id -> name, for `config.id2label` (pipelines then print names, not `LABEL_0`)."""
        return None if self.label_names is None else dict(enumerate(self.label_names))

    @property
    def validation_description(self) -> str:
        """Where the validation rows come from, for messages (`"sst2 validation"`, `"dev.csv"`)."""
        if self.glue:
            return f"{self.name} {self.glue.dev_splits[0]}"
        if self.source.dataset_name:
            return f"{self.name} {self.source.validation_split}"
        return Path(self.source.validation_file or "").name or "validation rows"

    @property
    def calibration_dataset(self) -> str:
        """The dataset named in `config.drone_calibration` (`"glue/sst2"`, a Hub id, or `"local:train.csv"`)."""
        if self.glue:
            return f"glue/{self.name}"
        return self.source.dataset_name or f"local:{Path(self.source.train_file or self.source.validation_file).name}"

    @property
    def card_dataset(self) -> str | dict:
        """The `dataset` of `drone_hf.create_or_update_model_card`: where the reported metrics were measured."""
        source = self.source
        if self.glue:
            return self.name
        if source.dataset_name:
            pretty = source.dataset_name + (f" ({source.dataset_config_name})" if source.dataset_config_name else "")
            return {
                "id": source.dataset_name,
                "hub_id": source.dataset_name,
                "config": source.dataset_config_name,
                "split": source.validation_split,
                "pretty": pretty,
            }
        train, validation = (Path(path).name if path else None for path in (source.train_file, source.validation_file))
        pretty = " and ".join(
            f"`{name}` ({role})" for name, role in ((train, "training rows"), (validation, "validation rows")) if name
        )
        return {"id": f"local:{validation or train}", "pretty": f"local files {pretty}"}

    # ------------------------------------------------------------------------------------------------ loading
    def _rows(self, split: str, max_samples: int | None, seed: int):
        """The raw rows of `split` (a seeded random subset of `max_samples`, kept in file order), for `load`.

        Raises:
            `ValueError`: when the data has no `split`, naming the option that gives it.
        """
        if split not in self._raw:
            option = "--train-file" if split == "train" else "--validation-file"
            raise ValueError(f"No {split} rows: pass `{option}` (or a Hub dataset with a `{split}` split).")
        rows = self._raw[split]
        if max_samples is not None and max_samples < len(rows):
            rows = rows.select(np.sort(np.random.default_rng(seed).permutation(len(rows))[:max_samples]).tolist())
        return rows

    def load(
        self,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 128,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> datasets.Dataset:
        """Tokenised rows of `split` (`"train"` or `"validation"`) with `labels`, ready for `Trainer` or
        `drone_hf.evaluation.iter_batches`; `max_samples` takes a seeded random subset kept in file order."""
        if self.glue:
            from .glue import load_glue

            glue_split = self.glue.dev_splits[0] if split == "validation" else split
            return load_glue(
                self.name,
                tokenizer,
                split=glue_split,
                data_dir=self.source.data_dir,
                max_length=max_length,
                max_samples=max_samples,
                seed=seed,
            )
        rows = self._rows(split, max_samples, seed)
        columns, encode_label = self.text_columns, self._encode_label

        def encode(batch: dict[str, list]) -> Any:
            texts = [["" if text is None else str(text) for text in batch[column]] for column in columns]
            encoded = tokenizer(*texts, truncation=True, max_length=max_length)
            encoded["labels"] = [encode_label(value) for value in batch[self.label_column]]
            return encoded

        return rows.map(encode, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {split} rows")

    # ------------------------------------------------------------------------------------------------ scoring
    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        """The task's metrics (fractions) of logits against labels: GLUE's official ones, else [`task_metrics`]."""
        if self.glue:
            from .glue_metrics import glue_metrics

            return glue_metrics(self.name, predictions, labels)
        return task_metrics(self.metric_names, predictions, labels, num_labels=self.num_labels)

    def metric_points(self, batches: Sequence[Mapping] | None = None) -> Callable[[Any, Any], float]:
        """`(logits, labels) -> main metric in points`: the `metric_fn` a `max_accuracy_drop` budget is spent on
        (`batches`, the held-out batches, are not needed for a per-row metric)."""
        main = self.main_metric
        return lambda logits, labels: 100.0 * self.compute_metrics(logits, labels)[main]


def load_task_data(
    source: DataSource,
    *,
    splits: Sequence[str] = ("train", "validation"),
    model_config: PretrainedConfig | None = None,
) -> TaskData:
    r"""
    Reads the `splits` of `source` and returns the [`TaskData`] to tokenise and score them.

    For your own data, the label scheme comes from the rows of all `splits` together: a `ClassLabel` feature (Hub)
    gives names and ids; integer labels are ids; text labels are mapped with the fine-tuned model's `label2id` when
    `model_config` has real names that cover them, else in sorted order (as transformers' `run_classification.py`
    does); non-integer numbers (or only regression metrics, or a model with `num_labels=1`) make a regression.

    Args:
        source ([`DataSource`]): Where the rows are.
        splits (`Sequence[str]`, *optional*): `"train"` and/or `"validation"`: the splits to read now.
        model_config (`PretrainedConfig`, *optional*): The fine-tuned model's config, to reuse its labels.

    Returns:
        [`TaskData`]

    Raises:
        `ValueError`: for a missing split, unknown columns, empty labels, or labels the model cannot predict.
        `ImportError`: without `datasets` (the `glue` extra).
    """
    if source.task:
        return TaskData.from_glue(source.task, source.data_dir)
    raw = read_splits(source, splits)
    first = next(iter(raw.values()))
    label = source.label_column or next((c for c in ("label", "labels") if c in first.column_names), None)
    for split, rows in raw.items():
        if label is None or label not in rows.column_names:
            raise ValueError(
                f"The {split} rows have no label column {label or 'label'!r}: pass `--label-column`; columns: "
                f"{rows.column_names}."
            )
    text = text_columns(source, first.column_names, label)
    metrics = tuple(metric_name(name) for name in source.metrics or ())
    entity = [name for name in metrics if name.startswith("seqeval")]
    if entity:
        raise ValueError(
            f"`--metric` {entity} is an entity-level metric of token classification, but this is a "
            "text-classification task: pass `--task-type token-classification` with a token-classification model, "
            f"or a metric of {[*CLASSIFICATION_METRICS, *REGRESSION_METRICS]}."
        )
    answer = [name for name in metrics if name in ("squad_f1", "exact_match")]
    if answer:
        raise ValueError(
            f"`--metric` {answer} is a question-answering metric, but this is a text-classification task: pass "
            "`--task-type question-answering` with a question-answering model, or a metric of "
            f"{[*CLASSIFICATION_METRICS, *REGRESSION_METRICS]}."
        )
    values = [value for rows in raw.values() for value in rows[label]]
    names, num_labels, encode = label_scheme(values, first.features.get(label), metrics, model_config)
    if not metrics:
        metrics = REGRESSION_METRICS if num_labels == 1 else ("accuracy",)
    elif num_labels > 1 and "accuracy" not in metrics:
        metrics = (*metrics, "accuracy")
    name = source.dataset_name or Path(source.train_file or source.validation_file).name
    return TaskData(
        name=name,
        source=source,
        text_columns=text,
        label_column=label,
        label_names=names,
        num_labels=num_labels,
        metric_names=metrics,
        raw=raw,
        encode_label=encode,
    )


def check_model_labels(task: TaskData, model_config: PretrainedConfig) -> None:
    """Raises `ValueError` when the model's head cannot predict the task's labels (another number of labels)."""
    if model_config.num_labels != task.num_labels:
        names = f" {list(task.label_names)}" if task.label_names else ""
        raise ValueError(
            f"`--model` has num_labels={model_config.num_labels} but task {task.name} has {task.num_labels}"
            f"{names}: was it fine-tuned on this data?"
        )


def label_config(task: TaskData, model_config: PretrainedConfig) -> Mapping[str, dict] | None:
    """`{"id2label": ..., "label2id": ...}` to write into a model's config when it only has the placeholder names
    `LABEL_0`, `LABEL_1`, ... and the task knows its label names; `None` otherwise."""
    if task.id2label is None or not is_default_id2label(model_config) or model_config.num_labels != task.num_labels:
        return None
    return {"id2label": task.id2label, "label2id": {name: index for index, name in task.id2label.items()}}


__all__ = ["FILE_TYPES", "DataSource", "TaskData", "check_model_labels", "label_config", "load_task_data"]
