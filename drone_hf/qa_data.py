"""Your own extractive question-answering data for the `drone-hf` command, in SQuAD's layout (transformers'
`run_qa.py`): rows with `question`, `context` and `answers` (`{"text": [...], "answer_start": [...]}`) in JSON or JSON
Lines, or a Hub dataset.

[`load_qa_task_data`] reads and checks the rows; the [`QATaskData`] it returns tokenises question + context with
character offsets, labels the token span of the first answer (`start_positions`/`end_positions`; the `[CLS]`
position 0 when the answer is cut off), and scores span logits by SQuAD's F1 and exact match of the answer text
(`drone_hf.qa_metrics`). The command keeps **one window per example**: a context longer than `--max-length` tokens
is truncated (no document stride), so an answer beyond the window cannot be predicted and scores 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import DataSource, TaskData
from .data_reading import read_splits
from .qa_metrics import QA_METRICS, SquadExamples, SquadF1Points, qa_metric_name, qa_task_metrics


if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

QA_COLUMNS = ("question", "context", "answers")


class QATaskData(TaskData):
    r"""
    A labelled extractive question-answering task (SQuAD layout). Built by [`load_qa_task_data`]. The metrics score
    the validation rows of the last [`QATaskData.load`] of that split (their contexts and offsets turn span logits
    into answer texts).
    """

    task_type = "question-answering"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._examples: dict[str, SquadExamples] = {}

    @property
    def is_regression(self) -> bool:
        return False

    def load(
        self,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 384,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> datasets.Dataset:
        """Tokenised rows of `split` with `start_positions`/`end_positions` and `offset_mapping` (`[-1, -1]` off the
        context); one window of at most `max_length` tokens per example."""
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "Question answering needs a fast tokenizer (its offset mapping locates answers); the model's "
                f"tokenizer is {type(tokenizer).__name__}."
            )
        rows = self._rows(split, max_samples, seed)
        context_first = getattr(tokenizer, "padding_side", "right") == "left"  # as run_qa.py: question, then context

        def encode(batch: dict[str, list], indices: list[int]) -> Any:
            questions = [str(question).lstrip() for question in batch["question"]]
            contexts = [str(context) for context in batch["context"]]
            pair = (contexts, questions) if context_first else (questions, contexts)
            encoded = tokenizer(
                *pair,
                truncation="only_first" if context_first else "only_second",
                max_length=max_length,
                return_offsets_mapping=True,
            )
            context_id = 0 if context_first else 1
            starts, ends, offsets = [], [], []
            for index, answers in enumerate(batch["answers"]):
                sequence = encoded.sequence_ids(index)
                row = [
                    list(span) if part == context_id else [-1, -1]
                    for span, part in zip(encoded["offset_mapping"][index], sequence)
                ]
                first_char = int(answers["answer_start"][0])
                last_char = first_char + len(answers["text"][0])
                inside = [i for i, (a, b) in enumerate(row) if a >= 0 and a < last_char and b > first_char]
                whole = inside and row[inside[0]][0] <= first_char and row[inside[-1]][1] >= last_char
                starts.append(inside[0] if whole else 0)
                ends.append(inside[-1] if whole else 0)
                offsets.append(row)
            encoded["start_positions"], encoded["end_positions"] = starts, ends
            encoded["offset_mapping"] = offsets
            encoded["example_index"] = list(indices)
            return encoded

        tokenised = rows.map(
            encode, batched=True, with_indices=True, remove_columns=rows.column_names, desc=f"Tokenizing {split} rows"
        )
        self._examples[split] = SquadExamples(
            [str(context) for context in rows["context"]],
            tokenised["offset_mapping"],
            [list(answers["text"]) for answers in rows["answers"]],
        )
        return tokenised

    def examples(self, split: str) -> SquadExamples:
        if split not in self._examples:
            raise ValueError(f"Load the {split} rows (`QATaskData.load`) before scoring them.")
        return self._examples[split]

    def compute_metrics(self, predictions: Any, labels: Any) -> dict[str, float]:
        """SQuAD F1 / exact match (fractions) of span logits `(n, 2, length)` of the validation rows last loaded."""
        examples = self.examples("validation")
        if len(predictions) != len(examples):
            raise ValueError(
                f"{len(predictions)} predictions for the {len(examples)} validation rows last loaded; score the rows "
                "of the last `load('validation', ...)`."
            )
        return qa_task_metrics(self.metric_names, predictions, examples)

    def metric_points(self, batches: Sequence[Mapping] | None = None) -> Callable[[Any, Any], float]:
        """[`SquadF1Points`] of the held-out `batches`: rows of the last `load("train", ...)`, found by the
        `example_index` each batch carries (`drone_hf.evaluation.iter_batches` keeps it), in the batches' order."""
        if self.main_metric != "squad_f1":
            raise ValueError(
                f"`--max-accuracy-drop` is spent on the main metric; {self.main_metric!r} cannot be one (put squad_f1 "
                "first in `--metric`)."
            )
        if batches is None or any("example_index" not in batch for batch in batches):
            raise ValueError("SQuAD F1 as a budget metric needs held-out batches with `example_index`.")
        rows = [int(index) for batch in batches for index in np.asarray(batch["example_index"]).reshape(-1)]
        return SquadF1Points(self.examples("train").subset(rows))


