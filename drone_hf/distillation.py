"""Feature distillation of a factored student from its dense teacher (Ben Noach & Goldberg, AACL 2020).

The loss lives in `DroneDistillationTrainer.compute_loss` (a callback cannot change the loss); [`distill`] is the one
function the callback, scripts and notebooks call. Training runs on `Trainer`, hence on accelerate: `accelerate
launch`/`torchrun` give data-parallel distillation with no extra code.

The loss terms themselves (pure tensor math) are in `distillation_losses.py`, and re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import is_datasets_available, logging

from .arguments import DroneDistillationArguments
from .distillation_losses import distillation_loss, hidden_state_mse
from .layers import balance_factor_pairs_
from .model_state import restore_training_modes, training_modes
from .teacher_cache import TeacherOutputCache


if is_datasets_available():
    import datasets

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

# The label of a training row that only the teacher teaches (e.g. augmented text): it takes no task term. The same
# value as `torch.nn.CrossEntropyLoss`'s `ignore_index` and the collators' padding label.
UNLABELLED = -100

# A copied base TrainingArguments must not evaluate, checkpoint, push or resume: distillation is one inner stage.
_INNER_STAGE = {
    "save_strategy": "no",
    "eval_strategy": "no",
    "load_best_model_at_end": False,
    "metric_for_best_model": None,
    "push_to_hub": False,
    "do_eval": False,
    "do_predict": False,
    "resume_from_checkpoint": None,
}


def check_distillation_compatibility(
    student: nn.Module,
    teacher: nn.Module,
    *,
    hidden_layers: str | Sequence[int] | None = "all",
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Checks that `teacher` can teach `student`: the same input ids (vocabulary), the same labels and, when
    `hidden_layers` is not `None`, the same hidden size and number of layers.

    Raises:
        `ValueError`: naming what differs.
    """
    if student is teacher:
        raise ValueError("`teacher_model` is the student itself; pass the dense model as teacher.")
    s, t = getattr(student, "config", None), getattr(teacher, "config", None)
    if s is None or t is None:
        raise TypeError("`model` and `teacher_model` must be transformers models with a `config`.")
    if s.vocab_size != t.vocab_size:
        raise ValueError(
            f"`teacher_model` and `model` have different vocabularies (`vocab_size` {t.vocab_size} vs {s.vocab_size})"
            ": both read the same input_ids, so they must share one tokenizer."
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError(
                "`processing_class` and `teacher_processing_class` have different vocabularies "
                f"({len(student_tokenizer)} vs {len(teacher_tokenizer)} tokens): the teacher would read ids from "
                "another tokenizer."
            )
    for tokenizer in (student_tokenizer, teacher_tokenizer):
        if tokenizer is not None and hasattr(tokenizer, "__len__") and len(tokenizer) > s.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the models' `vocab_size` is {s.vocab_size}: "
                "it is not the models' tokenizer."
            )
    if s.num_labels != t.num_labels:
        raise ValueError(f"`teacher_model` has `num_labels={t.num_labels}`, `model` has `num_labels={s.num_labels}`.")
    if hidden_layers is None:
        return
    for name in ("hidden_size", "num_hidden_layers"):
        if getattr(s, name) != getattr(t, name):
            raise ValueError(
                f"Hidden-state distillation needs the same `{name}` (teacher {getattr(t, name)}, student "
                f"{getattr(s, name)}); set `alpha_hidden=0` to distil the logits only."
            )
    if hidden_layers != "all":
        bad = [i for i in hidden_layers if not 0 <= i <= t.num_hidden_layers]
        if bad:
            raise ValueError(
                f"`hidden_layers` {bad} out of range: indices go from 0 (embeddings) to {t.num_hidden_layers}."
            )


