"""`drone-hf compress` / `evaluate` on a token-classification (NER) model with run_ner.py-layout JSONL data and on an
extractive question-answering model with SQuAD-layout data: task type detection, word -> sub-token label alignment,
entity F1 / SQuAD F1 as the reported and budget metric (recomputed here by hand), the card, and the errors."""

import json
import re

import numpy as np
import pytest
import torch

import drone_hf
import drone_hf._api
from drone_hf.cli import main
from drone_hf.data import DataSource
from drone_hf.qa_metrics import answer_f1, normalize_answer
from drone_hf.token_data import load_token_task_data
from drone_hf.token_metrics import entity_scores

from .testing_utils import (
    NER_TAGS,
    ner_rows,
    ner_tokenizer,
    squad_rows,
    tiny_classifier_folder,
    tiny_qa_folder,
    tiny_token_classifier_folder,
    write_jsonl,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_heads")
    tiny_token_classifier_folder(root / "model")
    write_jsonl(root / "train.jsonl", ner_rows(240, seed=0))
    write_jsonl(root / "dev.jsonl", ner_rows(40, seed=1))
    return root


def _run(workspace, *options, command="compress", train=True, validation=None):
    data = ["--validation-file", str(validation or workspace / "dev.jsonl")]
    if train and command == "compress":
        data += ["--train-file", str(workspace / "train.jsonl")]
    extra = ["--calibration-samples", "64", "--heldout-samples", "176"] if command == "compress" else []
    return main([command, "--model", str(workspace / "model"), *data, *extra, "--latency-repeats", "2", *options])


def _table_row(printed: str, name: str) -> list[str]:
    """The cells of the Markdown table's header (`name="model"`) or of the row of model `name`."""
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    (line,) = lines[:1] if name == "model" else [line for line in lines[1:] if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def _by_hand(model, rows):
    """Entity F1 and token accuracy of `model` on run_ner rows, aligned here independently: each word's prediction
    is the argmax at its first sub-token."""
    tokenizer = ner_tokenizer()
    gold, predicted, right, total = [], [], 0, 0
    with torch.no_grad():
        for row in rows:
            encoded = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="pt")
            ids = model(**encoded).logits[0].argmax(-1).tolist()
            firsts = [
                i
                for i, word in enumerate(encoded.word_ids())
                if word is not None and (i == 0 or encoded.word_ids()[i - 1] != word)
            ]
            tags = [NER_TAGS[ids[i]] for i in firsts]
            gold.append(row["ner_tags"])
            predicted.append(tags)
            right += sum(a == b for a, b in zip(tags, row["ner_tags"]))
            total += len(tags)
    return 100 * entity_scores(gold, predicted)["seqeval_f1"], 100 * right / total


def test_labels_go_on_the_first_sub_token_of_each_word(workspace, tmp_path):
    rows = [{"tokens": ["movies", "good", "movies"], "ner_tags": ["O", "B-POS", "B-NEG"]}]
    source = DataSource(train_file=str(write_jsonl(tmp_path / "one.jsonl", rows)))
    task = load_token_task_data(source, splits=("train",), model_config=None)
    encoded = task.load("train", ner_tokenizer())[0]
    tokens = ner_tokenizer().convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["[CLS]", "movie", "##s", "good", "movie", "##s", "[SEP]"]
    # string tags without model names: sorted order (run_ner.py) -> B-NEG 0, B-POS 1, O 2
    assert task.label_names == ("B-NEG", "B-POS", "O")
    assert encoded["labels"] == [-100, 2, -100, 1, 0, -100, -100]


def test_compress_with_rank_reports_entity_f1_and_reloads(workspace, tmp_path, capsys, monkeypatch):
    made = []  # the compressed model of the run (the command imports the API from drone_hf._api when it starts)
    compress_model = drone_hf._api.compress_model
    monkeypatch.setattr(
        drone_hf._api, "compress_model", lambda *a, **k: made.append(compress_model(*a, **k)) or made[-1]
    )
    assert _run(workspace, "--rank", "8", "--output", str(tmp_path / "out")) == 0
    captured = capsys.readouterr()
    assert "Task type: token-classification (from its architectures ['BertForTokenClassification']" in captured.err
    header = _table_row(captured.out, "model")
    assert header[1:3] == ["seqeval_f1", "accuracy"]
    from transformers import AutoModelForTokenClassification

    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "DroneBertForTokenClassification"
    assert set(reloaded.config.drone_ranks.values()) == {8}
    batch = ner_tokenizer()(["good movies is great", "the bad plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, made[0](**batch).logits, rtol=0, atol=0)
    dev = [json.loads(line) for line in (workspace / "dev.jsonl").read_text().splitlines()]
    f1, accuracy = _by_hand(reloaded, dev)
    row = _table_row(captured.out, "drone")
    assert float(row[1]) == pytest.approx(f1, abs=0.006) and float(row[2]) == pytest.approx(accuracy, abs=0.006)
    dense_f1, _ = _by_hand(AutoModelForTokenClassification.from_pretrained(workspace / "model").eval(), dev)
    assert float(_table_row(captured.out, "dense")[1]) == pytest.approx(dense_f1, abs=0.006)
    summary = json.loads((tmp_path / "out" / "drone_results.json").read_text())
    assert summary["task_type"] == "token-classification" and summary["metric"] == "seqeval_f1"
    assert 100 * summary["results"]["drone"]["metrics"]["seqeval_f1"] == pytest.approx(f1)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card
    assert re.search(r"task:\n\s+type: token-classification\n\s+name: Token Classification", card)
    assert "name: seqeval_f1 (compressed)" in card
    assert "AutoModelForTokenClassification" in captured.out


def test_compress_with_an_entity_f1_budget_then_evaluate(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        _run(workspace, "--max-accuracy-drop", "5", "--task-type", "token-classification", "--output", str(out)) == 0
    )
    printed = capsys.readouterr().out
    summary = json.loads((out / "drone_results.json").read_text())
    allocation = summary["allocation"]
    assert allocation["heldout_kind"] == "token" and summary["metric"] == "seqeval_f1"
    assert allocation["heldout_drop"] + allocation["heldout_standard_error"] <= 5.0
    assert (
        allocation["time_share_ranks"]
        or summary["results"]["drone"]["parameters"] < summary["results"]["dense"]["parameters"]
    )
    assert "held-out seqeval_f1 drop" in printed and "labelled train tokens" in printed
    # the budget was spent on entity F1 of the held-out sentences: the 176 train rows after the 64 calibration rows
    # of the seeded shuffle (datasets' shuffle is numpy's permutation of that seed)
    train = [json.loads(line) for line in (workspace / "train.jsonl").read_text().splitlines()]
    heldout = [train[i] for i in np.random.default_rng(0).permutation(len(train))[64:240]]
    from transformers import AutoModelForTokenClassification

    dense = AutoModelForTokenClassification.from_pretrained(workspace / "model").eval()
    assert allocation["heldout_base_metric"] == pytest.approx(_by_hand(dense, heldout)[0])
    assert allocation["heldout_examples"] == sum(len(row["tokens"]) for row in heldout)  # one row per word

    assert _run(workspace, "--baseline", str(workspace / "model"), command="evaluate", train=False) == 0
    assert main(["evaluate", "--model", str(out), "--baseline", str(workspace / "model"), "--validation-file",
                 str(workspace / "dev.jsonl"), "--latency-repeats", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    compressed = AutoModelForTokenClassification.from_pretrained(out).eval()
    dev = [json.loads(line) for line in (workspace / "dev.jsonl").read_text().splitlines()]
    f1, accuracy = _by_hand(compressed, dev)
    row = _table_row(printed, "out")
    assert float(row[1]) == pytest.approx(f1, abs=0.006) and float(row[2]) == pytest.approx(accuracy, abs=0.006)


def test_token_accuracy_metric_and_integer_tags(workspace, tmp_path, capsys):
    rows = [{"tokens": r["tokens"], "ner_tags": [NER_TAGS.index(t) for t in r["ner_tags"]]} for r in ner_rows(30, 1)]
    dev = write_jsonl(tmp_path / "ids.jsonl", rows)
    assert _run(workspace, "--metric", "accuracy", command="evaluate", validation=dev) == 0
    printed = capsys.readouterr().out
    from transformers import AutoModelForTokenClassification

    _, accuracy = _by_hand(
        AutoModelForTokenClassification.from_pretrained(workspace / "model").eval(), ner_rows(30, 1)
    )
    assert _table_row(printed, "model")[1:3] == ["accuracy", "params (M)"]  # the only metric column
    row = [line for line in printed.splitlines() if line.startswith("| model |")][1]
    assert float(row.split("|")[2]) == pytest.approx(accuracy, abs=0.006)


def test_a_token_accuracy_budget_and_tsv_rows(workspace, tmp_path, capsys):
    # the same rows as TSV, words and tags space-separated, read like the JSONL
    train = [json.loads(line) for line in (workspace / "train.jsonl").read_text().splitlines()]
    lines = ["tokens\tner_tags"] + [" ".join(r["tokens"]) + "\t" + " ".join(r["ner_tags"]) for r in train]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    from_tsv = load_token_task_data(DataSource(train_file=str(tmp_path / "train.tsv")), splits=("train",))
    from_jsonl = load_token_task_data(DataSource(train_file=str(workspace / "train.jsonl")), splits=("train",))
    assert from_tsv.load("train", ner_tokenizer())["labels"] == from_jsonl.load("train", ner_tokenizer())["labels"]
    out = tmp_path / "out"
    options = ("--train-file", str(tmp_path / "train.tsv"), "--metric", "accuracy", "--max-accuracy-drop", "5")
    assert _run(workspace, *options, "--output", str(out), train=False) == 0
    assert "held-out accuracy drop" in capsys.readouterr().out
    summary = json.loads((out / "drone_results.json").read_text())
    assert summary["metric"] == "accuracy" and list(summary["results"]["dense"]["metrics"]) == ["accuracy"]
    heldout = [train[i] for i in np.random.default_rng(0).permutation(len(train))[64:240]]
    from transformers import AutoModelForTokenClassification

    dense = AutoModelForTokenClassification.from_pretrained(workspace / "model").eval()
    assert summary["allocation"]["heldout_base_metric"] == pytest.approx(_by_hand(dense, heldout)[1])


def _error(capsys) -> str:
    return capsys.readouterr().err.splitlines()[-1]


def _bad_file(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_bad_inputs_are_named(workspace, tmp_path, capsys):
    good = {"tokens": ["good", "movie"], "ner_tags": ["B-POS", "O"]}
    cases = [
        ([{**good, "ner_tags": ["B-POS", "B-PER"]}], (), r"Tags \['B-PER'\] are not labels of the model; its labels"),
        ([{"words": ["good"], "ner_tags": ["O"]}], (), r"no column `--text-column` 'tokens'.*found: \['words'"),
        ([good], ("--label-column", "tags"), r"no column `--label-column` 'tags'.*found: \['tokens', 'ner_tags'\]"),
        ([{**good, "ner_tags": ["O"]}], (), r"Row 1 of the validation rows has 2 words but 1 tags"),
        ([{**good, "ner_tags": [0, 7]}], (), r"Tag ids \[7\] are not labels of the model; its labels are 0..4"),
        ([good], ("--metric", "mcc"), r"`--metric` 'mcc' does not apply to token classification"),
        ([good], ("--task-type", "text-classification"), r"`--task-type text-classification` does not match"),
    ]
    for rows, options, message in cases:
        code = _run(workspace, *options, command="evaluate", validation=_bad_file(tmp_path, rows))
        assert code == 2
        assert re.search(message, _error(capsys)), message
    # entity F1 asked of a sequence classifier, and of a token model whose labels are not IOB tags
    tiny_classifier_folder(tmp_path / "classifier")
    (tmp_path / "dev.csv").write_text("sentence,label\ngood movie,1\nbad plot,0\n")
    code = main(["evaluate", "--model", str(tmp_path / "classifier"), "--validation-file", str(tmp_path / "dev.csv"),
                 "--metric", "seqeval-f1"])  # fmt: skip
    assert code == 2 and "entity-level metric of token classification" in _error(capsys)
    tiny_token_classifier_folder(tmp_path / "plain", label_names=("NOUN", "ADJ", "OTHER"))
    rows = [{"tokens": ["good", "movie"], "ner_tags": ["ADJ", "NOUN"]}]
    code = main(["evaluate", "--model", str(tmp_path / "plain"), "--validation-file", str(_bad_file(tmp_path, rows)),
                 "--metric", "seqeval-f1"])  # fmt: skip
    assert code == 2 and "'NOUN' is not an IOB tag" in _error(capsys)
    # without --metric, non-IOB tags are scored by token accuracy alone
    assert main(["evaluate", "--model", str(tmp_path / "plain"), "--validation-file", str(_bad_file(tmp_path, rows)),
                 "--latency-repeats", "1"]) == 0  # fmt: skip
    assert _table_row(capsys.readouterr().out, "model")[1:3] == ["accuracy", "params (M)"]


# ------------------------------------------------------------------------------------------- question answering


@pytest.fixture(scope="module")
def qa_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_qa")
    tiny_qa_folder(root / "model")
    write_jsonl(root / "train.jsonl", squad_rows(240, seed=0))
    write_jsonl(root / "dev.jsonl", squad_rows(40, seed=1))
    return root


def _squad_by_hand(model, rows):
    """SQuAD F1 and exact match (points) of `model` on rows: every (start, end) pair of context tokens with
    start <= end < start + 30 tried one by one, the answer text cut from the context at the tokens' offsets."""
    tokenizer = ner_tokenizer()
    f1s, exact = [], []
    with torch.no_grad():
        for row in rows:
            encoded = tokenizer(row["question"], row["context"], return_offsets_mapping=True, return_tensors="pt")
            offsets = encoded.pop("offset_mapping")[0].tolist()
            outputs = model(**encoded)
            start, end = outputs.start_logits[0].tolist(), outputs.end_logits[0].tolist()
            context = [i for i, part in enumerate(encoded.sequence_ids()) if part == 1]
            best = max((start[a] + end[b], a, b) for a in context for b in context if a <= b < a + 30)
            text = row["context"][offsets[best[1]][0] : offsets[best[2]][1]]
            f1s.append(max(answer_f1(text, gold) for gold in row["answers"]["text"]))
            exact.append(max(normalize_answer(text) == normalize_answer(g) for g in row["answers"]["text"]))
    return 100 * float(np.mean(f1s)), 100 * float(np.mean(exact))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_qa_compress_with_rank_and_with_a_budget_then_evaluate(qa_workspace, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForQuestionAnswering

    made = []
    compress_model = drone_hf._api.compress_model
    monkeypatch.setattr(
        drone_hf._api, "compress_model", lambda *a, **k: made.append(compress_model(*a, **k)) or made[-1]
    )
    assert _run(qa_workspace, "--rank", "8", "--output", str(tmp_path / "rank")) == 0
    captured = capsys.readouterr()
    assert "Task type: question-answering (from its architectures ['BertForQuestionAnswering']" in captured.err
    assert _table_row(captured.out, "model")[1:3] == ["squad_f1", "exact_match"]
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "rank").eval()
    assert type(reloaded).__name__ == "DroneBertForQuestionAnswering"
    batch = ner_tokenizer()(["good movies"], ["the plot is great fun"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).start_logits, made[0](**batch).start_logits, rtol=0, atol=0)
    dev = _read_jsonl(qa_workspace / "dev.jsonl")
    f1, exact = _squad_by_hand(reloaded, dev)
    row = _table_row(captured.out, "drone")
    assert float(row[1]) == pytest.approx(f1, abs=0.006) and float(row[2]) == pytest.approx(exact, abs=0.006)
    card = (tmp_path / "rank" / "README.md").read_text()
    assert re.search(r"task:\n\s+type: question-answering\n\s+name: Question Answering", card)
    assert "name: squad_f1 (compressed)" in card

    out = tmp_path / "budget"
    assert _run(qa_workspace, "--max-accuracy-drop", "5", "--output", str(out)) == 0
    capsys.readouterr()
    summary = json.loads((out / "drone_results.json").read_text())
    allocation = summary["allocation"]
    assert summary["task_type"] == "question-answering" and summary["metric"] == "squad_f1"
    assert allocation["heldout_drop"] + allocation["heldout_standard_error"] <= 5.0
    train = _read_jsonl(qa_workspace / "train.jsonl")
    heldout = [train[i] for i in np.random.default_rng(0).permutation(len(train))[64:240]]
    dense = AutoModelForQuestionAnswering.from_pretrained(qa_workspace / "model").eval()
    assert allocation["heldout_base_metric"] == pytest.approx(_squad_by_hand(dense, heldout)[0])

    code = main(["evaluate", "--model", str(out), "--baseline", str(qa_workspace / "model"), "--validation-file",
                 str(qa_workspace / "dev.jsonl"), "--latency-repeats", "2"])  # fmt: skip
    assert code == 0
    f1, exact = _squad_by_hand(AutoModelForQuestionAnswering.from_pretrained(out).eval(), dev)
    row = _table_row(capsys.readouterr().out, "budget")
    assert float(row[1]) == pytest.approx(f1, abs=0.006) and float(row[2]) == pytest.approx(exact, abs=0.006)


def test_qa_bad_inputs_are_named(qa_workspace, tmp_path, capsys):
    good = {
        "question": "is it good",
        "context": "the movie is good",
        "answers": {"text": ["good"], "answer_start": [13]},
    }
    cases = [
        (
            [{k: v for k, v in good.items() if k != "context"}],
            (),
            r"no column \['context'\].*found: \['question', 'ans",
        ),
        ([{**good, "answers": {"text": ["good"], "answer_start": [4]}}], (), r"'good' is not at `answer_start` 4"),
        ([{**good, "answers": {"text": [], "answer_start": []}}], (), r"unanswerable questions are not supported"),
        ([good], ("--metric", "seqeval-f1"), r"`--metric` 'seqeval-f1' does not apply to question answering"),
        ([good], ("--task-type", "token-classification"), r"`--task-type token-classification` does not match"),
    ]
    for rows, options, message in cases:
        code = _run(qa_workspace, *options, command="evaluate", validation=_bad_file(tmp_path, rows))
        assert code == 2
        assert re.search(message, _error(capsys)), message
