"""Batched inference and GLUE evaluation of (compressed) classifiers, with length-sorted dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .calibration import MODEL_INPUT_KEYS, model_inputs
from .model_state import eval_mode


if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


def iter_batches(
    dataset: datasets.Dataset | Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int = 32,
    sort_by_length: bool = False,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields padded tensor batches (with `labels` when present) from tokenised rows.

    Args:
        dataset: Rows with `input_ids` (and optionally `token_type_ids`, `labels`), e.g. from [`load_glue`].
        tokenizer: Pads each batch to its longest row.
        batch_size (`int`, *optional*, defaults to 32): Rows per batch.
        sort_by_length (`bool`, *optional*, defaults to `False`): Group rows of similar length (less padding); the
            rows then come out of order, which is fine for calibration and for [`predict`], which restores it.
        shuffle_seed (`int`, *optional*): Shuffle the rows with this seed first.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    order = _order(dataset, sort_by_length, shuffle_seed)
    keep = set(MODEL_INPUT_KEYS) | {"labels", "start_positions", "end_positions", "example_index"}
    for start in range(0, len(order), batch_size):
        rows = [{k: v for k, v in dataset[int(i)].items() if k in keep} for i in order[start : start + batch_size]]
        if rows and isinstance(rows[0].get("labels"), (list, tuple)):  # token labels: padded with -100 like the inputs
            labels = [list(row.pop("labels")) for row in rows]
            batch = tokenizer.pad(rows, return_tensors="pt")
            width = batch["input_ids"].shape[1]
            padding = [[-100] * (width - len(row)) for row in labels]
            left = getattr(tokenizer, "padding_side", "right") == "left"
            padded = [pad + row if left else row + pad for row, pad in zip(labels, padding)]
            batch["labels"] = torch.tensor(padded, dtype=torch.long)
            yield batch
            continue
        yield tokenizer.pad(rows, return_tensors="pt")


def _order(dataset, sort_by_length: bool, shuffle_seed: int | None) -> np.ndarray:
    order = np.arange(len(dataset))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(dataset))
    if sort_by_length:
        lengths = np.array([len(dataset[int(i)]["input_ids"]) for i in order])
        order = order[np.argsort(lengths, kind="stable")]
    return order


@torch.inference_mode()
def predict(
    model: nn.Module, dataset, tokenizer, *, batch_size: int = 64, show_progress: bool | str = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns `(logits, labels)` over `dataset` in its original row order (`labels` is `None` without labels).
    Token classification: logits `(n, length, classes)`, labels `(n, length)` (`-100` on padding); question answering:
    logits `(n, 2, length)` (start, end), labels `(n, 2)` from `start_positions`/`end_positions`.

    `show_progress` shows a progress bar (`transformers.utils.logging.tqdm`, so `disable_progress_bar()` hides it);
    a string is its description."""
    from transformers.utils.logging import tqdm

    if len(dataset) == 0:
        raise ValueError("`dataset` is empty; nothing to evaluate.")
    device = next(model.parameters()).device
    order = _order(dataset, True, None)
    logits, labels = [], []
    batches = iter_batches(dataset, tokenizer, batch_size=batch_size, sort_by_length=True)
    description = show_progress if isinstance(show_progress, str) else "Evaluating"
    total = -(-len(dataset) // batch_size)
    with eval_mode(model):  # every module's own mode is restored afterwards, also if a batch raised
        for batch in tqdm(batches, total=total, desc=description, unit="batch", disable=not show_progress):
            if "labels" in batch:
                labels.append(batch.pop("labels"))
            elif "start_positions" in batch:  # question answering: labels (n, 2), start and end
                labels.append(torch.stack([batch.pop("start_positions"), batch.pop("end_positions")], dim=1))
            inputs = model_inputs(model, batch, device)
            outputs = model(**inputs)
            if getattr(outputs, "start_logits", None) is not None:  # span logits (n, 2, length)
                logits.append(torch.stack([outputs.start_logits, outputs.end_logits], dim=1).float().cpu())
            else:
                logits.append(outputs.logits.float().cpu())
    if getattr(outputs, "start_logits", None) is not None:  # a very negative logit on padding: never the argmax
        width = max(part.shape[2] for part in logits)
        logits = [torch.nn.functional.pad(part, (0, width - part.shape[2]), value=-1e9) for part in logits]
    elif logits[0].dim() == 3:  # token classification: batches padded to a common length (labels with -100)
        width = max(part.shape[1] for part in logits)
        logits = [torch.nn.functional.pad(part, (0, 0, 0, width - part.shape[1])) for part in logits]
        labels = [torch.nn.functional.pad(part, (0, width - part.shape[1]), value=-100) for part in labels]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    all_logits = torch.cat(logits).numpy()[inverse]
    all_labels = torch.cat(labels).numpy()[inverse] if labels else None
    return all_logits, all_labels


def evaluate_glue(
    model: nn.Module, dataset, tokenizer, task: str, *, batch_size: int = 64, show_progress: bool | str = False
) -> dict[str, float]:
    """GLUE metrics of `model` on a tokenised, labelled split (see [`load_glue`] and [`glue_metrics`])."""
    from .glue import glue_metrics

    logits, labels = predict(model, dataset, tokenizer, batch_size=batch_size, show_progress=show_progress)
    if labels is None:
        raise ValueError("`dataset` has no `labels` column: an eval set without labels cannot be scored.")
    return glue_metrics(task, logits, labels)


__all__ = ["evaluate_glue", "iter_batches", "predict"]