class DroneDistillationTrainer(Trainer):
    r"""
    [`~transformers.Trainer`] whose loss distils a frozen `teacher_model` into the trained model (see
    [`distillation_loss`]): hidden-state MSE + softened-logit KL + task loss, weighted by `distillation_args`.

    The teacher is frozen (`requires_grad=False`), kept in eval mode, moved to the training device and run under
    `torch.no_grad()` and the training's mixed precision (`bf16=True` / `fp16=True` autocast, as the student); with
    `distillation_args.cache_teacher_outputs` it runs once, before the first step (`drone_hf.teacher_cache`). With
    `distillation_args.balance_factors` (the default) the student's factor pairs are balanced in place first
    ([`DroneLinear.balance_`]: the same function, factors that train evenly). Use [`distill`] for the common case; it
    also restores the teacher's flags afterwards.

    Args:
        model (`PreTrainedModel`): The student (e.g. from [`compress_model`]).
        args (`TrainingArguments`): As for `Trainer`.
        teacher_model (`PreTrainedModel`): The dense teacher.
        distillation_args ([`DroneDistillationArguments`], *optional*): Loss weights, temperature and layers (its
            schedule fields are not read here: `args` holds the schedule).
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*): The teacher's tokenizer, checked against
            `processing_class`.
        **kwargs: Passed to `Trainer` (`train_dataset`, `data_collator`, `processing_class`, `callbacks`, ...).

    Raises:
        `ValueError`: for teacher and student with different vocabularies, labels or (for `alpha_hidden > 0`)
            shapes.

    Example:

    ```py
    >>> trainer = DroneDistillationTrainer(model=student, args=training_args, teacher_model=teacher,  # doctest: +SKIP
    ...                                    train_dataset=train, processing_class=tokenizer)
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    # compute_loss returns a per-batch mean: Trainer must divide it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        args: TrainingArguments | None = None,
        *,
        teacher_model: PreTrainedModel,
        distillation_args: DroneDistillationArguments | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        if model is None:
            raise ValueError("`model` (the student) is required; `model_init` is not supported for distillation.")
        settings = distillation_args if distillation_args is not None else DroneDistillationArguments()
        if not isinstance(settings, DroneDistillationArguments):
            raise TypeError(f"`distillation_args` must be DroneDistillationArguments, got {type(settings).__name__}.")
        check_distillation_compatibility(
            model,
            teacher_model,
            hidden_layers=settings.hidden_layers if settings.alpha_hidden > 0 else None,
            student_tokenizer=kwargs.get("processing_class"),
            teacher_tokenizer=teacher_processing_class,
        )
        if settings.balance_factors:  # before the optimiser exists; the student computes the same function
            balance_factor_pairs_(model)
        super().__init__(model=model, args=args, **kwargs)
        self.distillation_args = settings
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        if self.place_model_on_device:
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model
        self._regression = model.config.num_labels == 1
        self._loss_sums: dict[str, float] = defaultdict(float)
        self._loss_batches = 0
        self.teacher_cache: TeacherOutputCache | None = None
        self.teacher_cache_seconds: float | None = None

    def build_teacher_cache(self) -> TeacherOutputCache:
        """Runs the teacher once over every training row (the trainer's collator, unused columns removed, no
        sharding: each process caches every row) and keeps its outputs ([`TeacherOutputCache`]); `train` calls this
        when `distillation_args.cache_teacher_outputs` is set."""
        settings = self.distillation_args
        dataset, collator = self.train_dataset, self.data_collator
        if is_datasets_available() and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="teacher cache")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="teacher cache")
        batches = DataLoader(dataset, batch_size=self.args.per_device_train_batch_size, collate_fn=collator)
        started = time.perf_counter()
        with self.accelerator.autocast():  # the same precision as the per-batch teacher forward it replaces
            cache = TeacherOutputCache.build(
                self.teacher_model,
                batches,
                layers=settings.hidden_layers if settings.alpha_hidden > 0 else None,
                dtype=settings.teacher_cache_dtype,
                device=self.args.device,
            )
        self.teacher_cache_seconds = time.perf_counter() - started
        logger.info(
            f"Cached the teacher's outputs on {len(cache)} training rows in {self.teacher_cache_seconds:.1f} s "
            f"({cache.nbytes / 2**20:.0f} MiB)."
        )
        return cache

    def train(self, *args, **kwargs):
        """`Trainer.train`, after building the teacher cache when `distillation_args.cache_teacher_outputs`."""
        if self.distillation_args.cache_teacher_outputs and self.teacher_cache is None:
            self.teacher_cache = self.build_teacher_cache()
        return super().train(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Distillation loss of one batch (`num_items_in_batch` is not used: the loss is a per-batch mean)."""
        settings = self.distillation_args
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if settings.alpha_task > 0 and labels is None:
            raise ValueError("`alpha_task` > 0 needs `labels` in the training batches; without labels use 0.")
        need_hidden = settings.alpha_hidden > 0
        # Sequence-level class labels with unlabelled rows: the task term is the cross-entropy of the labelled rows
        # only (the model's own loss would be NaN for a batch of unlabelled rows), 0 for a batch without any.
        mixed = (
            settings.alpha_task > 0
            and not self._regression
            and labels.dim() == 1
            and not labels.is_floating_point()
            and bool((labels == UNLABELLED).any())
        )
        student_inputs = {**inputs, "labels": labels} if settings.alpha_task > 0 and not mixed else inputs
        outputs = model(**student_inputs, output_hidden_states=need_hidden)
        task_loss = None
        if mixed:
            task_loss = _labelled_cross_entropy(outputs.logits, labels)
        elif settings.alpha_task > 0:
            task_loss = outputs.loss
        if self.teacher_cache is not None:
            teacher_outputs = self.teacher_cache.lookup(inputs)
        else:
            self.teacher_model.eval()
            # The teacher is not prepared by accelerate, so without this its forward would run in float32 under
            # `bf16=True` / `fp16=True` (on a CPU with bf16 tiles, about 3x slower than in bf16).
            with torch.no_grad(), self.accelerator.autocast():
                teacher_outputs = self.teacher_model(**inputs, output_hidden_states=need_hidden)
        loss, parts = distillation_loss(
            outputs.logits,
            teacher_outputs.logits,
            student_hidden_states=outputs.hidden_states,
            teacher_hidden_states=teacher_outputs.hidden_states,
            attention_mask=inputs.get("attention_mask"),
            task_loss=task_loss,
            regression=self._regression,
            **settings.loss_kwargs(),
        )
        if model.training:
            for name, value in parts.items():
                self._loss_sums[name] += float(value.detach())
            self._loss_batches += 1
        if return_outputs:
            # Hidden states are dropped so that evaluation gathers logits only.
            return loss, SequenceClassifierOutput(loss=loss.detach(), logits=outputs.logits)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean unweighted loss parts since the last log (`loss_hidden`, `loss_kl`, `loss_task`)."""
        if "loss" in logs and self._loss_batches:
            for name, total in self._loss_sums.items():
                logs[f"loss_{name}"] = round(total / self._loss_batches, 6)
            self._loss_sums.clear()
            self._loss_batches = 0
        super().log(logs, start_time)


def _labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose label is not `UNLABELLED`; a zero that keeps the graph when none is."""
    labelled = labels != UNLABELLED
    if not labelled.any():
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits[labelled], labels[labelled])


