"""`DroneCompressionCallback`: compress (and optionally distil) the fine-tuned model when `Trainer.train` ends."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import DataCollatorWithPadding, TrainerCallback, default_data_collator
from transformers.utils import logging

from .arguments import DroneCompressionArguments, DroneDistillationArguments
from .calibration import MODEL_INPUT_KEYS, collect_activation_stats
from .compress import compress_model
from .deployment import check_deployment, deployed_copy, describe_deployment, prepare_for_deployment
from .heldout import count_rows


if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments

logger = logging.get_logger(__name__)
_ROW_KEYS = (*MODEL_INPUT_KEYS, "labels", "label")
_LATENCY_BATCH, _LATENCY_SEQ_LEN = 8, 128


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _has_labels(dataset) -> bool:
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        key = "labels" if "labels" in columns else "label" if "label" in columns else None
        return key is not None and bool((np.asarray(dataset[key]) != -1).any())
    first = dataset[0] if len(dataset) else {}
    return any(key in first and np.all(np.asarray(first[key]) != -1) for key in ("labels", "label"))


def _take_rows(batches: Iterable[Mapping[str, Any]], *counts: int) -> list[list[dict[str, Any]]]:
    """Splits the first `sum(counts)` rows of `batches`, in one pass, into consecutive groups of `counts` rows (edge
    batches are cut), so the groups are disjoint even when the loader reshuffles on every pass."""
    groups: list[list[dict[str, Any]]] = [[] for _ in counts]
    bounds = np.cumsum([0, *counts])
    seen = 0
    for batch in batches:
        size = len(batch["input_ids"])
        for group, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
            start, stop = max(low - seen, 0), min(high - seen, size)
            if start < stop:
                groups[group].append(
                    {k: v[start:stop] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
                )
        seen += size
        if seen >= bounds[-1]:
            break
    return groups


class DroneCompressionCallback(TrainerCallback):
    r"""
    Compresses the fine-tuned model with DRONE when training ends, optionally recovers it by feature distillation,
    evaluates dense vs compressed, and saves a reloadable checkpoint with tokenizer and model card. A thin wrapper over
    [`collect_activation_stats`], [`compress_model`], [`distill`] and `create_or_update_model_card`: call those
    directly in custom loops.

    - `on_train_begin` validates everything that can fail (BERT classifier, target modules, ranks/budget, training
      rows for distillation, labels of the eval set), so bad settings raise before the first training step.
    - `on_train_end` runs **after** `load_best_model_at_end` has restored the best checkpoint (transformers 5.23
      calls `_load_best_model` before `callback_handler.on_train_end`). It calibrates on
      `num_calibration_samples` training rows (from `calibration_dataloader`, else a seeded choice of rows of
      `train_dataset`, else the first rows of the trainer's train dataloader), compresses, optionally distils, and
      evaluates on `eval_dataset`.
    - `trainer.model` is neither replaced nor modified. Results are the attributes `compressed_model` (distilled if
      distillation ran), `compressed_model_path` and `metrics` (`{"dense": {...}, "compressed": {...},
      "compressed+distilled": {...}}`, fractions as from `glue_metrics`), also logged and appended to
      `state.log_history`.
    - Under several processes (`accelerate launch`, `torchrun`) every process calibrates on its own shard and the
      statistics are summed; the compressed model is built on process zero, and on every process when distillation
      runs (data-parallel, ranks broadcast from process zero). Files, logs and evaluation happen only when
      `state.is_world_process_zero`; every process waits for them, so when `train()` returns the checkpoint is
      complete on disk.
    - The deployment form (`compression_args.dtype` / `compression_args.quantize`, as `compress_model(dtype=,
      quantize=)`) is applied last: the model is compressed and, if asked, distilled in the trained model's float32,
      then cast or quantised once. `compressed_model` and the saved checkpoint are in that form (`from_pretrained`,
      after `import drone_hf`, reloads it as saved); `metrics["compressed"]` and `metrics["compressed+distilled"]`
      score that form, and the card's speed-up compares it with the dense model in the same form. A budget
      (`target_speedup`, `max_accuracy_drop`, `param_ratio`) keeps only ranks measured faster than the dense layer in
      that form. `quantize` needs the trained model on the CPU (checked in `on_train_begin`).

    Args:
        compression_args ([`DroneCompressionArguments`]): What to compress and the calibration rows.
        output_dir (`str`, *optional*): Where to save; defaults to `f"{args.output_dir}/drone"`.
        distillation_args ([`DroneDistillationArguments`], *optional*): Distil the compressed model from the
            trained dense one (needs `train_dataset`).
        calibration_dataloader (`Iterable[dict]`, *optional*): Calibration batches to use instead of training rows.
        train_dataset (*optional*): Training rows for calibration, held-out rows and distillation (`Trainer` does
            not show its datasets to callbacks; pass the one you gave it).
        eval_dataset (*optional*): Labelled rows to compare dense / compressed / distilled on.
        processing_class / tokenizer (`PreTrainedTokenizerBase`, *optional*): Pads rows and is saved with the model;
            defaults to the trainer's `processing_class`.
        task (`str` or `drone_hf.data.TaskData`, *optional*): GLUE task name, or your own task data (from
            `drone_hf.data.load_task_data`): its metrics on `eval_dataset`, its main metric for a `max_accuracy_drop`
            budget (F1 for MRPC/QQP, Matthews correlation for CoLA, your `--metric`) and the dataset in the model
            card. Without it: accuracy (classification) or Pearson correlation (regression).
        data_collator (*optional*): Collates rows of `train_dataset` (default: padding with the tokenizer).
        base_model (`str`, *optional*): Hub id of the fine-tuned model, for the card (default: the model's
            `name_or_path`).
        measure_speed (`bool`, *optional*, defaults to `True`): Time dense vs compressed (batch 8, 128 tokens, shuffled
            round-robin, wall clock and CPU time; `drone_hf.speed`) for the card, which quotes the speed-up only when
            the measurement passes the checks of `drone_hf.speed.speed_flags` (else `speed["withheld"]` says why).

    Progress: each phase logs a line (`logger.info`) and, unless `TrainingArguments.disable_tqdm`, shows a bar
    (calibration, allocation, factorisation, evaluation, timing).

    Raises:
        `ValueError`: for an unknown `task` or conflicting arguments (here), and for invalid settings
            (`on_train_begin`).

    Example:

    ```py
    >>> callback = DroneCompressionCallback(DroneCompressionArguments(rank=64), task="sst2",  # doctest: +SKIP
    ...                                     train_dataset=train, eval_dataset=dev)
    >>> trainer = Trainer(model, args, train_dataset=train, processing_class=tokenizer, callbacks=[callback])
    >>> trainer.train()  # doctest: +SKIP
    >>> callback.compressed_model_path, callback.metrics["compressed"]  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        compression_args: DroneCompressionArguments,
        *,
        output_dir: str | os.PathLike | None = None,
        distillation_args: DroneDistillationArguments | None = None,
        calibration_dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        task: str | None = None,
        data_collator=None,
        base_model: str | None = None,
        measure_speed: bool = True,
    ):
        if not isinstance(compression_args, DroneCompressionArguments):
            raise TypeError(
                f"`compression_args` must be a DroneCompressionArguments, got {type(compression_args).__name__}."
            )
        if distillation_args is not None and not isinstance(distillation_args, DroneDistillationArguments):
            raise TypeError(
                "`distillation_args` must be a DroneDistillationArguments or None, got "
                f"{type(distillation_args).__name__}."
            )
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise ValueError("Pass the tokenizer once, as `processing_class` or as `tokenizer`.")
        self.task_data = None
        if task is not None:
            from .data import TaskData

            self.task_data = task if isinstance(task, TaskData) else TaskData.from_glue(task)  # unknown: raises
            task = self.task_data.name
        self.compression_args = compression_args
        self.distillation_args = distillation_args
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.calibration_dataloader = calibration_dataloader
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class if processing_class is not None else tokenizer
        self.task, self.data_collator = task, data_collator
        self.base_model, self.measure_speed = base_model, measure_speed
        self.compressed_model: nn.Module | None = None
        self.compressed_model_path: str | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.speed: dict[str, Any] | None = None
        self.allocation_report: dict = {}

    # ------------------------------------------------------------------------------------------------- validation
    def validate(self, model: nn.Module, processing_class: PreTrainedTokenizerBase | None = None) -> None:
        """Checks the settings against `model` and the data (what `on_train_begin` does).

        Raises:
            `ValueError`: naming the offending argument.
        """
        args = self.compression_args
        args.validate_for_model(model)
        check_deployment(model, args.dtype, args.quantize)
        tokenizer = self.processing_class if self.processing_class is not None else processing_class
        train_rows = None if self.train_dataset is None else len(self.train_dataset)
        if self.distillation_args is not None:
            if self.train_dataset is None:
                raise ValueError(
                    "`distillation_args` is set but `train_dataset` is None: distillation needs the training rows "
                    "(pass the dataset you gave the Trainer as `DroneCompressionCallback(train_dataset=...)`)."
                )
            if self.distillation_args.alpha_task > 0 and not _has_labels(self.train_dataset):
                raise ValueError("`distillation_args.alpha_task` > 0 but `train_dataset` has no `labels`.")
        if args.max_accuracy_drop is not None and train_rows is not None and self.calibration_dataloader is None:
            if train_rows <= args.num_calibration_samples:
                raise ValueError(
                    f"`max_accuracy_drop` needs held-out training rows after the {args.num_calibration_samples} "
                    f"calibration rows, but `train_dataset` has {train_rows}; lower `num_calibration_samples`."
                )
        if self.eval_dataset is not None:
            if len(self.eval_dataset) == 0 or not _has_labels(self.eval_dataset):
                raise ValueError(
                    "`eval_dataset` has no `labels` (or only -1 placeholders, as in GLUE test splits): an eval set "
                    "without labels cannot be scored; pass a labelled split such as `validation`."
                )
            if tokenizer is None:
                raise ValueError("`eval_dataset` needs a tokenizer to pad rows: pass `processing_class`.")

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        processing_class=None,
        **kwargs,
    ):
        """Validates the settings before the first training step (see [`validate`])."""
        if model is None:
            raise ValueError("DroneCompressionCallback needs the trainer's `model`.")
        self.validate(model, processing_class)

    # --------------------------------------------------------------------------------------------------- the work
    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        train_dataloader=None,
        processing_class=None,
        **kwargs,
    ):
        """Calibrates, compresses, optionally distils, evaluates and saves (see the class docstring)."""
        rank, world = _world()
        self._compress_on_this_process(args, state, model, train_dataloader, processing_class, rank, world)
        if world > 1:
            # No process leaves before process zero has written the checkpoint: whatever runs after `train()`, on
            # any process, finds it complete.
            torch.distributed.barrier()

    def _compress_on_this_process(self, args, state, model, train_dataloader, processing_class, rank, world):
        tokenizer = self.processing_class if self.processing_class is not None else processing_class
        distil_everywhere = self.distillation_args is not None and world > 1
        calibration, heldout, num_rows = self._training_batches(train_dataloader, tokenizer, rank, world)
        settings = self.compression_args
        show = state.is_world_process_zero and not args.disable_tqdm
        if state.is_world_process_zero:
            logger.info(f"DRONE: calibrating on {num_rows} training rows")
        stats = collect_activation_stats(
            model, calibration, target_modules=settings.target_modules, show_progress=show
        )  # summed over processes
        if not (state.is_world_process_zero or distil_everywhere):
            return
        info = {
            "dataset": self.task_data.calibration_dataset if self.task_data else "train_dataset",
            "split": "train",
            "num_samples": num_rows,
            "seed": settings.seed,
        }
        compressed = None
        if state.is_world_process_zero:
            logger.info("DRONE: compressing" + (" (allocating ranks first)" if settings.rank is None else ""))
            kwargs = settings.compress_kwargs()
            if "allocation_options" in kwargs and self.task_data is not None:
                kwargs["allocation_options"]["metric_fn"] = self.task_data.metric_points()
            if self._deploys and settings.rank is None and settings.ranks is None and settings.attention_rank is None:
                # The budget is measured in the deployment form; the model itself stays in float32 until the end.
                from .kernel_costs import KernelCosts

                device = next(model.parameters()).device
                costs = KernelCosts(settings.dtype or torch.float32, quantize=settings.quantize, device=device)
                kwargs.setdefault("allocation_options", {})["kernel_costs"] = costs
            if settings.sequential:  # process zero refits on its own calibration batches (statistics: summed)
                kwargs["calibration_dataloader"] = calibration
            compressed = compress_model(
                model,
                stats,
                **kwargs,
                eval_dataloader=heldout,
                allocation_report=self.allocation_report,
                calibration_info=info,
                show_progress=show,
            )
        if distil_everywhere:
            compressed = self._same_structure_everywhere(model, stats, compressed, info)
        distil = self.distillation_args is not None
        if not distil:  # nothing trains the compressed model: it takes its deployment form now
            compressed = prepare_for_deployment(compressed, settings.dtype, settings.quantize)
        metrics = {}
        if state.is_world_process_zero and self.eval_dataset is not None:
            logger.info(f"DRONE: evaluating dense and compressed on {len(self.eval_dataset)} rows")
            metrics["dense"] = self._evaluate(model, tokenizer, show and "Evaluating dense")
            deploy_copy = distil and self._deploys  # the model to distil stays in float32
            scored = deployed_copy(compressed, settings.dtype, settings.quantize) if deploy_copy else compressed
            metrics["compressed"] = self._evaluate(scored, tokenizer, show and "Evaluating compressed")
        if distil:
            from .distillation import distill

            compressed = distill(
                compressed,
                model,
                self.train_dataset,
                self.distillation_args,
                training_args=args,
                data_collator=self.data_collator,
                processing_class=tokenizer,
            )
            # Trained in float32; cast or quantised once, after the last step.
            compressed = prepare_for_deployment(compressed, settings.dtype, settings.quantize)
            if state.is_world_process_zero and self.eval_dataset is not None:
                progress = show and "Evaluating distilled"
                metrics["compressed+distilled"] = self._evaluate(compressed, tokenizer, progress)
        self.compressed_model, self.metrics = compressed.eval(), metrics
        if state.is_world_process_zero:
            self._save(args, state, model, compressed, tokenizer)

    @property
    def _deploys(self) -> bool:
        return self.compression_args.dtype is not None or self.compression_args.quantize is not None

    def _same_structure_everywhere(self, model, stats, compressed, info):
        # Data-parallel distillation needs the same modules on every process: process zero chose the ranks (its
        # allocation may have used held-out rows only it holds); the others factor at those ranks.
        structure = [None]
        if compressed is not None:
            config = compressed.config
            structure = [{**(config.drone_ranks or {}), **(config.drone_attention_ranks or {})}]
        torch.distributed.broadcast_object_list(structure, src=0)
        if compressed is None:
            compressed = compress_model(
                model,
                stats,
                method=self.compression_args.method,
                ranks=structure[0],
                calibration_info=info,
                bias_correction=self.compression_args.bias_correction,
            )
        return compressed

    def _collate(self, rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        rows = [{key: value for key, value in row.items() if key in _ROW_KEYS} for row in rows]
        if self.data_collator is not None:
            return self.data_collator(rows)
        if tokenizer is not None:
            return DataCollatorWithPadding(tokenizer)(rows)
        return default_data_collator(rows)

    def _training_batches(self, train_dataloader, tokenizer, rank: int, world: int):
        """This process's calibration batches, the held-out batches (for `max_accuracy_drop`) and the number of
        calibration rows over all processes."""
        settings = self.compression_args
        wanted, held_rows = settings.num_calibration_samples, settings.heldout_samples
        needs_heldout = settings.max_accuracy_drop is not None
        heldout = None
        if self.train_dataset is not None:
            order = np.random.default_rng(settings.seed).permutation(len(self.train_dataset))
            chosen, held = order[:wanted], order[wanted : wanted + held_rows]
            heldout = self._row_batches(held, tokenizer) if needs_heldout else None
            if self.calibration_dataloader is None:
                # Rows are dealt round-robin: the statistics summed over processes are those of all chosen rows.
                return self._row_batches(chosen[rank::world], tokenizer), heldout, len(chosen)
        if self.calibration_dataloader is not None:
            (batches,) = _take_rows(self.calibration_dataloader, wanted)
            if needs_heldout and heldout is None:
                if train_dataloader is None:
                    raise ValueError("`max_accuracy_drop` needs held-out training rows: pass `train_dataset`.")
                (heldout,) = _take_rows(train_dataloader, held_rows)
            return batches[rank::world], heldout, count_rows(batches)
        if train_dataloader is None:
            raise ValueError("No calibration data: pass `calibration_dataloader` or `train_dataset`.")
        # The trainer's dataloader is already sharded across processes: each takes its share of the rows.
        share = math.ceil(wanted / world)
        calibration, heldout = _take_rows(train_dataloader, share, held_rows if needs_heldout else 0)
        return calibration, heldout if needs_heldout else None, count_rows(calibration) * world

    def _row_batches(self, indices, tokenizer) -> list[dict[str, torch.Tensor]]:
        size = self.compression_args.calibration_batch_size
        return [
            self._collate([self.train_dataset[int(i)] for i in indices[start : start + size]], tokenizer)
            for start in range(0, len(indices), size)
        ]

    def _evaluate(self, model: nn.Module, tokenizer, progress: str | bool = False) -> dict[str, float]:
        from .evaluation import predict

        logits, labels = predict(model, self.eval_dataset, tokenizer, show_progress=progress)
        if self.task_data is not None:
            return self.task_data.compute_metrics(logits, labels)
        if logits.shape[-1] == 1:
            return {"pearson": float(np.corrcoef(logits[:, 0], labels.reshape(-1))[0, 1])}
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    def _speed(self, model: nn.Module, compressed: nn.Module, tokenizer, show: bool) -> dict[str, Any] | None:
        from .profiling import cpu_name, flop_speedup_bound
        from .speed import compare_speed

        seq_len = min(_LATENCY_SEQ_LEN, model.config.max_position_embeddings)
        source = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if not self.measure_speed or source is None or tokenizer is None:
            return None
        rows = [
            {k: v[:seq_len] for k, v in source[i].items() if k in MODEL_INPUT_KEYS}
            for i in range(min(len(source), _LATENCY_BATCH))
        ]
        inputs = dict(tokenizer.pad(rows, padding="max_length", max_length=seq_len, return_tensors="pt"))
        bound = flop_speedup_bound(model.config, compressed.config, seq_len)
        logger.info("DRONE: timing dense and compressed")
        settings = self.compression_args
        # Against dense in the same deployment form, so that the speed-up is DRONE's and its FLOP bound holds.
        dense = deployed_copy(model, settings.dtype, settings.quantize) if self._deploys else model
        comparison = compare_speed(  # each module's own train/eval mode is restored afterwards
            {"dense": dense, "compressed": compressed},
            inputs,
            flop_bounds={"compressed": bound},
            repeats=10,
            warmup=2,
            show_progress=show,
        )
        device = next(model.parameters()).device
        hardware = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU {cpu_name()}, {torch.get_num_threads()} threads"
        )
        form = next(model.parameters()).dtype
        if self._deploys:
            form = f"dense and compressed in {describe_deployment(settings.dtype, settings.quantize)}"
        speed = comparison.card_speed("compressed", hardware, f"batch {len(rows)} x {seq_len} tokens, {form}")
        if speed.get("withheld"):
            logger.warning(f"DRONE: the measured speed-up is not quoted in the card: {speed['withheld']}.")
        return speed

    def _save(self, args, state, model, compressed, tokenizer) -> None:
        from .hub import create_or_update_model_card

        path = self.output_dir or os.path.join(args.output_dir, "drone")
        compressed.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        self.speed = self._speed(model, compressed, tokenizer, not args.disable_tqdm)
        base_model = self.base_model or getattr(model.config, "name_or_path", None) or None
        dataset = self.task_data.card_dataset if self.task_data is not None else None
        create_or_update_model_card(
            path, base_model=base_model, dataset=dataset, metrics=self.metrics or None, speed=self.speed
        )
        self.compressed_model_path = path
        flat = {
            f"drone/{variant}_{name}": value
            for variant, values in self.metrics.items()
            for name, value in values.items()
        }
        if self.speed is not None and not self.speed.get("withheld"):  # a flagged measurement is not published
            flat["drone/speedup"] = self.speed["speedup"]
        state.log_history.append({**flat, "step": state.global_step})
        summary = ", ".join(f"{key.removeprefix('drone/')}={value:.4f}" for key, value in flat.items())
        logger.info(f"Saved the compressed model to {path}" + (f" ({summary})." if summary else "."))


__all__ = ["DroneCompressionCallback"]
