"""GLUE benchmark: the nine tasks from the Hub or from local GLUE TSV folders, tokenised, plus offline metrics.

This module loads the data; the task registry lives in `glue_tasks.py` and the metrics in `glue_metrics.py`, and
their public names are re-exported here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers.utils import logging

# Names imported `as` themselves were defined here before the GLUE code was split; they stay importable from here.
from .glue_metrics import glue_compute_metrics as glue_compute_metrics
from .glue_metrics import glue_metric_points as glue_metric_points
from .glue_metrics import glue_metrics as glue_metrics
from .glue_tasks import GLUE_HUB_ID, GlueTask, _normalise, get_glue_task
from .glue_tasks import GLUE_TASK_INFO as GLUE_TASK_INFO
from .glue_tasks import GLUE_TASKS as GLUE_TASKS


if TYPE_CHECKING:
    import datasets
    import pandas as pd
    from transformers import PreTrainedTokenizerBase

logger = logging.get_logger(__name__)


def _require_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "drone_hf.glue requires `datasets` (the `glue` extra): pip install -e '.[glue]' in your drone_hf clone"
        ) from err
    return datasets


def _resolve_split(info: GlueTask, split: str) -> str:
    split_name = dict(info.split_aliases).get(split, split) if isinstance(split, str) else None
    if split_name not in dict(info.local_files):
        raise ValueError(f"Unknown split `{split}` for GLUE task `{info.name}`; expected one of {list(info.splits)}.")
    return split_name


def _check_positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _task_folder(info: GlueTask, data_dir: str | Path) -> tuple[Path, list[Path]]:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"GLUE `data_dir` {str(root)!r} does not exist or is not a directory; expected a GLUE root folder "
            f"containing `{info.local_dir}/` or the `{info.local_dir}` folder itself (files: "
            f"{[name for _, name in info.local_files]})."
        )
    candidates = [root / info.local_dir] + [c for c in sorted(root.iterdir()) if _normalise(c.name) == info.name]
    for folder in candidates:
        if folder.is_dir():
            return folder, [folder]
    return root, [root / info.local_dir, root]


def _parse_labels(info: GlueTask, raw: pd.Series, path: Path) -> np.ndarray:
    import pandas as pd

    values = raw.str.strip()
    if info.is_regression:
        scores = pd.to_numeric(values, errors="coerce")
        bad = values[scores.isna()].unique().tolist()
        if bad:
            raise ValueError(f"GLUE stsb file {path} has non-numeric `{info.tsv_label_column}` values {bad[:5]}")
        return scores.to_numpy(dtype=np.float32)
    lookup = {name: i for i, name in enumerate(info.label_names)} | {str(i): i for i in range(info.num_labels)}
    codes = values.map(lookup)
    bad = values[codes.isna()].unique().tolist()
    if bad:
        raise ValueError(
            f"GLUE {info.name} file {path} has unknown `{info.tsv_label_column}` values {bad[:5]}; "
            f"expected one of {list(lookup)}."
        )
    return codes.to_numpy(dtype=np.int64)


def _read_local(info: GlueTask, split: str, data_dir: str | Path) -> pd.DataFrame:
    import pandas as pd

    folder, searched = _task_folder(info, data_dir)
    file_name = dict(info.local_files)[split]
    path = folder / file_name
    if not path.is_file():
        where = " or ".join(str(p / file_name) for p in searched)
        raise FileNotFoundError(
            f"GLUE {info.name} split `{split}` not found: expected {where}. GLUE {info.name} files are "
            f"{dict(info.local_files)}; found {sorted(p.name for p in folder.glob('*.tsv')) or 'no .tsv files'}."
        )
    names = info.tsv_column_names
    if names is not None:  # header-less (CoLA train/dev); GLUE's CoLA test.tsv has an `index\tsentence` header
        with open(path, encoding="utf-8-sig") as handle:
            names = None if handle.readline().split("\t", 1)[0] == "index" else names
    read_kwargs = {"header": None, "names": list(names)} if names else {"header": 0}
    try:  # settings from the GLUE README: fields hold unbalanced quotes, so quoting must be off
        frame = pd.read_csv(
            path,
            sep="\t",
            quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig",
            dtype=str,
            keep_default_na=False,
            **read_kwargs,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"Could not parse GLUE {info.name} file {path} as tab-separated GLUE data: {err}") from err

    is_test = split.startswith("test")
    required = list(info.tsv_text_columns) + ([] if is_test else [info.tsv_label_column])
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(
            f"GLUE {info.name} file {path} lacks column(s) {missing}; expected {required}, found "
            f"{list(frame.columns)}. Does `data_dir` point at the {info.local_dir} data?"
        )
    out = pd.DataFrame({key: frame[col].fillna("") for key, col in zip(info.text_keys, info.tsv_text_columns)})
    out["idx"] = np.arange(len(frame), dtype=np.int32)
    if info.tsv_label_column not in frame.columns:  # unlabelled test file: -1 as on the Hub
        out["label"] = np.full(len(frame), -1, dtype=np.float32 if info.is_regression else np.int64)
        return out
    if info.name == "mnli":
        # The number of `labelN` columns varies between files and rows; a row's gold label is its last field,
        # and pandas leaves the missing trailing fields of a short row empty.
        label_columns = list(frame.columns[frame.columns.get_loc(info.tsv_text_columns[-1]) + 1 :])
        raw = frame[label_columns].replace("", np.nan).ffill(axis=1).iloc[:, -1].fillna("")
    else:
        raw = frame[info.tsv_label_column].fillna("")
    keep = (raw.str.strip() != "").to_numpy()
    if not keep.all():
        skipped = np.flatnonzero(~keep)
        logger.warning(f"Skipping {len(skipped)} row(s) without a label in {path} (idx {skipped[:5].tolist()}).")
    out = out[keep].reset_index(drop=True)
    out["label"] = _parse_labels(info, raw[keep], path)
    return out


def load_glue_split(
    task: str, split: str, *, data_dir: str | Path | None = None, max_samples: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """Load one split of a GLUE task, untokenised, from the Hub or from a local folder in the GLUE TSV layout.

    Local files are read exactly (tab-separated, quoting off, UTF-8 with optional BOM) and returned with the same
    columns, label ids and features as the Hub dataset `nyu-mll/glue`, so that code is source-agnostic. Local rows
    without a label are skipped with a warning; unlabelled test files get label `-1`, as on the Hub.

    Args:
        task: GLUE task name (see [`get_glue_task`]).
        split: `"train"`, `"validation"` or `"test"`; for MNLI also `"validation_matched"`,
            `"validation_mismatched"`, `"test_matched"`, `"test_mismatched"` (`"validation"`/`"test"` mean matched).
        data_dir: `None` to download from the Hub, else a GLUE root folder holding the task folders (`SST-2/`, ...)
            or the task folder itself.
        max_samples: If set, a random subset of at most this many rows, drawn deterministically from `seed` and
            kept in file order (the subset for a smaller `max_samples` is contained in that for a larger one).
        seed: Seed for the `max_samples` subset.

    Returns:
        `datasets.Dataset` with the task's `text_keys`, `"label"` (`ClassLabel` int64, or float32 for STS-B) and
        `"idx"` (row number in the split).

    Raises:
        ValueError: Unknown task or split, bad `max_samples`/`seed`, malformed local file.
        FileNotFoundError: `data_dir` or the split's file does not exist.
        ImportError: `datasets` is not installed.

    Example:
        >>> dev = load_glue_split("mrpc", "validation", data_dir="glue_data")
        >>> dev.column_names
        ['sentence1', 'sentence2', 'label', 'idx']
    """
    info = get_glue_task(task)
    split_name = _resolve_split(info, split)
    _check_positive_int("max_samples", max_samples, allow_none=True)
    _check_positive_int("seed", seed, minimum=0)
    datasets = _require_datasets()
    if data_dir is None:
        try:
            dataset = datasets.load_dataset(GLUE_HUB_ID, info.name, split=split_name)
        except Exception as err:
            err.add_note(
                f"drone_hf: loading GLUE `{info.name}` split `{split_name}` from the Hub ({GLUE_HUB_ID}) failed. "
                f"Offline, pass `data_dir=` (`--data-dir` on the command line) pointing to GLUE TSV data (a folder "
                f"containing `{info.local_dir}/`)."
            )
            raise
        dataset = dataset.select_columns([*info.text_keys, "label", "idx"])
    else:
        frame = _read_local(info, split_name, data_dir)
        features = datasets.Features({key: datasets.Value("string") for key in info.text_keys})
        features["label"] = (
            datasets.Value("float32") if info.is_regression else datasets.ClassLabel(names=list(info.label_names))
        )
        features["idx"] = datasets.Value("int32")
        dataset = datasets.Dataset.from_pandas(frame[list(features)], features=features, preserve_index=False)
    if max_samples is not None and max_samples < len(dataset):
        indices = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:max_samples])
        dataset = dataset.select(indices.tolist())
    return dataset


def load_glue(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "train",
    data_dir: str | Path | None = None,
    max_length: int = 128,
    max_samples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Load a GLUE split (see [`load_glue_split`]) and tokenise it, ready for `Trainer` + `DataCollatorWithPadding`.

    Texts are encoded with `tokenizer(text_a, text_b, truncation=True, max_length=max_length)` without padding.
    The raw text columns and `"idx"` are removed and `"label"` is renamed `"labels"`, so a batch can be passed to a
    model as `model(**batch)`. Use [`load_glue_split`] with the same arguments for the matching texts and `idx`.

    Args:
        task: GLUE task name.
        tokenizer: A Transformers tokenizer.
        split: Split name, as in [`load_glue_split`].
        data_dir: `None` for the Hub, else a local GLUE TSV folder.
        max_length: Maximum number of tokens per example (pairs are truncated longest-first).
        max_samples: Optional deterministic random subset size.
        seed: Seed for the subset.

    Returns:
        `datasets.Dataset` with the tokenizer outputs (`input_ids`, `attention_mask`, and `token_type_ids` where the
        tokenizer makes them) and `"labels"`.

    Raises:
        ValueError: Bad argument (see [`load_glue_split`]) or `max_length` < 1.
        FileNotFoundError: Missing local data.

    Example:
        >>> train = load_glue("sst2", tokenizer, data_dir="glue_data", max_samples=1000)
        >>> trainer = Trainer(model, args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
    """
    _check_positive_int("max_length", max_length)
    if not callable(tokenizer):
        raise ValueError(f"`tokenizer` must be a callable Transformers tokenizer, got {type(tokenizer).__name__}.")
    info = get_glue_task(task)
    dataset = load_glue_split(info, split, data_dir=data_dir, max_samples=max_samples, seed=seed)

    def encode(batch: dict[str, list]) -> Any:
        texts = [batch[key] for key in info.text_keys]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    dataset = dataset.map(
        encode, batched=True, remove_columns=[*info.text_keys, "idx"], desc=f"Tokenizing GLUE {info.name} {split}"
    )
    return dataset.rename_column("label", "labels")
