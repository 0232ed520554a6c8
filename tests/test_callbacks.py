import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from drone_hf import (
    DroneBertForSequenceClassification,
    DroneCompressionArguments,
    DroneCompressionCallback,
    DroneDistillationArguments,
    collect_activation_stats,
    compress_model,
)
from drone_hf.callbacks import _take_rows
from drone_hf.glue import glue_metric_points
from drone_hf.profiling import cpu_name

from .testing_utils import (
    one_torch_thread,
    tiny_batches,
    tiny_dataset,
    tiny_teacher,
    tiny_tokenizer,
    unsupported_classifier,
)


REPO = Path(__file__).resolve().parents[1]


_one_thread = one_torch_thread()


def _trainer(tmp_path, callbacks, *, model=None, train=None, eval_dataset=None, **overrides) -> Trainer:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "per_device_train_batch_size": 4,
        "disable_tqdm": True,
    }
    return Trainer(
        model=model if model is not None else tiny_teacher(),
        args=TrainingArguments(**{**settings, **overrides}),
        train_dataset=train if train is not None else tiny_dataset(),
        eval_dataset=eval_dataset,
        processing_class=tiny_tokenizer(),
        callbacks=callbacks,
    )


class Events(TrainerCallback):
    """Records the events it sees, and at `on_train_end` what the callback placed before it produced."""

    def __init__(self, drone=None):
        self.events, self.drone = [], drone

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("train_begin")

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append("step")

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", getattr(self.drone, "compressed_model_path", None)))


