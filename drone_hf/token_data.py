"""Your own token-classification (NER) data for the `drone-hf` command, in the layout of transformers'
`run_ner.py`: rows with a list of words and a list of tags (`tokens` / `ner_tags` by default) in JSON, JSON Lines,
CSV or TSV (there each list a JSON array, or the words and tags separated by spaces), or a Hub dataset.

[`load_token_task_data`] reads the rows and checks them against the model's labels; the [`TokenTaskData`] it returns
tokenises words into sub-tokens with the label on the first sub-token of each word and `-100` on the others (as
`run_ner.py` does by default), and scores predictions with entity-level F1 and token accuracy
(`drone_hf.token_metrics`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import DataSource, TaskData
from .data_reading import is_default_id2label, read_splits
from .token_metrics import (
    ENTITY_METRICS,
    IGNORE_INDEX,
    EntityF1Points,
    check_iob_tags,
    token_metric_name,
    token_task_metrics,
)


if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_WORDS_COLUMN = "tokens"
DEFAULT_TAGS_COLUMN = "ner_tags"


class TokenTaskData(TaskData):
    r"""
    A labelled token-classification task: words and tags columns, the tag names (by label id) and the metrics; the
    first metric is the main one (reported first, and the one a `--max-accuracy-drop` budget is spent on).
    Built by [`load_token_task_data`].
    """

    task_type = "token-classification"

    @property
    def is_regression(self) -> bool:
        return False

    def load(
        self,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 128,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> datasets.Dataset:
        """Tokenised rows of `split` with token `labels`: each word's label on its first sub-token, `-100` on the
        other sub-tokens and the special tokens; words past `max_length` tokens are cut off (truncation)."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "Token classification needs a fast tokenizer (its `word_ids()` align words and sub-tokens); the "
                f"model's tokenizer is {type(tokenizer).__name__}. Save a fast one (`AutoTokenizer.from_pretrained("
                "..., use_fast=True)`) beside the model."
            )
        rows = self._rows(split, max_samples, seed)
        words_column, encode_label = self.text_columns[0], self._encode_label

        def encode(batch: dict[str, list]) -> Any:
            words = [[str(word) for word in _as_list(value)] for value in batch[words_column]]
            encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            labels = []
            for index, tags in enumerate(batch[self.label_column]):
                ids = [encode_label(tag) for tag in _as_list(tags)]
                previous, row = None, []
                for word in encoded.word_ids(index):
                    row.append(IGNORE_INDEX if word is None or word == previous else ids[word])
                    previous = word
                labels.append(row)
            encoded["labels"] = labels
            return encoded

        return rows.map(encode, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {split} rows")

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        """Entity F1 / precision / recall and token accuracy (fractions) of logits `(n, length, classes)` against
        labels `(n, length)` (`-100` where not scored)."""
        return token_task_metrics(self.metric_names, predictions, labels, label_names=self.label_names)

    def metric_points(self, batches: Sequence[dict] | None = None) -> Callable[[Any, Any], float] | None:
        """The `metric_fn` of a `max_accuracy_drop` budget on the held-out `batches`: [`EntityF1Points`] for entity
        F1 (it needs the batches, to know where each sentence's token rows end), else `None`: the allocation's
        default token accuracy (`drone_hf.heads.default_metric_fn`)."""
        if self.main_metric == "accuracy":
            return None
        if batches is None:
            raise ValueError("Entity F1 as a budget metric needs the held-out batches (sentence boundaries).")
        if self.main_metric != "seqeval_f1":
            raise ValueError(
                f"`--max-accuracy-drop` is spent on the main metric; {self.main_metric!r} cannot be one (use "
                "seqeval_f1 or accuracy first in `--metric`)."
            )
        return EntityF1Points.from_batches(batches, self.label_names)


def _as_list(value: Any) -> list:
    """A row's words or tags: a list, or a JSON array / space-separated string (CSV/TSV cells)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return list(json.loads(text))
            except json.JSONDecodeError:
                pass
        return text.split()
    raise ValueError(f"Expected a list of words or tags, got {type(value).__name__} {value!r}.")


def _check_columns(raw: dict, words: str, tags: str, source: DataSource) -> None:
    for split, rows in raw.items():
        missing = [
            f"`{option}` {column!r}"
            for option, column in (("--text-column", words), ("--label-column", tags))
            if column not in rows.column_names
        ]
        if missing:
            raise ValueError(
                f"The {split} rows have no column {' or '.join(missing)} (token classification reads a list of words "
                f"and a list of tags per row, as run_ner.py); columns found: {rows.column_names}."
            )


def _tag_scheme(raw: dict, words: str, tags: str, feature, model_config) -> tuple[tuple[str, ...], Callable]:
    """Tag names by label id and the tag -> id encoder; checks every row's words against its tags."""
    names = None
    if model_config is not None and not is_default_id2label(model_config):
        names = tuple(str(model_config.id2label[i]) for i in range(model_config.num_labels))
    inner = getattr(feature, "feature", None)
    if inner is not None and type(inner).__name__ == "ClassLabel":  # ids of the dataset's own tag names
        data_names = tuple(inner.names)
        if names is None:
            names = data_names
        elif data_names != names:
            if not set(data_names) <= set(names):
                unknown = sorted(set(data_names) - set(names))
                raise ValueError(
                    f"Tags {unknown} of the data are not labels of the model; its labels (config.id2label): "
                    f"{list(names)}."
                )
            lookup = {name: index for index, name in enumerate(names)}
            return names, lambda value: lookup[data_names[int(value)]]  # the data's id -> the model's id
    values: list = []
    for split, rows in raw.items():
        for number, (row_words, row_tags) in enumerate(zip(rows[words], rows[tags]), start=1):
            row_words, row_tags = _as_list(row_words), _as_list(row_tags)
            if len(row_words) != len(row_tags):
                raise ValueError(
                    f"Row {number} of the {split} rows has {len(row_words)} words but {len(row_tags)} tags; each word "
                    f"needs one tag (`{words}`: {row_words[:8]}, `{tags}`: {row_tags[:8]})."
                )
            values.extend(row_tags)
    if not values:
        raise ValueError("The rows have no tagged word.")
    integers = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) or all(
        str(v).strip().lstrip("-").isdigit() for v in values
    )
    if integers:
        ids = sorted({int(str(v).strip()) for v in values})
        limit = len(names) if names is not None else (model_config.num_labels if model_config is not None else None)
        if ids[0] < 0 or (limit is not None and ids[-1] >= limit):
            bad = [i for i in ids if i < 0 or (limit is not None and i >= limit)]
            allowed = f"0..{limit - 1}" + (f" ({dict(enumerate(names))})" if names else "")
            raise ValueError(f"Tag ids {bad} are not labels of the model; its labels are {allowed}.")
        if names is None:
            names = tuple(f"LABEL_{i}" for i in range(limit if limit is not None else ids[-1] + 1))
        return names, lambda value: int(str(value).strip())
    texts = sorted({str(v).strip() for v in values})
    if names is None:  # run_ner.py's rule for string tags without a ClassLabel: sorted order
        names = tuple(texts)
    unknown = [tag for tag in texts if tag not in names]
    if unknown:
        raise ValueError(f"Tags {unknown} are not labels of the model; its labels (config.id2label): {list(names)}.")
    lookup = {name: index for index, name in enumerate(names)}
    return names, lambda value: lookup[str(value).strip()]