def _training_arguments(args, training_args: TrainingArguments | None):
    """Returns `(loss settings, copied TrainingArguments)` for [`distill`]."""
    if isinstance(args, DroneDistillationArguments):
        base = training_args if training_args is not None else TrainingArguments(output_dir="drone_distillation")
        if not isinstance(base, TrainingArguments):
            raise TypeError(f"`training_args` must be a TrainingArguments, got {type(base).__name__}.")
        overrides = {**_INNER_STAGE, **args.training_overrides()}
        return args, dataclasses.replace(base, output_dir=os.path.join(base.output_dir, "distillation"), **overrides)
    if isinstance(args, TrainingArguments):
        if training_args is not None:
            raise ValueError("Pass `training_args` only with DroneDistillationArguments; `args` already is one.")
        copied = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, "distillation"))
        return DroneDistillationArguments(), copied
    raise TypeError(f"`args` must be a DroneDistillationArguments or a TrainingArguments, got {type(args).__name__}.")


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    train_dataset,
    args: DroneDistillationArguments | TrainingArguments,
    *,
    training_args: TrainingArguments | None = None,
    data_collator=None,
    processing_class: PreTrainedTokenizerBase | None = None,
    teacher_processing_class: PreTrainedTokenizerBase | None = None,
    callbacks: list | None = None,
) -> PreTrainedModel:
    r"""
    Recovers a compressed `student` by feature distillation from the dense `teacher` on `train_dataset`
    (docs/methods.md §2), with [`DroneDistillationTrainer`]; returns the same `student`, trained, in eval mode.

    The training arguments are a **copy** with its own `output_dir` subfolder (`<output_dir>/distillation`):
    - `args` a [`DroneDistillationArguments`]: the loss and schedule come from it; the rest (device, precision,
      dataloader and distributed settings) from `training_args` (e.g. the outer `Trainer`'s) or the defaults;
      evaluation, checkpointing and Hub pushes are off, and `report_to` is `"none"` unless set in `args`.
    - `args` a `TrainingArguments`: used as is (copied into the subfolder), with the default loss settings.

    Runs on `Trainer`, so under `accelerate launch`/`torchrun` it is data-parallel. The teacher's `requires_grad`
    flags and train/eval mode are restored on return.

    Args:
        student (`PreTrainedModel`): The model to train (e.g. from [`compress_model`]).
        teacher (`PreTrainedModel`): The dense model; frozen during distillation.
        train_dataset: Training rows (labels are needed only when `alpha_task > 0`; a class label of -100 marks a row
            that the teacher alone teaches).
        args ([`DroneDistillationArguments`] or `TrainingArguments`): See above.
        training_args (`TrainingArguments`, *optional*): Base to copy when `args` is a [`DroneDistillationArguments`].
        data_collator (*optional*): Defaults to `Trainer`'s (padding with `processing_class` when given).
        processing_class (`PreTrainedTokenizerBase`, *optional*): The tokenizer both models read.
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*): The teacher's tokenizer, if it was saved
            separately: checked to have the same vocabulary.
        callbacks (`list[TrainerCallback]`, *optional*): Passed to the trainer.

    Returns:
        `PreTrainedModel`: `student`, distilled.

    Raises:
        `ValueError`: for a missing or empty `train_dataset`, or teacher and student that are incompatible
            (vocabulary/tokenizer, labels, shapes for the hidden-state term).

    Example:

    ```py
    >>> student = drone_hf.compress_model(teacher, stats, rank=64)  # doctest: +SKIP
    >>> drone_hf.distill(student, teacher, train, DroneDistillationArguments(max_steps=300),  # doctest: +SKIP
    ...                  processing_class=tokenizer)
    ```
    """
    if train_dataset is None:
        raise ValueError("Distillation needs a `train_dataset` (the task's training rows); got None.")
    if hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("`train_dataset` is empty; distillation needs training rows.")
    settings, training = _training_arguments(args, training_args)
    created = not os.path.exists(training.output_dir)
    requires_grad = [p.requires_grad for p in teacher.parameters()]
    modes = training_modes(teacher)  # every module's own mode, restored on return
    try:
        trainer = DroneDistillationTrainer(
            model=student,
            args=training,
            teacher_model=teacher,
            distillation_args=settings,
            teacher_processing_class=teacher_processing_class,
            train_dataset=train_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        result = trainer.train()
        logger.info(f"Distilled for {result.global_step} steps (final training loss {result.training_loss:.4f}).")
    finally:
        for parameter, flag in zip(teacher.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        restore_training_modes(modes)
        if created:  # Trainer creates its output_dir even when it writes nothing there
            with contextlib.suppress(OSError):
                os.rmdir(training.output_dir)
    return student.eval()


__all__ = [
    "DroneDistillationTrainer",
    "check_distillation_compatibility",
    "distill",
    "distillation_loss",
    "hidden_state_mse",
]
