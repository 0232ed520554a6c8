"""Fine-tune a BERT classifier on a GLUE task with `Trainer`, then compress it with DRONE (and optionally recover it by
feature distillation) through `DroneCompressionCallback`: the familiar transformers `run_glue.py` recipe plus drone
options. Compression options start with `--drone_`, distillation options with `--distill_` (both sets mirror
`DroneCompressionArguments` / `DroneDistillationArguments`); the rest are `TrainingArguments`.

    python examples/run_glue.py --model_name_or_path bert-base-uncased --task_name sst2 --data_dir glue_data \\
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5 \\
        --num_train_epochs 3 --output_dir out/sst2 \\
        --drone_target_speedup 2 --do_distill --distill_max_steps 1000

Multi-process: `accelerate launch examples/run_glue.py ...` (calibration statistics are summed over processes and
distillation is data-parallel). Writes the fine-tuned model to `--output_dir`, the compressed one to
`<output_dir>/drone` (or `--drone_output_dir`), and `drone_results.json` with dense / compressed / distilled scores.
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
from drone_hf.glue import get_glue_task, glue_compute_metrics, load_glue  # noqa: E402


logger = logging.getLogger(__name__)
_BUDGETS = ("rank", "ranks", "param_ratio", "attention_rank", "max_accuracy_drop", "target_speedup")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Pretrained (or fine-tuned) BERT: a folder or a Hub id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataTrainingArguments:
    task_name: str = field(metadata={"help": "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli."})
    data_dir: str | None = field(default=None, metadata={"help": "Local GLUE TSV folder (default: the Hub)."})
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
    info = get_glue_task(data_args.task_name)  # ValueError for an unknown task
    compress = any(getattr(compression_cli, f"drone_{name}") is not None for name in _BUDGETS)
    if run_args.do_distill and not compress:
        raise ValueError("`--do_distill` distils the compressed model: pass a `--drone_*` budget (e.g. --drone_rank).")
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

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    labels = dict(enumerate(info.label_names)) if info.label_names else None
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=info.num_labels,
        problem_type="regression" if info.is_regression else "single_label_classification",
        id2label=labels,
        label2id={name: i for i, name in labels.items()} if labels else None,
    )
    glue = {
        "tokenizer": tokenizer,
        "data_dir": data_args.data_dir,
        "max_length": data_args.max_seq_length,
        "seed": training_args.seed,
    }
    train = None
    if training_args.do_train:
        train = load_glue(info.name, split="train", max_samples=data_args.max_train_samples, **glue)
    dev_sets = (
        {
            split: load_glue(info.name, split=split, max_samples=data_args.max_eval_samples, **glue)
            for split in info.dev_splits
        }
        if training_args.do_eval or compress
        else {}
    )
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
                task=info.name,
                base_model=model_args.model_name_or_path,
            )
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=dev,
        processing_class=tokenizer,
        compute_metrics=glue_compute_metrics(info.name),
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
        if drone.speed is not None:
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
