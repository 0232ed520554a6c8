"""Leaving a caller's model exactly as it was: every module's own train/eval flag, and weights that are really there.

Every public function that runs a caller's model (calibration, held-out evaluation, prediction, latency, the teacher
of a distillation) switches it to eval mode only for the duration of the call, and restores each module's *own*
`training` flag afterwards, even when the call raised. `model.train(was_training)` would not do: it overwrites modes
set per module (embeddings frozen in eval mode, a sub-block in train mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def training_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module of `model` with its `training` flag (restore them with [`restore_training_modes`])."""
    return [(module, module.training) for module in model.modules()]


def restore_training_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Sets each module's `training` flag back to the one recorded by [`training_modes`]."""
    for module, training in modes:
        module.training = training


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Puts `models` in eval mode for the block; afterwards, every module's own mode is as it was before."""
    modes = [entry for model in models for entry in training_modes(model)]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        restore_training_modes(modes)


def copy_training_modes(source: nn.Module, target: nn.Module) -> None:
    """Gives every module of `target` the mode of the module of `source` with the same name, or, for a module that
    `source` does not have (a new factor), the mode of its closest ancestor that it has."""
    modes = {name: module.training for name, module in source.named_modules()}
    for name, module in target.named_modules():
        parent = name
        while parent and parent not in modes:
            parent = parent.rpartition(".")[0]
        module.training = modes.get(parent, source.training)


def check_materialized(model: nn.Module, action: str) -> None:
    """Raises a `ValueError` if a parameter or buffer of `model` is on the meta device (shapes without values).

    Args:
        action (`str`): What needs the values, for the message (e.g. `"calibrate"`).
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [name for name, tensor in tensors if tensor.is_meta]
    if meta:
        raise ValueError(
            f"Cannot {action} a model whose weights are on the meta device ({len(meta)} of {len(tensors)} tensors, "
            f"e.g. `{meta[0]}`): they have shapes but no values. Load real weights first, e.g. "
            "`AutoModelForSequenceClassification.from_pretrained(path)` outside `torch.device('meta')` / "
            "`init_empty_weights()`, or `model.to_empty(device=...)` followed by `load_state_dict`."
        )


__all__ = ["check_materialized", "copy_training_modes", "eval_mode", "restore_training_modes", "training_modes"]
