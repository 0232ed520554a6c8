"""benchmarks/base_size.py's bookkeeping: the stage cache (keys, atomic entries, resume), the Pareto front, and the
refusal of a multi-process launch."""

import json
from pathlib import Path

import pytest

from .testing_utils import benchmark_module, minilm_path


@pytest.fixture(scope="module")
def base_size():
    with benchmark_module("base_size") as module:
        yield module


def test_settings_key_is_order_free_and_tells_settings_apart(base_size):
    key = base_size.settings_key
    assert key({"steps": 600, "lr": 1e-4}) == key({"lr": 1e-4, "steps": 600})
    assert key({"steps": 600, "lr": 1e-4}) != key({"steps": 1200, "lr": 1e-4})
    assert key({"teacher": "a", "x": 1}) != key({"teacher": "b", "x": 1})


def test_entry_exists_only_once_built(base_size, tmp_path):
    settings = {"method": "drone", "budget": 1.0}
    path = base_size.entry_path(tmp_path, "budget", "drone-drop1", settings)
    assert base_size.load_entry(path) is None
    with base_size.building(path, settings) as (scratch, result):
        scratch.mkdir(parents=True)
        (scratch / "model.bin").write_text("weights")
        result["dev"] = 84.5
        assert base_size.load_entry(path) is None  # nothing under the final name while building
    assert base_size.load_entry(path) == {"dev": 84.5}
    assert (path / "model.bin").read_text() == "weights"
    assert json.loads((path / "settings.json").read_text()) == settings
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no scratch left


def test_crashed_build_leaves_no_entry_and_keeps_a_finished_one(base_size, tmp_path):
    settings = {"steps": 6}
    path = base_size.entry_path(tmp_path, "distill", "drone-2x", settings)
    with pytest.raises(RuntimeError):
        with base_size.building(path, settings) as (scratch, result):
            scratch.mkdir(parents=True)
            result["dev"] = 1.0
            raise RuntimeError("killed mid-stage")
    assert base_size.load_entry(path) is None
    assert not path.parent.exists() or not any(path.parent.iterdir())
    with base_size.building(path, settings) as (_, result):
        result["dev"] = 2.0
    with pytest.raises(RuntimeError):
        with base_size.building(path, settings) as (_, result):
            raise RuntimeError("a second build that crashes")
    assert base_size.load_entry(path) == {"dev": 2.0}


def test_pareto_front(base_size):
    pairs = [
        (1.0, 85.0),  # 0 dense: the most accurate
        (1.5, 84.0),  # 1 on the front
        (1.4, 83.0),  # 2 dominated by 1
        (2.0, 84.0),  # 3 dominates 1 (faster, as good)
        (3.0, 80.0),  # 4 the fastest
        (2.5, 79.0),  # 5 dominated by 4
        (2.0, 84.0),  # 6 a tie with 3: neither dominates
    ]
    assert base_size.pareto_front(pairs) == [0, 3, 6, 4]
    assert base_size.pareto_front([]) == []


def test_headline_picks_the_fastest_row_within_each_budget(base_size):
    rows = [
        {"kind": "dense", "speedup_b8": 1.0, "delta": 0.0},
        {"kind": "budget", "name": "a", "speedup_b8": 1.8, "delta": -0.9},
        {"kind": "budget", "name": "b", "speedup_b8": 2.1, "delta": -1.2},
        {"kind": "budget", "name": "c", "speedup_b8": None, "delta": -0.1},  # speed withheld
        {"kind": "distilled", "name": "d", "speedup_b8": 3.2, "delta": -1.4},
    ]
    best = base_size.headline(rows, [1.0, 1.5])
    assert best["no_retraining_within_1"]["name"] == "a"
    assert best["no_retraining_within_1.5"]["name"] == "b"
    assert best["distilled_within_1"] is None


