"""Fine-tune a BERT classifier on a GLUE task or your own data with `Trainer`, then compress it with DRONE (and
optionally recover it by feature distillation) through `DroneCompressionCallback`: the familiar transformers
`run_glue.py` recipe plus drone options. Compression options start with `--drone_`, distillation options with
`--distill_` (both sets mirror `DroneCompressionArguments` / `DroneDistillationArguments`); the rest are
`TrainingArguments`. Every option also takes its dash spelling (`--train-file`).

    python examples/run_glue.py --model_name_or_path bert-base-uncased --task_name sst2 --data_dir glue_data \\
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5 \\
        --num_train_epochs 3 --output_dir out/sst2 \\
        --drone_target_speedup 2 --do_distill --distill_max_steps 1000

Your own data instead of `--task_name` (as in transformers' run_glue.py / run_classification.py):
`--train_file train.csv --validation_file dev.csv` (CSV, TSV, JSON, JSONL) or `--dataset_name imdb`, with optional
`--text_column_names sentence1,sentence2`, `--label_column_name label` and `--metric_name f1` (accuracy, f1, mcc,
pearson, spearman).

`--drone_dtype bfloat16` (or float16) / `--drone_quantize int8` save the compressed model in that deployment form,
cast or quantised after distillation (which trains in float32); it reloads in it with `from_pretrained`.

Multi-process on GPUs: `accelerate launch examples/run_glue.py ...`; on a CPU, `accelerate launch --cpu` runs ONE
process whatever `--num_processes` says, so use `torchrun --nproc_per_node 2 examples/run_glue.py ... --use_cpu`
(see the README). Calibration statistics are summed over processes and distillation is data-parallel. Writes the
fine-tuned model to `--output_dir`, the compressed one to `<output_dir>/drone` (or `--drone_output_dir`), and
`drone_results.json` with dense / compressed / distilled scores.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing
from dataclasses import dataclass, field

import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from drone_hf import DroneCompressionArguments, DroneCompressionCallback, DroneDistillationArguments  # noqa: E402
from drone_hf.data import DataSource, load_task_data  # noqa: E402
from drone_hf.glue import glue_compute_metrics, load_glue  # noqa: E402


logger = logging.getLogger(__name__)
_BUDGETS = ("rank", "ranks", "param_ratio", "attention_rank", "max_accuracy_drop", "target_speedup")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Pretrained (or fine-tuned) BERT: a folder or a Hub id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(
        default=None, metadata={"help": "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Local GLUE TSV folder (default: the Hub)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (instead of a GLUE task)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config name."})
    train_file: str | None = field(default=None, metadata={"help": "Training rows: .csv, .tsv, .json or .jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation rows (same formats)."})
    text_column_names: str | None = field(
        default=None, metadata={"help": "One or two text columns, comma-separated (default: guessed)."}
    )
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: label)."})
    metric_name: str | None = field(
        default=None, metadata={"help": "Comma-separated: accuracy, f1, mcc, pearson, spearman (first = main)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded subset of the training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Seeded subset of the dev rows."})


@dataclass
class DroneRunArguments:
    do_distill: bool = field(default=False, metadata={"help": "Distil the compressed model from the fine-tuned one."})
    drone_output_dir: str | None = field(default=None, metadata={"help": "Default: <output_dir>/drone."})


def prefixed(cls: type, prefix: str) -> type:
    """`cls` with every field renamed `prefix + name` (defaults `None`), so it parses beside `TrainingArguments`,
    whose `seed`, `max_steps`, `learning_rate`... it would otherwise clash with."""
    hints = typing.get_type_hints(cls)
    specs = []
    for item in dataclasses.fields(cls):
        default = item.default if item.default is not dataclasses.MISSING else None
        help_text = item.metadata.get("help", "")
        specs.append((prefix + item.name, hints[item.name], field(default=default, metadata={"help": help_text})))
    return dataclasses.make_dataclass(f"Prefixed{cls.__name__}", specs)


def unprefixed(values, cls: type, prefix: str):
    """Builds `cls` (and runs its validation) from a [`prefixed`] instance, dropping options left unset."""
    kwargs = {f.name[len(prefix) :]: getattr(values, f.name) for f in dataclasses.fields(values)}
    return cls(**{name: value for name, value in kwargs.items() if value is not None})


def _given(values) -> list[str]:
    """The options of a [`prefixed`] instance set to other than their defaults, as `--name`s. `None` counts as unset:
    it is what `HfArgumentParser` leaves for an absent option whose default it cannot pass on
    (`--distill_hidden_layers`), and what [`unprefixed`] drops."""
    return [f"--{f.name}" for f in dataclasses.fields(values) if getattr(values, f.name) not in (None, f.default)]


def compresses(compression_cli, run_args: DroneRunArguments) -> bool:
    """Whether a `--drone_*` budget (`_BUDGETS`) is given, i.e. whether the run compresses.

    Raises:
        `ValueError`: naming the other `--drone_*` options given (set to other than their defaults) when no budget is:
            without one nothing is compressed, and they would be ignored.
    """
    if any(getattr(compression_cli, f"drone_{name}") is not None for name in _BUDGETS):
        return True
    given = _given(compression_cli)
    given += ["--drone_output_dir"] * (run_args.drone_output_dir is not None)
    if given:
        budgets = ", ".join(f"--drone_{name}" for name in _BUDGETS)
        raise ValueError(
            f"{', '.join(given)} given without a compression budget: nothing would be compressed and "
            f"{'they' if len(given) > 1 else 'it'} would be ignored. Pass one of {budgets} (e.g. --drone_rank 64), "
            "or drop the `--drone_` options to only fine-tune."
        )
    return False


def _names(value: str | None) -> tuple[str, ...] | None:
    return tuple(item.strip() for item in value.split(",") if item.strip()) if value else None


def _compute_metrics(task):
    """`Trainer`'s `compute_metrics` for your own data: the task's metrics of the logits."""

    def compute_metrics(eval_pred):
        predictions = eval_pred.predictions
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return task.compute_metrics(predictions, eval_pred.label_ids)

    return compute_metrics


def main(argv: list[str] | None = None) -> dict:
    CompressionCLI = prefixed(DroneCompressionArguments, "drone_")  # noqa: N806
    DistillationCLI = prefixed(DroneDistillationArguments, "distill_")  # noqa: N806
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, DroneRunArguments, CompressionCLI, DistillationCLI)
    )
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, training_args, run_args, compression_cli, distillation_cli = parsed

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logging.getLogger("drone_hf").setLevel(training_args.get_process_log_level())  # DRONE's progress lines
    source = DataSource(  # ValueError for an unknown task or a missing / doubled source
        task=data_args.task_name,
        data_dir=data_args.data_dir,
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        text_columns=_names(data_args.text_column_names),
        label_column=data_args.label_column_name,
        metrics=_names(data_args.metric_name),
    )
    compress = compresses(compression_cli, run_args)
    if run_args.do_distill and not compress:
        raise ValueError("`--do_distill` distils the compressed model: pass a `--drone_*` budget (e.g. --drone_rank).")
    distill_given = _given(distillation_cli)
    if distill_given and not run_args.do_distill:
        raise ValueError(
            f"{', '.join(distill_given)} given without `--do_distill`: nothing would be distilled and "
            f"{'they' if len(distill_given) > 1 else 'it'} would be ignored. Add `--do_distill` (with a `--drone_*` "
            "budget), or drop the `--distill_` options."
        )
    if compress and not training_args.do_train:
        raise ValueError(
            "Compression runs when training ends: pass `--do_train`, or compress an already fine-tuned model with "
            "`drone-hf compress`."
        )
    compression_args = unprefixed(compression_cli, DroneCompressionArguments, "drone_") if compress else None
    distillation_args = None
    if run_args.do_distill:
        distillation_args = unprefixed(distillation_cli, DroneDistillationArguments, "distill_")
    set_seed(training_args.seed)
    evaluate = training_args.do_eval or compress
    splits = ("train",) * training_args.do_train + ("validation",) * evaluate
    task = load_task_data(source, splits=splits)

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    labels = task.id2label
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        id2label=labels,
        label2id={name: i for i, name in labels.items()} if labels else None,
    )
    rows = {"max_length": data_args.max_seq_length, "seed": training_args.seed}
    train = (
        task.load("train", tokenizer, max_samples=data_args.max_train_samples, **rows) if "train" in splits else None
    )
    dev_sets = {}
    if evaluate and task.glue:  # MNLI has two dev splits
        dev_sets = {
            split: load_glue(
                task.name,
                tokenizer,
                split=split,
                data_dir=data_args.data_dir,
                max_samples=data_args.max_eval_samples,
                **rows,
            )
            for split in task.glue.dev_splits
        }
    elif evaluate:
        dev_sets = {"validation": task.load("validation", tokenizer, max_samples=data_args.max_eval_samples, **rows)}
    dev = next(iter(dev_sets.values()), None)

    callbacks = []
    if compress:
        callbacks.append(
            DroneCompressionCallback(
                compression_args,
                output_dir=run_args.drone_output_dir,
                distillation_args=distillation_args,
                train_dataset=train,
                eval_dataset=dev,
                processing_class=tokenizer,
                task=task,
                base_model=model_args.model_name_or_path,
            )
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=dev,
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics(task.name) if task.glue else _compute_metrics(task),
        callbacks=callbacks,
    )
    results = {}
    if training_args.do_train:
        outcome = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", outcome.metrics)
        trainer.save_metrics("train", outcome.metrics)
        trainer.save_state()
        results["train"] = outcome.metrics
    if training_args.do_eval:
        for split, dataset in dev_sets.items():
            prefix = f"eval_{split}" if len(dev_sets) > 1 else "eval"
            metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
            results[f"eval_{split}"] = metrics
    if compress:
        drone = callbacks[0]
        flat = {
            f"{variant}_{name}": value for variant, scores in drone.metrics.items() for name, value in scores.items()
        }
        if drone.speed is not None and drone.speed.get("withheld"):  # a flagged timing is not published
            flat.update(speedup_withheld=drone.speed["withheld"], flop_bound=drone.speed["flop_bound"])
        elif drone.speed is not None:
            flat.update(speedup=drone.speed["speedup"], flop_bound=drone.speed["flop_bound"])
        if trainer.is_world_process_zero():
            flat["path"] = drone.compressed_model_path
            trainer.log_metrics("drone", flat)
            trainer.save_metrics("drone", flat, combined=False)
        results["drone"] = flat
    return results


if __name__ == "__main__":
    main()
    # Under `accelerate launch`/`torchrun`, leave together and close the process group: a process that exits while
    # the others still hold the group can abort, and the launcher then kills the rest.
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