def load_token_task_data(
    source: DataSource,
    *,
    splits: Sequence[str] = ("train", "validation"),
    model_config: PretrainedConfig | None = None,
) -> TokenTaskData:
    r"""
    Reads the `splits` of `source` as token-classification rows and returns the [`TokenTaskData`] to tokenise and
    score them.

    Tags may be strings (`"B-PER"`) or label ids. Strings are mapped with the model's `id2label` when it has real
    names (a tag outside them is an error), else in sorted order (as `run_ner.py`); ids must be labels of the model.

    Args:
        source ([`DataSource`]): Local files or a Hub dataset; `text_columns` is the words column (default
            `tokens`), `label_column` the tags column (default `ner_tags`), `metrics` some of `seqeval_f1`,
            `seqeval_precision`, `seqeval_recall`, `accuracy` (default: `seqeval_f1` and `accuracy` when the tags are
            IOB tags, else `accuracy`).
        splits (`Sequence[str]`, *optional*): `"train"` and/or `"validation"`.
        model_config (`PretrainedConfig`, *optional*): The fine-tuned model's config, for its labels.

    Raises:
        `ValueError`: for a GLUE task, a missing column (naming those found), a row whose words and tags differ in
            number, a tag the model does not have, a metric of another task type, or entity F1 with non-IOB tags.
    """
    if source.task:
        raise ValueError(f"`--task {source.task}` is a GLUE text-classification task, not token classification.")
    raw = read_splits(source, splits)
    if source.text_columns is not None and len(source.text_columns) != 1:
        raise ValueError(
            f"`--text-column` takes one column of words for token classification, got {source.text_columns}."
        )
    words = source.text_columns[0] if source.text_columns else DEFAULT_WORDS_COLUMN
    tags = source.label_column or DEFAULT_TAGS_COLUMN
    _check_columns(raw, words, tags, source)
    first = next(iter(raw.values()))
    names, encode = _tag_scheme(raw, words, tags, first.features.get(tags), model_config)
    metrics = tuple(dict.fromkeys(token_metric_name(name) for name in source.metrics or ()))
    if not metrics:
        try:
            check_iob_tags(names)
            metrics = ("seqeval_f1", "accuracy")
        except ValueError:
            metrics = ("accuracy",)
    elif any(name in ENTITY_METRICS for name in metrics):
        check_iob_tags(names)
    if "accuracy" not in metrics:
        metrics = (*metrics, "accuracy")
    name = source.dataset_name or Path(source.train_file or source.validation_file).name
    return TokenTaskData(
        name=name,
        source=source,
        text_columns=(words,),
        label_column=tags,
        label_names=names,
        num_labels=len(names),
        metric_names=metrics,
        raw=raw,
        encode_label=encode,
    )


__all__ = ["TokenTaskData", "load_token_task_data"]