def load_qa_task_data(
    source: DataSource,
    *,
    splits: Sequence[str] = ("train", "validation"),
    model_config: PretrainedConfig | None = None,
) -> QATaskData:
    r"""
    Reads the `splits` of `source` as SQuAD-layout rows and returns the [`QATaskData`] to tokenise and score them.

    Args:
        source ([`DataSource`]): Local JSON/JSONL files or a Hub dataset; `metrics` some of `squad_f1` (alias `f1`),
            `exact_match` (alias `em`); default both, F1 first.
        splits (`Sequence[str]`, *optional*): `"train"` and/or `"validation"`.
        model_config (`PretrainedConfig`, *optional*): Unused (a span head has no label names).

    Raises:
        `ValueError`: for a GLUE task, a missing column (naming those found), a row without an answer (SQuAD v2's
            unanswerable questions are not supported) or whose answer is not at `answer_start` in its context, or a
            metric of another task type.
    """
    if source.task:
        raise ValueError(f"`--task {source.task}` is a GLUE text-classification task, not question answering.")
    if source.text_columns or source.label_column:
        raise ValueError(
            "`--text-columns`/`--label-column` do not apply to question answering: the rows need the columns "
            f"{list(QA_COLUMNS)} (SQuAD layout)."
        )
    raw = read_splits(source, splits)
    for split, rows in raw.items():
        missing = [column for column in QA_COLUMNS if column not in rows.column_names]
        if missing:
            raise ValueError(
                f"The {split} rows have no column {missing} (question answering reads SQuAD-layout rows: question, "
                f"context, answers {{text, answer_start}}); columns found: {rows.column_names}."
            )
        for number, (context, answers) in enumerate(zip(rows["context"], rows["answers"]), start=1):
            texts = list((answers or {}).get("text") or []) if isinstance(answers, Mapping) else None
            starts = list((answers or {}).get("answer_start") or []) if isinstance(answers, Mapping) else None
            if not texts or not starts or len(texts) != len(starts):
                raise ValueError(
                    f"Row {number} of the {split} rows: `answers` must be {{'text': [...], 'answer_start': [...]}} "
                    f"with at least one answer (unanswerable questions are not supported), got {answers!r}."
                )
            start = int(starts[0])
            if str(context)[start : start + len(texts[0])] != texts[0]:
                raise ValueError(
                    f"Row {number} of the {split} rows: the answer {texts[0]!r} is not at `answer_start` {start} of "
                    f"its context (found {str(context)[start : start + len(texts[0])]!r})."
                )
    metrics = tuple(dict.fromkeys(qa_metric_name(name) for name in source.metrics or ())) or QA_METRICS
    name = source.dataset_name or Path(source.train_file or source.validation_file).name
    return QATaskData(
        name=name,
        source=source,
        text_columns=("question", "context"),
        label_column="answers",
        label_names=None,
        num_labels=2,
        metric_names=metrics,
        raw=raw,
    )


__all__ = ["QATaskData", "load_qa_task_data"]
