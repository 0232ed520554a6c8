"""GLUE benchmark: the nine tasks from the Hub or from local GLUE TSV folders, tokenised, plus offline metrics."""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers.utils import logging


if TYPE_CHECKING:
    import datasets
    import pandas as pd
    from transformers import EvalPrediction, PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

GLUE_HUB_ID = "nyu-mll/glue"
GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")

_DEFAULT_FILES = (("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))
_MNLI_FILES = (("train", "train.tsv"), ("validation_matched", "dev_matched.tsv"),
               ("validation_mismatched", "dev_mismatched.tsv"), ("test_matched", "test_matched.tsv"),
               ("test_mismatched", "test_mismatched.tsv"))
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
        name=name, text_keys=text_keys, num_labels=len(label_names) if label_names else 1,
        is_regression=label_names is None, label_names=label_names, local_dir=local_dir,
        tsv_text_columns=tsv_text_columns, tsv_label_column=tsv_label_column, **kwargs,
    )


_NLI = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")
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


def _require_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("drone_hf.glue requires `datasets`: pip install drone_hf[glue]") from err
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
            path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig", dtype=str, keep_default_na=False,
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
                f"Offline, pass `data_dir=` pointing to GLUE TSV data (a folder containing `{info.local_dir}/`)."
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


def _as_array(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"`{name}` must be numeric, got dtype {array.dtype}.")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"`{name}` contains {bad} NaN/inf value(s); expected finite values.")
    return array


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """Compute the official GLUE metrics of a task offline (scikit-learn/scipy), as floats on a 0-1 scale.

    Accuracy for all classification tasks, plus binary F1 (positive class 1) for MRPC/QQP, Matthews correlation
    for CoLA, Pearson and Spearman correlations for STS-B; `combined_score` is the mean of the task's metrics.

    Args:
        task: GLUE task name.
        predictions: Logits of shape `(n, num_labels)` or class ids of shape `(n,)`; for STS-B scores `(n,)`/`(n, 1)`.
        labels: Gold labels, shape `(n,)`.

    Returns:
        `dict` mapping each of the task's `metric_names` to a `float` (STS-B correlations are NaN for constant
        predictions).

    Raises:
        ValueError: Unknown task, labels of an unlabelled (test) set (`-1`), shape/length mismatch, non-finite values,
            class ids out of range.

    Example:
        >>> glue_metrics("mrpc", [[0.1, 0.9], [2.0, -1.0]], [1, 1])
        {'accuracy': 0.5, 'f1': 0.6666666666666666, 'combined_score': 0.5833333333333333}
    """
    info = get_glue_task(task)
    preds, golds = _as_array("predictions", predictions), _as_array("labels", labels)
    if golds.ndim == 2 and golds.shape[1] == 1:
        golds = golds[:, 0]
    if golds.ndim != 1 or len(golds) == 0:
        raise ValueError(f"`labels` must be a non-empty 1-D array, got shape {golds.shape}.")
    if (golds == -1).any():
        raise ValueError(
            f"Cannot compute GLUE {info.name} metrics on an eval set without labels: `labels` has "
            f"{int((golds == -1).sum())} value(s) of -1 (the Hub's placeholder for unlabelled test rows)."
        )
    if len(preds) != len(golds):
        raise ValueError(f"`predictions` has {len(preds)} rows but `labels` has {len(golds)}; they must match.")
    if info.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1 or len(preds) < 2:
            raise ValueError(f"STS-B `predictions` must have shape (n,) or (n, 1) with n >= 2, got {preds.shape}.")
        from scipy.stats import pearsonr, spearmanr

        with warnings.catch_warnings():  # constant input: scipy warns and returns NaN
            warnings.simplefilter("ignore")
            result = {"pearson": float(pearsonr(preds, golds)[0]), "spearmanr": float(spearmanr(preds, golds)[0])}
        if np.isnan(result["pearson"]):
            logger.warning("STS-B correlations are undefined (NaN) for constant predictions or labels.")
    else:
        if preds.ndim == 2 and preds.shape[1] == info.num_labels:
            preds = preds.argmax(axis=-1)
        elif preds.ndim != 1:
            raise ValueError(
                f"GLUE {info.name} `predictions` must be logits of shape (n, {info.num_labels}) or class ids of "
                f"shape (n,), got shape {preds.shape}."
            )
        for name, values in (("predictions", preds), ("labels", golds)):
            if (values != np.round(values)).any() or values.min() < 0 or values.max() >= info.num_labels:
                raise ValueError(f"GLUE {info.name} `{name}` class ids must be integers in [0, {info.num_labels}).")
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        preds, golds = preds.astype(np.int64), golds.astype(np.int64)
        scorers = {
            "accuracy": lambda: accuracy_score(golds, preds),
            "f1": lambda: f1_score(golds, preds, pos_label=1, average="binary", zero_division=0.0),
            "matthews_correlation": lambda: matthews_corrcoef(golds, preds),
        }
        result = {name: float(scorers[name]()) for name in info.metric_names if name in scorers}
    if "combined_score" in info.metric_names:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def glue_compute_metrics(task: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """Build a `compute_metrics` function for `Trainer` that returns [`glue_metrics`] of the task.

    Args:
        task: GLUE task name (validated immediately).

    Returns:
        A function taking an `EvalPrediction` (or a `(predictions, label_ids)` tuple). If the model returns several
        outputs (tuple predictions), the first one (the logits) is used.

    Raises:
        ValueError: Unknown task; when called, an eval set without labels or invalid predictions.

    Example:
        >>> trainer = Trainer(model, args, eval_dataset=dev, compute_metrics=glue_compute_metrics("cola"))
    """
    info = get_glue_task(task)

    def compute_metrics(eval_pred: EvalPrediction | tuple) -> dict[str, float]:
        if hasattr(eval_pred, "predictions"):
            predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        else:
            predictions, label_ids = eval_pred
        if isinstance(predictions, tuple) and predictions and np.ndim(predictions[0]) >= 1:
            predictions = predictions[0]  # (logits, hidden_states, ...)
        if label_ids is None:
            raise ValueError(f"Cannot compute GLUE {info.name} metrics on an eval set without labels (no label_ids).")
        return glue_metrics(info, predictions, label_ids)

    return compute_metrics