def test_main_refuses_a_multi_process_launch_before_any_work(base_size, monkeypatch):
    """Under `accelerate launch` / `torchrun` (`WORLD_SIZE` > 1) every rank would write the same cache entries: main()
    exits before it even parses its arguments; `WORLD_SIZE=1` (one process) goes on."""

    def parse_args(argv):
        raise LookupError("parse_args reached")

    monkeypatch.setattr(base_size, "parse_args", parse_args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exited:
        base_size.main(["--model", "minilm", "--task", "mrpc", "--smoke"])
    message = str(exited.value.code)
    assert message.startswith("benchmarks/base_size.py runs in one process, but WORLD_SIZE=2")
    assert "Run it directly: `python benchmarks/base_size.py" in message
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(LookupError, match="parse_args reached"):
        base_size.main(["--model", "minilm", "--task", "mrpc", "--smoke"])


@pytest.mark.parametrize("bf16", [False, True])  # with bf16: the teacher cache in bf16 too
def test_distillation_stage_arguments_build_and_carry_the_options(base_size, tmp_path, bf16):
    """The distill stage's arguments, built without training (the stage passed `gradient_accumulation_steps` twice
    once `DroneDistillationArguments` gained it, and crashed before its first step)."""
    argv = [
        "--model",
        "minilm",
        "--stages",
        "distill",
        "--device",
        "cpu",
        "--grad-accum",
        "4",
        "--distill-steps",
        "90",
    ]
    args = base_size.parse_args(
        argv
        + ["--curve-points", "3", "--distill-batch-size", "8"]
        + (
            ["--distill-bf16", "--cache-teacher", "--teacher-cache-dtype", "bfloat16", "--distill-rows", "100"]
            if bf16
            else []
        )
    )
    settings, training = base_size.distillation_arguments(args, 90, str(tmp_path))
    assert (training.max_steps, training.per_device_train_batch_size, training.gradient_accumulation_steps) == (
        90,
        8,
        4,
    )
    assert training.bf16 is bf16 and training.learning_rate == args.distill_lr and training.logging_steps == 30
    assert training.save_strategy == "no" and training.use_cpu
    assert (settings.alpha_hidden, settings.alpha_kl, settings.temperature) == (1.0, 1.0, 2.0)
    assert settings.cache_teacher_outputs is bf16
    assert settings.teacher_cache_dtype == ("bfloat16" if bf16 else "float32")
    entry_settings = base_size.Run.create(args).distill_entries()[0][4]
    assert entry_settings.get("teacher_cache") == ("bfloat16" if bf16 else None)
    assert entry_settings.get("distill_rows") == (100 if bf16 else None)


def test_the_sequential_method_runs_the_cli_with_sequential_and_keys_its_checks(base_size):
    """`--methods drone-seq` is `drone-hf compress --method drone --sequential --sequential-checks N`, its own cache
    entry (keyed by N), read back from the CLI's `drone` results."""
    args = base_size.parse_args(["--model", "minilm", "--methods", "drone", "drone-seq", "--sequential-checks", "2"])
    run = base_size.Run.create(args)
    entries = {name: settings for name, _, _, _, settings in run.budget_entries()}
    assert (
        "sequential_checks" not in entries["drone-drop1-fast"]
        and entries["drone-seq-drop1-fast"]["sequential_checks"] == 2
    )
    command = base_size._compress_command(run, {"path": "teacher"}, "drone-seq", 1.0, "out")
    assert command[command.index("--method") + 1] == "drone" and command[-1] == "--sequential"
    assert command[command.index("--sequential-checks") + 1] == "2"
    plain = base_size._compress_command(run, {"path": "teacher"}, "drone", 1.0, "out")
    assert "--sequential" not in plain and "--sequential-checks" not in plain


def test_budget_costs_time_the_budget_in_an_entry_of_its_own(base_size):
    """`--budget-costs flops float32`: one entry per cost; `float32` is the CLI's `--dtype float32` (a budget split by
    measured time shares) under its own name and key, while the `flops` entry keeps the command and key it had before
    the option (cached entries stay valid)."""
    one = ["--model", "minilm", "--methods", "drone", "--budgets", "1"]
    run = base_size.Run.create(base_size.parse_args([*one, "--budget-costs", "flops", "float32"]))
    plain = base_size.Run.create(base_size.parse_args(one))
    entries = {name: (path, settings) for name, _, _, path, settings in run.budget_entries()}
    assert list(entries) == ["drone-drop1-fast", "drone-drop1-fast-timed-float32"]
    (plain_name, _, _, plain_path, plain_settings), *_ = plain.budget_entries()
    assert entries[plain_name] == (plain_path, plain_settings) and "deployment_dtype" not in plain_settings
    timed_path, timed_settings = entries["drone-drop1-fast-timed-float32"]
    assert timed_settings["deployment_dtype"] == "float32" and timed_path != plain_path
    command = base_size._compress_command(run, {"path": "teacher"}, "drone", 1.0, "out", "float32")
    assert command[command.index("--dtype") + 1] == "float32"
    assert "--dtype" not in base_size._compress_command(plain, {"path": "teacher"}, "drone", 1.0, "out")
    with pytest.raises(SystemExit):
        base_size.parse_args(["--budget-costs", "bfloat16"])


def test_distillation_at_uniform_ranks_over_the_linears_only(base_size):
    """`--distill-ranks R ...` distils one model per uniform rank instead of per FLOP target, and
    `--distill-no-attention` allocates over the linears only; both are part of the entry's name and key, and the
    FLOP-target entries keep the names and keys they had (cached entries stay valid)."""
    ranked = base_size.parse_args(
        ["--model", "minilm", "--distill-ranks", "32", "48", "--distill-steps", "100", "--distill-no-attention"]
    )
    entries = base_size.Run.create(ranked).distill_entries()
    assert [(name, label, steps) for name, label, steps, _, _ in entries] == [
        ("drone-rank32-linears-distilled", "rank 32, linears only", 100),
        ("drone-rank48-linears-distilled", "rank 48, linears only", 100),
    ]
    settings = entries[0][4]
    assert settings["rank"] == 32 and "target_speedup" not in settings and settings["attention"] is False
    default = base_size.Run.create(base_size.parse_args(["--model", "minilm"]))
    (name, label, _, _, plain), *_ = default.distill_entries()
    assert (name, label) == ("drone-2x-distilled", "2× FLOPs")
    assert plain["target_speedup"] == 2.0 and "rank" not in plain and "attention" not in plain
    weighted = base_size.parse_args(
        ["--model", "minilm", "--distill-ranks", "32", "--distill-steps", "100", "--distill-no-attention"]
        + ["--distill-method", "drone-act"]
    )
    ((name, _, _, path, settings),) = base_size.Run.create(weighted).distill_entries()
    assert name == "drone-act-rank32-linears-distilled" and settings["method"] == "drone-act"
    assert path != entries[0][3]
    for bad in (["--distill-ranks", "32", "48", "--distill-steps", "1", "2", "3"], ["--distill-ranks", "0"]):
        with pytest.raises(SystemExit):
            base_size.parse_args(["--model", "minilm", *bad])


def test_augmented_distillation_is_named_and_keyed_apart(base_size):
    """`--distill-augment COPIES` adds word-replaced copies (augment.py): the entry's name, label and key say so and
    carry the probability and candidate count; without it the entry keeps its name and key."""
    argv = ["--model", "minilm", "--distill-ranks", "32", "--distill-steps", "100", "--distill-no-attention"]
    (plain_name, _, _, plain_path, plain), *_ = base_size.Run.create(base_size.parse_args(argv)).distill_entries()
    args = base_size.parse_args([*argv, "--distill-augment", "9", "--augment-prob", "0.3"])
    (name, label, _, path, settings), *_ = base_size.Run.create(args).distill_entries()
    assert (name, label) == ("drone-rank32-linears-aug9-distilled", "rank 32, linears only, augmented ×10")
    assert settings["augment"] == [9, 0.3, 15] and "augment" not in plain
    assert plain_name == "drone-rank32-linears-distilled" and path != plain_path
    for bad in (["--distill-augment", "-1"], ["--augment-prob", "0"], ["--augment-prob", "1.5"]):
        with pytest.raises(SystemExit):
            base_size.parse_args([*argv, *bad])
    with pytest.raises(SystemExit):
        base_size.parse_args([*argv, "--augment-neighbours", "0"])


def test_refitted_distillation_is_named_and_keyed_apart(base_size):
    """`--distill-sequential` starts distillation from the sequentially refitted student: the entry's name, label and
    key say so; without it the entry keeps its name and key (finished students stay found)."""
    argv = ["--model", "minilm", "--distill-ranks", "32", "--distill-steps", "100", "--distill-no-attention"]
    (plain_name, _, _, plain_path, plain), *_ = base_size.Run.create(base_size.parse_args(argv)).distill_entries()
    args = base_size.parse_args([*argv, "--distill-sequential"])
    (name, label, _, path, settings), *_ = base_size.Run.create(args).distill_entries()
    assert (name, label) == ("drone-rank32-linears-seq-distilled", "rank 32, linears only, refitted")
    assert settings["sequential"] is True and "sequential" not in plain
    assert plain_name == "drone-rank32-linears-distilled" and path != plain_path
    assert "sequential_dense_weight" not in settings
    args = base_size.parse_args([*argv, "--distill-sequential", "--distill-dense-weight", "0.5"])
    (name, label, _, anchored_path, anchored), *_ = base_size.Run.create(args).distill_entries()
    assert name == "drone-rank32-linears-seq-dw0.5-distilled" and label.endswith("refitted (dense weight 0.5)")
    assert anchored["sequential_dense_weight"] == 0.5 and anchored_path not in (path, plain_path)
    for bad in (
        ["--distill-dense-weight", "1"],
        ["--distill-sequential", "--distill-dense-weight", "-1"],
        ["--distill-sequential", "--distill-method", "drone-act"],
    ):
        with pytest.raises(SystemExit):
            base_size.parse_args([*argv, *bad])


def test_full_length_timing_rows_are_the_text_unpadded(base_size):
    """`--timing-rows full` times sequences of exactly `seq_len` real tokens: the rows' text tokens in order, cut into
    pieces, each wrapped in the special tokens, no padding; its timing has a key of its own and the padded timing
    keeps the key it had (cached timings stay valid)."""
    from transformers import AutoTokenizer

    with benchmark_module("common") as common:
        full_length_inputs = common.full_length_inputs
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["a short row", "the second row is a little longer than the first", "and a third one to spare"]
    rows = [tokenizer(text) for text in texts]
    inputs = full_length_inputs(tokenizer, rows, batch_size=2, seq_len=8)
    assert inputs["input_ids"].shape == (2, 8) and bool(inputs["attention_mask"].all())
    assert not (inputs["input_ids"] == tokenizer.pad_token_id).any()
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    for i, row in enumerate(inputs["input_ids"].tolist()):
        assert row == [tokenizer.cls_token_id, *stream[6 * i : 6 * (i + 1)], tokenizer.sep_token_id]
    with pytest.raises(ValueError, match="fewer than 8 x 6"):
        full_length_inputs(tokenizer, rows[:1], batch_size=8, seq_len=8)
    padded = base_size.Run.create(base_size.parse_args(["--model", "minilm"]))
    full = base_size.Run.create(base_size.parse_args(["--model", "minilm", "--timing-rows", "full"]))
    models = {"m": Path("m")}
    (padded_path, padded_settings), (full_path, full_settings) = padded.time_entry(models), full.time_entry(models)
    assert "rows" not in padded_settings and full_settings == {**padded_settings, "rows": "full"}
    assert padded_path != full_path


def test_teacher_holdout_splits_train_rows_the_teacher_never_sees(base_size, tmp_path):
    """`common.split_glue_train`: the two halves partition the train rows (each row once, the header kept byte for
    byte, the dev file copied), the draw is seeded, and the held-out half is what the budget's CLI reads."""
    source = tmp_path / "glue" / "MRPC"
    source.mkdir(parents=True)
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n".encode()
    rows = [f"{i % 2}\t{i}\t{i + 1000}\tleft {i}\tright {i}\n".encode() for i in range(40)]
    (source / "train.tsv").write_bytes(header + b"".join(rows))
    (source / "dev.tsv").write_bytes(header + rows[0])
    split = base_size.split_glue_train("mrpc", tmp_path / "glue", 12, 3, tmp_path / "split")
    parts = {}
    for part in ("teacher", "holdout"):
        text = (split / part / "MRPC" / "train.tsv").read_bytes().splitlines(keepends=True)
        assert text[0] == header and (split / part / "MRPC" / "dev.tsv").read_bytes() == header + rows[0]
        parts[part] = text[1:]
    assert len(parts["holdout"]) == 12 and sorted(parts["teacher"] + parts["holdout"]) == sorted(rows)
    again = base_size.split_glue_train("mrpc", tmp_path / "glue", 12, 4, tmp_path / "other")
    assert (again / "holdout" / "MRPC" / "train.tsv").read_bytes() != header + b"".join(parts["holdout"])
    with pytest.raises(ValueError, match="holdout"):
        base_size.split_glue_train("mrpc", tmp_path / "glue", 40, 0, tmp_path / "all")

    args = base_size.parse_args(["--model", "minilm", "--teacher-holdout", "2048", "--methods", "drone"])
    assert args.heldout_samples == 2048 - args.calibration_samples
    run = base_size.Run.create(args)
    assert run.teacher_settings()["holdout"] == 2048
    assert "holdout" not in base_size.Run.create(base_size.parse_args(["--model", "minilm"])).teacher_settings()
    run.root = tmp_path / "run"
    command = base_size._compress_command(run, {"path": "teacher"}, "drone", 1.0, "out")
    data = Path(command[command.index("--data-dir") + 1])
    assert data == tmp_path / "run" / "data" / "holdout2048-seed0" / "holdout" / "MRPC"
    assert len((data / "train.tsv").read_bytes().splitlines()) == 2048 + 1
    with pytest.raises(SystemExit):
        base_size.parse_args(["--model", "minilm", "--teacher-holdout", "520"])  # 8 rows after calibration


def test_timing_in_several_processes_reports_their_median_and_keys_it_apart(base_size, monkeypatch):
    """`--timing-processes N`: the speed-up is the median of the processes' own round-robin ratios, each one kept;
    the flags are those of the median (here above its FLOP bound); the dense row stays 1; the entry has a key of its
    own, as does a timing under an allocator variable (`GLIBC_TUNABLES`), and one process keeps the key it had."""

    def run(dense_ms, model_ms, spread):
        ratio = dense_ms / model_ms
        return {
            "speeds": {
                "8": {
                    "dense": {"latency_ms": dense_ms, "cpu_ms": 2 * dense_ms, "speedup_measured": 1.0},
                    "m": {
                        "latency_ms": model_ms,
                        "cpu_ms": 2 * model_ms,
                        "speedup_measured": ratio,
                        "cpu_speedup": ratio,
                        "spread": spread,
                    },
                }
            },
            "flop_bounds": {"dense": 1.0, "m": 3.0},
        }

    combined = base_size.combine_processes([run(180, 60, 0.1), run(200, 80, 0.3), run(190, 50, 0.05)])["8"]
    assert combined["dense"]["speedup"] == 1.0 and combined["dense"]["latency_ms"] == 190
    entry = combined["m"]
    assert entry["processes"] == [3.0, 2.5, 3.8]
    assert entry["speedup_measured"] == entry["speedup"] == 3.0 and entry["process_range"] == [2.5, 3.8]
    assert entry["latency_ms"] == 60 and entry["spread"] == 0.1 and entry["flags"] == []
    above = base_size.combine_processes([run(180, 40, 0.1), run(200, 40, 0.1), run(190, 80, 0.1)])["8"]["m"]
    assert above["speedup"] is None and "above its FLOP bound" in above["flags"][0]
    loads = [{"load_average": [0.5, 1.9]}, {"load_average": [1.8, 2.0]}, {"load_average": [1.7, 2.1]}]
    assert base_size.load_over(loads) == [0.5, 2.1]  # before the first process, after the last

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    models = {"m": Path("m")}
    one = base_size.Run.create(base_size.parse_args(["--model", "minilm"]))
    five = base_size.Run.create(base_size.parse_args(["--model", "minilm", "--timing-processes", "5"]))
    (one_path, one_settings), (five_path, five_settings) = one.time_entry(models), five.time_entry(models)
    assert "processes" not in one_settings and five_settings == {**one_settings, "processes": 5}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    tuned_path, tuned_settings = one.time_entry(models)
    assert tuned_settings["env"] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert len({one_path, five_path, tuned_path}) == 3
    assert "3 fresh processes" in base_size.timing_text({"processes_count": 3, "env": tuned_settings["env"]})
    with pytest.raises(SystemExit):
        base_size.parse_args(["--timing-processes", "0"])


def test_a_timing_process_loads_the_models_and_times_them_against_the_dense_one(base_size, tmp_path):
    """`time_in_fresh_process`: a new `python base_size.py --time-worker SPEC OUT` loads the saved dense and
    compressed models, times them round-robin on SST-2 train text and returns per-batch entries with the FLOP
    bounds; `combine_processes` takes such results as they come back."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import drone_hf

    from .testing_utils import tiny_config

    if base_size.glue_data_dir("sst2") is None:
        pytest.skip("needs ../shared/glue/SST-2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    dense = AutoModelForSequenceClassification.from_config(
        tiny_config("bert", vocab_size=tokenizer.vocab_size, num_labels=2)
    ).eval()
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    drone_hf.compress_model(dense, None, method="svd", rank=2).save_pretrained(tmp_path / "m")
    spec = {
        "teacher": str(tmp_path / "dense"),
        "models": {"m": str(tmp_path / "m")},
        "task": "sst2",
        "seq_len": 16,
        "batch_sizes": [2, 1],
        "repeats": 2,
        "rows": "full",
        "threads": 1,
        "seed": 0,
    }
    timing = base_size.time_in_fresh_process(spec)
    assert list(timing["speeds"]) == ["2", "1"] and timing["threads"] == 1
    assert timing["flop_bounds"]["dense"] == 1.0 and timing["flop_bounds"]["m"] > 1.0
    for speeds in timing["speeds"].values():
        assert speeds["dense"]["speedup"] == 1.0 and speeds["m"]["latency_ms"] > 0
    combined = base_size.combine_processes([timing, timing])
    assert combined["1"]["m"]["processes"] == [timing["speeds"]["1"]["m"]["speedup_measured"]] * 2


def test_report_name_replaces_the_default_stem_and_refuses_folders(base_size):
    """The report's files are `base_size_<model>_<task>[_holdoutN][_fullrows]` unless `--report-name` names them (so a
    run does not replace an earlier run's committed report); a name with a folder in it is refused."""
    args = base_size.parse_args(["--model", "mpnet", "--task", "sst2", "--timing-rows", "full"])
    assert base_size.report_stem(args, "sst2") == "base_size_mpnet_sst2_fullrows"
    args = base_size.parse_args(["--model", "mpnet", "--teacher-holdout", "2048"])
    assert base_size.report_stem(args, "mrpc") == "base_size_mpnet_mrpc_holdout2048"
    args = base_size.parse_args(["--model", "mpnet", "--timing-rows", "full", "--report-name", "base_size_r80"])
    assert base_size.report_stem(args, "mrpc") == "base_size_r80"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(SystemExit):
            base_size.parse_args(["--model", "mpnet", "--report-name", bad])