class Snapshot(TrainerCallback):
    """Copies the trained model's weights and flags when training ends, before the DRONE callback runs."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.flags = [p.requires_grad for p in model.parameters()]
        self.training = model.training


def _logits(model, batch):
    training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(training)
    return logits


def test_callback_compresses_distils_evaluates_and_saves(tmp_path):
    train, dev = tiny_dataset(24), tiny_dataset(12, seed=2)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(rank=4, num_calibration_samples=16),
        distillation_args=DroneDistillationArguments(max_steps=2, per_device_train_batch_size=4),
        train_dataset=train,
        eval_dataset=dev,
    )
    snapshot, events = Snapshot(), Events(drone)
    trainer = _trainer(tmp_path, [snapshot, drone, events], train=train)
    trainer.train()

    path = tmp_path / "run" / "drone"
    assert events.events == ["train_begin", "step", "step", ("train_end", str(path))]
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "drone_bert" and len(config["drone_ranks"]) == 12
    assert set(config["drone_ranks"].values()) == {4} and config["drone_calibration"]["num_samples"] == 16

    reloaded = AutoModelForSequenceClassification.from_pretrained(path)
    assert isinstance(reloaded, DroneBertForSequenceClassification)
    batch = tiny_batches()[0]
    torch.testing.assert_close(_logits(reloaded, batch), _logits(drone.compressed_model, batch), rtol=0, atol=0)

    assert set(drone.metrics) == {"dense", "compressed", "compressed+distilled"}
    labels = np.array(dev["labels"])
    dense = [
        int(_logits(trainer.model, {"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r))}).argmax())
        for r in dev["input_ids"]
    ]
    assert drone.metrics["dense"]["accuracy"] == pytest.approx(float((np.array(dense) == labels).mean()))
    card = ModelCard.load(path / "README.md")
    assert "drone_hf" in card.data.tags
    assert drone.speed["hardware"] == f"CPU {cpu_name()}, {torch.get_num_threads()} threads"
    assert {r.metric_name for r in card.data.eval_results} >= {"accuracy (dense)", "accuracy (compressed+distilled)"}
    assert trainer.state.log_history[-1]["drone/compressed+distilled_accuracy"] == pytest.approx(
        drone.metrics["compressed+distilled"]["accuracy"]
    )

    # trainer.model is neither replaced nor modified (weights, requires_grad flags, mode).
    assert type(trainer.model) is BertForSequenceClassification and drone.compressed_model is not trainer.model
    assert all(torch.equal(snapshot.state[k], v) for k, v in trainer.model.state_dict().items())
    assert [p.requires_grad for p in trainer.model.parameters()] == snapshot.flags
    assert trainer.model.training == snapshot.training


def _calibration_rows(dataset, indices, tokenizer, batch_size):
    rows = [{k: dataset[int(i)][k] for k in ("input_ids", "attention_mask")} for i in indices]
    return [tokenizer.pad(rows[s : s + batch_size], return_tensors="pt") for s in range(0, len(rows), batch_size)]


def test_callback_calibrates_on_the_chosen_training_rows(tmp_path):
    train = tiny_dataset(24)
    settings = DroneCompressionArguments(rank=4, num_calibration_samples=10, calibration_batch_size=3, seed=5)
    drone = DroneCompressionCallback(settings, train_dataset=train, measure_speed=False)
    trainer = _trainer(tmp_path, [drone], train=train)
    trainer.train()
    chosen = np.random.default_rng(5).permutation(24)[:10]
    stats = collect_activation_stats(trainer.model, _calibration_rows(train, chosen, tiny_tokenizer(), 3))
    expected = compress_model(trainer.model, stats, rank=4)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(drone.compressed_model.state_dict()[name], value)
    assert drone.metrics == {} and (tmp_path / "run" / "drone" / "README.md").is_file()


def test_callback_calibrates_on_a_given_dataloader_or_the_trainer_dataloader(tmp_path):
    loader = tiny_batches(num_rows=13, batch_size=4)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(rank=4, num_calibration_samples=6),
        calibration_dataloader=loader,
        output_dir=tmp_path / "given",
    )
    trainer = _trainer(tmp_path, [drone])
    trainer.train()
    first_six = [loader[0], {k: v[:2] for k, v in loader[1].items()}]
    expected = compress_model(trainer.model, collect_activation_stats(trainer.model, first_six), rank=4)
    torch.testing.assert_close(drone.compressed_model.state_dict(), expected.state_dict())
    assert drone.compressed_model_path == str(tmp_path / "given")
    assert drone.compressed_model.config.drone_calibration["num_samples"] == 6

    # Without any rows given, the trainer's own (shuffled) train dataloader supplies them.
    drone = DroneCompressionCallback(DroneCompressionArguments(target_speedup=1.2, num_calibration_samples=6))
    _trainer(tmp_path, [drone]).train()
    assert drone.compressed_model.config.drone_calibration["num_samples"] == 6


def test_callback_sequential_refits_on_its_calibration_rows(tmp_path):
    """`DroneCompressionArguments(sequential=True)` gives what `compress_model(..., sequential=True)` gives on the same
    calibration batches (a refit, not the plain factors), and the config records it."""
    loader = tiny_batches(num_rows=12, batch_size=4)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(rank=4, num_calibration_samples=12, sequential=True),
        calibration_dataloader=loader,
        output_dir=tmp_path / "given",
        measure_speed=False,
    )
    trainer = _trainer(tmp_path, [drone])
    trainer.train()
    stats = collect_activation_stats(trainer.model, loader)
    expected = compress_model(trainer.model, stats, rank=4, sequential=True, calibration_dataloader=loader)
    torch.testing.assert_close(drone.compressed_model.state_dict(), expected.state_dict())
    plain = compress_model(trainer.model, stats, rank=4).state_dict()
    assert any(not torch.equal(v, plain[k]) for k, v in expected.state_dict().items())
    assert drone.compressed_model.config.drone_calibration["sequential_refit"] is True
    kwargs = DroneCompressionArguments(max_accuracy_drop=1.0, sequential=True, sequential_checks=2).compress_kwargs()
    assert kwargs["sequential"] is True and kwargs["allocation_options"]["sequential_checks"] == 2
    assert "sequential" not in DroneCompressionArguments(rank=4).compress_kwargs()


def test_sequential_settings_are_checked():
    with pytest.raises(ValueError, match=r"`sequential` must be a bool, got str 'yes'"):
        DroneCompressionArguments(rank=4, sequential="yes")
    with pytest.raises(ValueError, match=r"`sequential_checks` must be an int >= 0, got -1"):
        DroneCompressionArguments(rank=4, sequential=True, sequential_checks=-1)
    from .testing_utils import tiny_config

    albert = AutoModelForSequenceClassification.from_config(tiny_config("albert", num_labels=2))
    with pytest.raises(ValueError, match="albert shares one layer module across its depth"):
        DroneCompressionArguments(rank=4, sequential=True).validate_for_model(albert)
    DroneCompressionArguments(rank=4).validate_for_model(albert)


def test_max_accuracy_drop_uses_heldout_training_rows_disjoint_from_calibration(tmp_path):
    train = tiny_dataset(40)
    settings = DroneCompressionArguments(max_accuracy_drop=50.0, num_calibration_samples=16, heldout_samples=12)
    drone = DroneCompressionCallback(settings, train_dataset=train, measure_speed=False)
    calibration, heldout, rows = drone._training_batches(None, tiny_tokenizer(), 0, 1)

    def ids(batches):
        return {tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])}

    assert rows == 16 and len(ids(calibration)) == 16 and len(ids(heldout)) == 12
    assert not ids(calibration) & ids(heldout) and all("labels" in b for b in heldout)
    _trainer(tmp_path, [drone], train=train).train()
    assert drone.allocation_report["heldout_examples"] == 12 and drone.compressed_model is not None


def test_max_accuracy_drop_is_measured_on_the_tasks_main_metric(tmp_path):
    # MRPC is judged by F1: with `task="mrpc"` the budget is spent on held-out F1, as in `drone-hf compress`.
    train = tiny_dataset(40, num_labels=2)
    settings = DroneCompressionArguments(
        max_accuracy_drop=50.0,
        num_calibration_samples=16,
        heldout_samples=24,
        screening_samples=8,
        refine_steps=2,
        screening_dtype="bfloat16",
    )
    drone = DroneCompressionCallback(settings, train_dataset=train, task="mrpc", measure_speed=False)
    trainer = _trainer(tmp_path, [drone], model=tiny_teacher(num_labels=2), train=train)
    trainer.train()
    _, heldout, _ = drone._training_batches(None, tiny_tokenizer(), 0, 1)
    logits = torch.cat([_logits(trainer.model, batch) for batch in heldout]).numpy()
    labels = torch.cat([batch["labels"] for batch in heldout]).numpy()
    f1, accuracy = glue_metric_points("mrpc")(logits, labels), 100.0 * (logits.argmax(-1) == labels).mean()
    assert abs(f1 - accuracy) > 1.0  # the two metrics differ here, so the check below tells them apart
    assert drone.allocation_report["heldout_base_metric"] == pytest.approx(f1, abs=1e-6)
    assert drone.allocation_report["refined_steps"] <= 2
    assert drone.allocation_report["screening_dtype"] == "bfloat16"  # the screening option reached the search


def test_on_train_end_runs_after_the_best_model_is_loaded(tmp_path, monkeypatch):
    events, load_best = [], Trainer._load_best_model

    def recording_load_best(self):
        events.append("load_best")
        return load_best(self)

    monkeypatch.setattr(Trainer, "_load_best_model", recording_load_best)
    drone = DroneCompressionCallback(DroneCompressionArguments(rank=4, num_calibration_samples=8), measure_speed=False)
    recorder = Events(drone)
    trainer = _trainer(
        tmp_path,
        [drone, recorder],
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        eval_dataset=tiny_dataset(8),
    )
    trainer.train()
    assert events == ["load_best"] and recorder.events[-1] == ("train_end", str(tmp_path / "run" / "drone"))


class NotWorldProcessZero(TrainerCallback):
    """Simulates a process other than zero from the end of training on."""

    def on_train_end(self, args, state, control, **kwargs):
        state.is_world_process_zero = False


def test_nothing_is_written_when_not_world_process_zero(tmp_path):
    train = tiny_dataset(24)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(rank=4, num_calibration_samples=8),
        train_dataset=train,
        eval_dataset=tiny_dataset(8, seed=2),
        distillation_args=DroneDistillationArguments(max_steps=1),
    )
    trainer = _trainer(tmp_path, [NotWorldProcessZero(), drone], train=train)
    trainer.train()
    assert not (tmp_path / "run" / "drone").exists() and not (tmp_path / "run" / "distillation").exists()
    assert drone.compressed_model_path is None and drone.metrics == {}
    assert not any("drone/" in key for entry in trainer.state.log_history for key in entry)


def _unlabelled_test_split():
    return tiny_dataset(8).map(lambda row: {"labels": -1})


@pytest.mark.parametrize(
    "settings, kwargs, match",
    [
        ({"rank": 40}, {}, r"Rank for `bert.encoder.layer.0.attention.self.query` \(32x32\) must be an int in"),
        ({"rank": 4, "target_modules": ["ffn"]}, {}, r"Unknown target module `ffn`"),
        ({"param_ratio": 0.01}, {}, r"`param_ratio=0.01` cannot be met"),
        ({"target_speedup": 50.0}, {}, r"`target_speedup=50.0` cannot be met"),
        (
            {"rank": 4},
            {"distillation_args": DroneDistillationArguments()},
            r"`distillation_args` is set but `train_dataset` is None",
        ),
        ({"rank": 4}, {"eval_dataset": tiny_dataset(8).remove_columns("labels")}, r"`eval_dataset` has no `labels`"),
        ({"rank": 4}, {"eval_dataset": _unlabelled_test_split()}, r"without labels cannot be scored"),
        (
            {"max_accuracy_drop": 1.0, "num_calibration_samples": 64},
            {"train_dataset": tiny_dataset(24)},
            r"`max_accuracy_drop` needs held-out training rows after the 64 calibration rows, but `train_dataset` has",
        ),
    ],
)
def test_bad_settings_fail_in_on_train_begin_before_any_step(tmp_path, settings, kwargs, match):
    drone = DroneCompressionCallback(DroneCompressionArguments(**settings), **kwargs)
    events = Events()
    trainer = _trainer(tmp_path, [drone, events])
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert "step" not in events.events and trainer.state.global_step == 0


def test_a_model_of_an_unsupported_family_fails_in_on_train_begin(tmp_path):
    trainer = _trainer(
        tmp_path,
        [DroneCompressionCallback(DroneCompressionArguments(rank=4))],
        model=unsupported_classifier(),
    )
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2'"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_constructor_rejects_unknown_task_and_wrong_types():
    with pytest.raises(ValueError, match=r"Unknown GLUE task `sst3`; expected one of \['cola', 'sst2'"):
        DroneCompressionCallback(DroneCompressionArguments(rank=4), task="sst3")
    with pytest.raises(TypeError, match=r"`compression_args` must be a DroneCompressionArguments, got dict"):
        DroneCompressionCallback({"rank": 4})
    with pytest.raises(ValueError, match=r"Pass the tokenizer once"):
        DroneCompressionCallback(
            DroneCompressionArguments(rank=4), tokenizer=tiny_tokenizer(), processing_class=tiny_tokenizer()
        )
    assert DroneCompressionCallback(DroneCompressionArguments(rank=4), task="SST-2").task == "sst2"


def test_take_rows_splits_batches_into_disjoint_groups():
    batches = tiny_batches(num_rows=13, batch_size=4)  # rows 0-3, 4-7, 8-11, 12
    first, second, third = _take_rows(iter(batches), 3, 6, 0)
    assert [len(b["input_ids"]) for b in first] == [3] and [len(b["input_ids"]) for b in second] == [1, 4, 1]
    assert third == []
    rows = torch.cat([b["input_ids"] for b in first + second])
    torch.testing.assert_close(rows, torch.cat([b["input_ids"] for b in batches])[:9])


def _run_glue_module(monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("run_glue", REPO / "examples" / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_glue", module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--task_name", "sst3", "--do_train"], r"Unknown GLUE task `sst3`"),
        (["--task_name", "sst2", "--do_train", "--do_distill"], r"`--do_distill` distils the compressed model"),
        (["--task_name", "sst2", "--drone_rank", "64"], r"Compression runs when training ends: pass `--do_train`"),
        (
            ["--task_name", "sst2", "--do_train", "--drone_rank", "64", "--drone_param_ratio", "0.5"],
            r"Pass one budget",
        ),
        (
            ["--task_name", "sst2", "--do_train", "--drone_rank", "64", "--distill_max_steps", "500"],
            r"--distill_max_steps given without `--do_distill`: nothing would be distilled",
        ),
        (
            [
                "--task_name",
                "sst2",
                "--do_train",
                "--drone_rank",
                "8",
                "--distill_alpha_kl",
                "0",
                "--distill_seed",
                "3",
            ],
            r"--distill_alpha_kl, --distill_seed given without `--do_distill`",
        ),
    ],
)
def test_run_glue_example_rejects_bad_options_before_loading_anything(tmp_path, monkeypatch, extra, match):
    run_glue = _run_glue_module(monkeypatch)
    with pytest.raises(ValueError, match=match):
        run_glue.main(["--model_name_or_path", str(tmp_path / "absent"), "--output_dir", str(tmp_path), *extra])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, given",
    [
        (["--drone_dtype", "bfloat16"], "--drone_dtype given"),
        (["--drone_quantize", "int8"], "--drone_quantize given"),
        (
            ["--drone_method", "svd", "--drone_num_calibration_samples", "64"],
            "--drone_method, --drone_num_calibration",
        ),
        (
            ["--drone_attention", "false", "--drone_output_dir", "out/small"],
            "--drone_attention, --drone_output_dir given",
        ),
    ],
)
def test_run_glue_example_refuses_drone_options_without_a_budget(tmp_path, monkeypatch, extra, given):
    """Without a budget nothing is compressed: `--drone_*` options would be ignored, so the run stops before loading
    the model (an absent folder here) or training, naming them and the budget options."""
    run_glue = _run_glue_module(monkeypatch)
    argv = ["--model_name_or_path", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError) as error:
        run_glue.main([*argv, "--task_name", "sst2", "--do_train", *extra])
    message = str(error.value)
    assert given in message and "without a compression budget" in message
    budgets = "--drone_rank, --drone_ranks, --drone_param_ratio, --drone_attention_rank, --drone_max_accuracy_drop, "
    assert f"Pass one of {budgets}--drone_target_speedup" in message
    assert not (tmp_path / "run").exists()


def test_run_glue_example_on_real_minilm_and_sst2(tmp_path, monkeypatch):
    from drone_hf.evaluation import evaluate_glue
    from drone_hf.glue import load_glue

    from .testing_utils import SHARED_GLUE, minilm_path, requires_shared_glue

    if not (SHARED_GLUE / "SST-2").is_dir():
        pytest.skip(requires_shared_glue("SST-2").kwargs["reason"])
    run_glue = _run_glue_module(monkeypatch)
    output = tmp_path / "sst2"
    results = run_glue.main(
        [
            "--model_name_or_path",
            str(minilm_path()),
            "--task_name",
            "sst2",
            "--data_dir",
            str(SHARED_GLUE),
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "64",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "64",
            "--per_device_train_batch_size",
            "16",
            "--learning_rate",
            "1e-4",
            "--max_steps",
            "4",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(output),
            "--drone_rank",
            "64",
            "--drone_num_calibration_samples",
            "32",
            "--do_distill",
            "--distill_max_steps",
            "2",
            "--distill_per_device_train_batch_size",
            "16",
        ]
    )
    drone = results["drone"]
    assert {"dense_accuracy", "compressed_accuracy", "compressed+distilled_accuracy", "flop_bound"} <= set(drone)
    # A timing the load on the machine flagged is withheld with the reason instead of published (drone_hf.speed).
    assert ("speedup" in drone) != ("speedup_withheld" in drone)
    assert drone["dense_accuracy"] == pytest.approx(results["eval_validation"]["eval_accuracy"])
    assert json.loads((output / "drone_results.json").read_text())["path"] == str(output / "drone")

    reloaded = AutoModelForSequenceClassification.from_pretrained(output / "drone")
    config = reloaded.config
    assert isinstance(reloaded, DroneBertForSequenceClassification) and config.drone_calibration["num_samples"] == 32
    assert len(config.drone_ranks) == 36 and set(config.drone_ranks.values()) == {64}
    tokenizer = run_glue.AutoTokenizer.from_pretrained(output / "drone")
    dev = load_glue(
        "sst2", tokenizer, split="validation", data_dir=SHARED_GLUE, max_length=64, max_samples=64, seed=42
    )  # run_glue subsets with TrainingArguments.seed
    reloaded_metrics = evaluate_glue(reloaded, dev, tokenizer, "sst2")
    assert reloaded_metrics["accuracy"] == pytest.approx(drone["compressed+distilled_accuracy"])
    card = ModelCard.load(output / "drone" / "README.md")
    assert {r.metric_name for r in card.data.eval_results} >= {"accuracy (dense)", "accuracy (compressed)"}


def test_the_work_after_training_is_not_silent(tmp_path, capsys, caplog):
    """Calibration, compression, evaluation and timing each show a bar with a total and log a line (issue 16)."""
    import logging

    train, dev = tiny_dataset(24), tiny_dataset(12, seed=2)
    drone = DroneCompressionCallback(
        DroneCompressionArguments(target_speedup=1.2, num_calibration_samples=16),
        train_dataset=train,
        eval_dataset=dev,
    )
    with caplog.at_level(logging.INFO, logger="drone_hf"):
        _trainer(tmp_path, [drone], train=train, disable_tqdm=False).train()
    err = capsys.readouterr().err
    for bar in ("Calibrating", "Spectra", "Factorising", "Evaluating dense", "Evaluating compressed", "Timing"):
        assert any(part.startswith(f"{bar}: 100%|") for part in err.split("\r")), bar
    for line in ("DRONE: calibrating on 16 training rows", "DRONE: compressing", "DRONE: evaluating", "DRONE: timing"):
        assert line in caplog.text
