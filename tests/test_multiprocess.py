"""Two CPU processes (gloo) under `accelerate launch`: summed calibration statistics, data-parallel distillation and
the callback. This file is both the test and, run by the launcher, the worker."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2


def _digest(model) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def _two_step_args(output_dir: Path):
    """`TrainingArguments` of both trainings in the worker: 2 CPU steps of batch 4, nothing saved or reported."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )


def worker(out: Path) -> None:
    """Runs in each process started by `accelerate launch`."""
    sys.path.insert(0, str(REPO))
    from accelerate import PartialState
    from transformers import Trainer, TrainerCallback

    from drone_hf import (
        DroneCompressionArguments,
        DroneCompressionCallback,
        DroneDistillationArguments,
        collect_activation_stats,
        compress_model,
        distill,
        save_activation_stats,
    )
    from tests.testing_utils import tiny_batches, tiny_dataset, tiny_teacher, tiny_tokenizer

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    report = {"rank": rank, "world_size": world, "backend": str(torch.distributed.get_backend())}

    # 1. Calibration: each process sees a different shard; collect_activation_stats sums them.
    teacher = tiny_teacher()
    shard = tiny_batches(num_rows=13, batch_size=2)[rank::world]
    report["calibration_rows"] = sum(len(batch["input_ids"]) for batch in shard)
    stats = collect_activation_stats(teacher, shard)
    if rank == 0:
        save_activation_stats(stats, out / "stats.safetensors")

    # 2. distill() for 2 data-parallel steps.
    class Steps(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            report.update(distill_steps=state.global_step, distill_world_size=args.world_size)

    student = compress_model(teacher, None, method="svd", rank=4)
    before = _digest(student)
    args = _two_step_args(out / "distill")
    distill(student, teacher, tiny_dataset(24), args, processing_class=tiny_tokenizer(), callbacks=[Steps()])
    report.update(student_before=before, student_after=_digest(student))

    # 3. The callback under a 2-process Trainer, with distillation.
    train = tiny_dataset(24)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(rank=4, num_calibration_samples=12),
        distillation_args=DroneDistillationArguments(max_steps=2, per_device_train_batch_size=4),
        train_dataset=train,
        eval_dataset=tiny_dataset(8, seed=2),
        measure_speed=False,
    )
    trainer_args = _two_step_args(out / "run")
    Trainer(
        model=tiny_teacher(),
        args=trainer_args,
        train_dataset=train,
        processing_class=tiny_tokenizer(),
        callbacks=[drone],
    ).train()
    saved = out / "run" / "drone"
    report["files_after_train"] = sorted(os.listdir(saved)) if saved.is_dir() else None
    report.update(
        callback_path=drone.compressed_model_path,
        callback_metrics=drone.metrics,
        callback_digest=_digest(drone.compressed_model),
        callback_ranks=len(drone.compressed_model.config.drone_ranks),
    )
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # A process that exits while its peers still use the gloo group can abort ("terminate called without an active
    # exception"): leave together, then tear the group down.
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_sum_statistics_and_distil(tmp_path):
    import pytest

    from drone_hf import DroneBertForSequenceClassification, collect_activation_stats, load_activation_stats

    from .testing_utils import tiny_batches, tiny_teacher

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    # `accelerate launch --multi_gpu` starts torch.distributed workers; without CUDA they use gloo on the CPU.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(NUM_PROCESSES),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        __file__,
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NUM_PROCESSES)]

    assert [(r["rank"], r["world_size"], r["backend"]) for r in reports] == [(0, 2, "gloo"), (1, 2, "gloo")]
    # Statistics: the sum over the two shards equals one process over all the data.
    assert reports[0]["calibration_rows"] + reports[1]["calibration_rows"] == 13
    assert min(r["calibration_rows"] for r in reports) > 0
    summed = load_activation_stats(tmp_path / "stats.safetensors")
    single = collect_activation_stats(tiny_teacher(), tiny_batches(num_rows=13, batch_size=2))
    assert set(summed) == set(single)
    for name in single:
        torch.testing.assert_close(summed[name], single[name], rtol=1e-12, atol=1e-9)

    # distill(): 2 data-parallel steps, the same student everywhere, and it changed.
    for report in reports:
        assert (report["distill_steps"], report["distill_world_size"]) == (2, 2)
        assert report["student_after"] != pytest.approx(report["student_before"], rel=1e-9)
    assert reports[0]["student_after"] == pytest.approx(reports[1]["student_after"], rel=1e-12)

    # The callback: every process holds the same distilled model; only process zero saved and evaluated.
    assert reports[0]["callback_path"] == str(tmp_path / "run" / "drone") and reports[1]["callback_path"] is None
    assert set(reports[0]["callback_metrics"]) == {"dense", "compressed", "compressed+distilled"}
    assert reports[1]["callback_metrics"] == {}
    assert reports[0]["callback_digest"] == pytest.approx(reports[1]["callback_digest"], rel=1e-12)
    assert reports[0]["callback_ranks"] == reports[1]["callback_ranks"] == 12
    # When train() returns, on any process, the checkpoint is complete: its model card is the last file written.
    for report in reports:
        assert report["files_after_train"] is not None and "README.md" in report["files_after_train"]
        assert {"config.json", "model.safetensors"} <= set(report["files_after_train"])
    saved = DroneBertForSequenceClassification.from_pretrained(tmp_path / "run" / "drone")
    assert _digest(saved) == pytest.approx(reports[0]["callback_digest"], rel=1e-9)


def test_the_documented_cpu_line_runs_run_glue_on_two_processes(tmp_path):
    """The README's CPU line, `torchrun --nproc_per_node 2 examples/run_glue.py ... --use_cpu`, on our own CSV."""
    import csv
    import math

    from .testing_utils import random_sentences, tiny_classifier_folder

    tiny_classifier_folder(tmp_path / "model")
    for name, count in (("train.csv", 120), ("dev.csv", 16)):
        with open(tmp_path / name, "w", newline="") as handle:
            rows = [(text, ("neg", "pos")[i % 2]) for i, text in enumerate(random_sentences(count, seed=count))]
            csv.writer(handle).writerows([("text", "label"), *rows])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(_free_port()), str(REPO / "examples" / "run_glue.py")]
    command += ["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "run")]
    command += ["--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv")]
    command += ["--do_train", "--max_steps", "2", "--per_device_train_batch_size", "8", "--use_cpu"]
    command += ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    command += ["--drone_rank", "4", "--drone_num_calibration_samples", "16"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # 2 steps of 8 rows on each of 2 processes: an epoch of 120 rows is ceil(120 / 16) = 8 steps.
    epoch = json.loads((tmp_path / "run" / "train_results.json").read_text())["epoch"]
    assert epoch == pytest.approx(2 / math.ceil(120 / (8 * NUM_PROCESSES)))
    assert (tmp_path / "run" / "drone" / "README.md").is_file()


def test_accelerate_launch_cpu_starts_one_process(tmp_path):
    """Why the README does not document `accelerate launch --cpu --num_processes 2`: it runs a single process."""
    script = tmp_path / "world.py"
    script.write_text("from accelerate import PartialState\nprint('world', PartialState(cpu=True).num_processes)\n")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split().count("world") == 1 and "world 1" in result.stdout


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
