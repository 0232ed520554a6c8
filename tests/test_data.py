"""Your own data: `DataSource` / `load_task_data` / `task_metrics`, `drone-hf compress` on a CSV written here, and
`examples/run_glue.py` on the same files."""

import csv
import json

import numpy as np
import pytest
from huggingface_hub import ModelCard

from drone_hf.cli import main
from drone_hf.data import DataSource, TaskData, label_config, load_task_data
from drone_hf.task_metrics import task_metrics

from .testing_utils import random_sentences, tiny_classifier_folder, tiny_tokenizer


def _write_csv(path, rows, header, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A tiny classifier and a sentiment CSV of our own: columns `review` / `sentiment`, text labels."""
    root = tmp_path_factory.mktemp("own")
    tiny_classifier_folder(root / "model")
    for name, count, seed in (("train.csv", 96, 0), ("dev.csv", 24, 1)):
        sentences = random_sentences(count, seed)
        rows = [(i, text, ("pos", "neg")[i % 2]) for i, text in enumerate(sentences)]
        _write_csv(root / name, rows, ("id", "review", "sentiment"))
    return root


# ------------------------------------------------------------------------------------------------------ the source
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "Pass one source of data"),
        ({"task": "sst2", "dataset_name": "imdb"}, ValueError, "Pass one source of data"),
        ({"task": "sst3"}, ValueError, "Unknown GLUE task"),
        ({"task": "sst2", "metrics": ("f1",)}, ValueError, "do not apply to the GLUE task"),
        ({"dataset_name": "imdb", "data_dir": "x"}, ValueError, "`--data-dir` is the local GLUE folder"),
        ({"train_file": "rows.parquet"}, ValueError, "must be one of"),
        ({"train_file": "absent.csv"}, FileNotFoundError, "is not a file"),
        ({"dataset_name": "imdb", "text_columns": ("a", "b", "c")}, ValueError, "one or two columns"),
        ({"dataset_name": "imdb", "metrics": ("bleu",)}, ValueError, "Unknown `--metric` 'bleu'"),
    ],
)
def test_a_bad_source_is_refused_before_anything_is_read(kwargs, error, match):
    with pytest.raises(error, match=match):
        DataSource(**kwargs)


def test_text_labels_columns_and_metrics_from_a_csv(own_data):
    source = DataSource(
        train_file=str(own_data / "train.csv"),
        validation_file=str(own_data / "dev.csv"),
        label_column="sentiment",
        metrics=("f1",),
    )
    task = load_task_data(source)
    # `id` is not text; `review` is the only other column; labels are mapped in sorted order
    assert task.text_columns == ("review",) and task.label_column == "sentiment"
    assert task.label_names == ("neg", "pos") and task.num_labels == 2
    assert task.metric_names == ("f1", "accuracy") and task.main_metric == "f1"
    dev = task.load("validation", tiny_tokenizer(), max_length=16)
    assert set(dev.column_names) >= {"input_ids", "attention_mask", "labels"} and len(dev) == 24
    assert dev["labels"][:2] == [1, 0]  # pos, neg
    assert task.card_dataset["id"] == "local:dev.csv" and task.calibration_dataset == "local:train.csv"


def test_the_models_own_label_names_are_kept(own_data):
    from transformers import BertConfig

    config = BertConfig(num_labels=2, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    source = DataSource(validation_file=str(own_data / "dev.csv"), label_column="sentiment")
    task = load_task_data(source, splits=("validation",), model_config=config)
    assert task.label_names == ("pos", "neg")
    assert label_config(task, config) is None  # the model already has names: nothing to write


def test_jsonl_tsv_regression_and_pairs(tmp_path):
    lines = [{"s1": f"w{i}", "s2": f"w{i + 1}", "score": 0.5 * i} for i in range(6)]
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    task = load_task_data(DataSource(validation_file=str(tmp_path / "dev.jsonl"), label_column="score"),
                          splits=("validation",))  # fmt: skip
    assert task.num_labels == 1 and task.text_columns == ("s1", "s2")
    assert task.metric_names == ("pearson", "spearmanr")
    _write_csv(tmp_path / "dev.tsv", [("a b", "0"), ("b a", "2")], ("sentence", "label"), delimiter="\t")
    task = load_task_data(DataSource(validation_file=str(tmp_path / "dev.tsv")), splits=("validation",))
    assert task.num_labels == 3 and task.label_names is None and task.text_columns == ("sentence",)


def test_missing_columns_name_what_is_there(own_data, tmp_path):
    source = DataSource(validation_file=str(own_data / "dev.csv"), label_column="stars")
    with pytest.raises(ValueError, match=r"no label column 'stars'.*'review', 'sentiment'"):
        load_task_data(source, splits=("validation",))
    source = DataSource(validation_file=str(own_data / "dev.csv"), text_columns=("body",), label_column="sentiment")
    with pytest.raises(ValueError, match=r"`--text-columns` \['body'\] are not columns"):
        load_task_data(source, splits=("validation",))
    with pytest.raises(ValueError, match=r"needs train rows: pass `--train-file`"):
        load_task_data(DataSource(validation_file=str(own_data / "dev.csv")))


def test_task_metrics():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [1.0, 0.0]])
    labels = [1, 1, 0, 0]
    scores = task_metrics(["acc", "f1", "mcc"], logits, labels, num_labels=2)
    assert scores == pytest.approx({"accuracy": 0.5, "f1": 0.5, "matthews_correlation": 0.0})
    assert task_metrics(["spearman"], [[1.0], [2.0], [3.0]], [0.1, 0.2, 0.3], num_labels=1) == {"spearmanr": 1.0}
    with pytest.raises(ValueError, match="does not apply to a 2-class classification"):
        task_metrics(["pearson"], logits, labels, num_labels=2)


def test_glue_is_the_shortcut():
    task = TaskData.from_glue("MRPC")
    assert task.main_metric == "f1" and task.label_names == ("not_equivalent", "equivalent")
    assert task.compute_metrics([[0.1, 0.9], [2.0, -1.0]], [1, 1])["f1"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------- drone-hf compress
def test_compress_on_a_csv_of_your_own(own_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            "--model",
            str(own_data / "model"),
            "--train-file",
            str(own_data / "train.csv"),
            "--validation_file",  # transformers' spelling works too
            str(own_data / "dev.csv"),
            "--text-column",
            "review",
            "--label_column_name",
            "sentiment",
            "--metric",
            "f1",
            "--rank",
            "8",
            "--calibration-samples",
            "32",
            "--latency-repeats",
            "3",
            "--base-model",
            "me/tiny-sentiment",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "| model | f1 | accuracy |" in printed.out and "dev.csv (24 examples)" in printed.out
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["drone_calibration"]["dataset"] == "local:train.csv"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "me/tiny-sentiment" and not card.data.datasets  # a local file is no Hub dataset
    assert {r.metric_name for r in card.data.eval_results} == {
        "f1 (dense)",
        "f1 (compressed)",
        "accuracy (dense)",
        "accuracy (compressed)",
    }
    assert {r.dataset_type for r in card.data.eval_results} == {"custom"}
    summary = json.loads((out / "drone_results.json").read_text())
    assert summary["results"]["drone"]["metrics"]["f1"] == pytest.approx(
        next(r.metric_value for r in card.data.eval_results if r.metric_name == "f1 (compressed)"), abs=1e-6
    )


def test_run_glue_example_on_a_csv_of_your_own(own_data, tmp_path, monkeypatch):
    from .test_callbacks import _run_glue_module

    run_glue = _run_glue_module(monkeypatch)
    results = run_glue.main(
        [
            "--model_name_or_path",
            str(own_data / "model"),
            "--train-file",  # the dash spelling
            str(own_data / "train.csv"),
            "--validation_file",
            str(own_data / "dev.csv"),
            "--text_column_names",
            "review",
            "--label_column_name",
            "sentiment",
            "--metric_name",
            "f1,mcc",
            "--do_train",
            "--do_eval",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(tmp_path / "run"),
            "--drone_rank",
            "4",
            "--drone_num_calibration_samples",
            "16",
        ]
    )
    assert {"eval_f1", "eval_matthews_correlation", "eval_accuracy"} <= set(results["eval_validation"])
    assert {"dense_f1", "compressed_f1", "compressed_matthews_correlation"} <= set(results["drone"])
    config = json.loads((tmp_path / "run" / "drone" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    card = ModelCard.load(tmp_path / "run" / "drone" / "README.md")
    assert "f1 (compressed)" in {r.metric_name for r in card.data.eval_results}
