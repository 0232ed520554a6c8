"""The data options of the `drone-hf` command: a GLUE `--task` (the shortcut), a Hub `--dataset-name`, or local
`--train-file` / `--validation-file`, with `--text-columns`, `--label-column` and `--metric`. Each option also takes
the underscore spelling of transformers' example scripts (`--train_file`, `--dataset_name`, `--text_column_names`).

Light on purpose: the parser is built before torch and transformers are imported.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .data import DataSource


def _task(value: str) -> str:
    from .glue_tasks import get_glue_task

    try:
        return get_glue_task(value).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{error} For your own data use --train-file/--validation-file or --dataset-name."
        ) from None


def _data_dir(value: str) -> str:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"`--data-dir` {value!r} is not a folder (expected a GLUE TSV layout).")
    return value


def _add(group, name: str, *aliases: str, **kwargs) -> None:
    """`--name` (shown in `--help`) plus, hidden, its underscore spelling and the `aliases` in both spellings, all
    writing to the same destination."""
    dest = name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, **kwargs)
    hidden = [f"--{dest}"] + [
        f"--{alias.replace(sep, other)}" for alias in aliases for sep, other in (("_", "-"), ("-", "_"))
    ]
    hidden = [option for option in dict.fromkeys(hidden) if option != f"--{name}"]
    group.add_argument(*hidden, dest=dest, **{**kwargs, "help": argparse.SUPPRESS})


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the data options to a `drone-hf` sub-command (see the module docstring)."""
    group = parser.add_argument_group(
        "data (one source: a GLUE --task, a Hub --dataset-name, or local --train-file/--validation-file; every "
        "option also takes its underscore spelling, e.g. --train_file)"
    )
    group.add_argument("--task", type=_task, help="GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    _add(group, "data-dir", type=_data_dir, metavar="DIR", help="local GLUE TSV folder for --task (default: the Hub)")
    _add(group, "dataset-name", metavar="HUB_ID", help="Hub dataset id, e.g. imdb")
    _add(group, "dataset-config-name", metavar="NAME", help="its config name")
    _add(group, "train-file", metavar="FILE", help="training rows: .csv, .tsv, .json or .jsonl")
    _add(group, "validation-file", metavar="FILE", help="validation rows (same formats)")
    _add(group, "train-split-name", metavar="SPLIT", default="train", help="Hub split for training rows")
    _add(group, "validation-split-name", metavar="SPLIT", default="validation", help="Hub split for validation")
    _add(
        group,
        "text-columns",
        "text-column",
        "text-column-names",
        nargs="+",
        metavar="COLUMN",
        help="one or two text columns, e.g. `sentence1 sentence2` or `sentence1,sentence2` (default: a known pair, "
        "`sentence`, `text`, else the one or two columns other than the label); token classification: the column "
        "of word lists (default: tokens)",
    )
    _add(
        group,
        "label-column",
        "label-column-name",
        metavar="COLUMN",
        help="label column (default: label; token classification: the tag lists, default: ner_tags)",
    )
    _add(
        group,
        "metric",
        "metrics",
        "metric-name",
        nargs="+",
        metavar="NAME",
        help="accuracy, f1, mcc, pearson, spearman (first = main metric; default: accuracy, or pearson + spearman "
        "for numeric labels); token classification: seqeval-f1 (entity F1 over IOB tags; also seqeval-precision, "
        "seqeval-recall) and accuracy (token accuracy); default: seqeval-f1 + accuracy; question answering: "
        "squad-f1 (alias f1) and exact-match (em)",
    )


def _split(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


def data_source_from_args(args: argparse.Namespace) -> DataSource:
    """The [`~data.DataSource`] of parsed `drone-hf` arguments.

    Raises:
        `ValueError`, `FileNotFoundError`: see [`~data.DataSource`].
    """
    from .data import DataSource

    return DataSource(
        task=args.task,
        data_dir=args.data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_file=args.train_file,
        validation_file=args.validation_file,
        train_split=args.train_split_name,
        validation_split=args.validation_split_name,
        text_columns=_split(args.text_columns),
        label_column=args.label_column,
        metrics=_split(args.metric),
    )


__all__ = ["add_data_arguments", "data_source_from_args"]
