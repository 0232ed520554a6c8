"""Entity-level F1 (seqeval's default mode, own code) and token accuracy, against hand-computed cases; the budget's
sentence-aware metric and its bootstrap."""

import numpy as np
import pytest

from drone_hf.heldout import paired_standard_error
from drone_hf.token_metrics import EntityF1Points, entity_scores, iob_entities, token_task_metrics


NAMES = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
ID = {name: index for index, name in enumerate(NAMES)}


@pytest.mark.parametrize(
    ("tags", "entities"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
        (["I-PER", "I-PER", "O"], [("PER", 0, 1)]),  # I- without B- starts an entity
        (["O", "I-LOC", "B-LOC", "I-LOC"], [("LOC", 1, 1), ("LOC", 2, 3)]),
        (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),  # adjacent entities of one type
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change ends the entity
        (["O", "O", "O"], []),
        ([], []),
    ],
)
def test_iob_entities_decode_like_conlleval(tags, entities):
    assert iob_entities(tags) == entities


def test_entity_scores_hand_computed_cases():
    # boundary error: gold PER(0,1), LOC(3,3); predicted PER(0,0), LOC(3,3) -> 1 of 2 right each way
    scores = entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]])
    assert scores == {"seqeval_precision": 0.5, "seqeval_recall": 0.5, "seqeval_f1": 0.5}
    # adjacent same-type entities merged by the prediction: nothing right
    assert entity_scores([["B-PER", "B-PER"]], [["B-PER", "I-PER"]])["seqeval_f1"] == 0.0
    # I- without B- predicted where gold has B-: the same entity, so right
    assert entity_scores([["O", "B-LOC", "I-LOC"]], [["O", "I-LOC", "I-LOC"]])["seqeval_f1"] == 1.0
    # right boundaries, wrong type: wrong
    assert entity_scores([["B-PER", "I-PER"]], [["B-LOC", "I-LOC"]])["seqeval_f1"] == 0.0
    # micro average over sentences: 2 right of 5 predicted and 3 gold -> P 0.4, R 2/3, F1 2*2/(5+3) = 0.5
    gold = [["B-PER", "O", "B-LOC"], ["O", "B-PER", "O", "O"]]
    predicted = [["B-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "B-PER", "B-PER"]]
    scores = entity_scores(gold, predicted)
    assert scores["seqeval_precision"] == pytest.approx(0.4)
    assert scores["seqeval_recall"] == pytest.approx(2 / 3)
    assert scores["seqeval_f1"] == pytest.approx(0.5)
    # all O: no entity anywhere -> 0 (seqeval's zero division), and all-O predictions of real entities -> 0
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"seqeval_precision": 0, "seqeval_recall": 0, "seqeval_f1": 0}
    assert entity_scores([["B-PER", "O"]], [["O", "O"]])["seqeval_recall"] == 0.0


def test_entity_scores_refuse_non_iob_tags_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r"'PER' is not an IOB tag.*--metric accuracy"):
        entity_scores([["PER"]], [["O"]])
    with pytest.raises(ValueError, match="2 gold tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


def _logits(ids):
    ids = np.asarray(ids)
    return np.eye(len(NAMES))[np.where(ids < 0, 0, ids)] * 5.0


def test_token_task_metrics_score_only_labelled_positions():
    labels = np.array([[-100, ID["B-PER"], ID["I-PER"], -100, ID["O"]], [-100, ID["B-LOC"], -100, -100, -100]])
    # the predictions differ from the labels only on -100 positions (not scored) and on the LOC word
    predicted = np.array([[ID["B-LOC"], ID["B-PER"], ID["I-PER"], ID["B-LOC"], ID["O"]], [0, ID["O"], 1, 1, 1]])
    metrics = token_task_metrics(["seqeval_f1", "accuracy"], _logits(predicted), labels, label_names=NAMES)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    # entities: gold PER(0,1) + LOC(0,0); predicted PER(0,1) -> P 1, R 1/2, F1 2/3
    assert metrics["seqeval_f1"] == pytest.approx(2 / 3)
    assert list(metrics) == ["seqeval_f1", "accuracy"]
    with pytest.raises(ValueError, match="does not apply to token classification"):
        token_task_metrics(["mcc"], _logits(predicted), labels, label_names=NAMES)


def _token_rows(sentences_gold, sentences_predicted):
    labels = np.array([ID[t] for sentence in sentences_gold for t in sentence])
    logits = _logits([ID[t] for sentence in sentences_predicted for t in sentence])
    return logits, labels


def test_entity_f1_points_cut_token_rows_into_sentences():
    gold = [["B-PER", "O", "B-LOC"], ["O", "B-PER", "O", "O"]]
    predicted = [["B-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "B-PER", "B-PER"]]
    logits, labels = _token_rows(gold, predicted)
    metric = EntityF1Points([3, 4], NAMES)
    assert metric(logits, labels) == pytest.approx(50.0)
    # cut elsewhere (4 + 3 tokens) the same rows are other sentences: 2 right of 6 predicted and 3 gold -> 4/9
    assert EntityF1Points([4, 3], NAMES)(logits, labels) == pytest.approx(400 / 9)
    with pytest.raises(ValueError, match="expects 7 token rows"):
        metric(logits[:5], labels[:5])
    batches = [{"labels": np.array([[-100, 1, 0, 3, -100], [-100, 0, 1, 0, 0]])}, {"labels": np.full((1, 3), -100)}]
    assert EntityF1Points.from_batches(batches, NAMES).lengths.tolist() == [3, 4]  # the unlabelled row is dropped


def test_paired_standard_error_resamples_whole_sentences():
    gold = [["B-PER", "I-PER"], ["B-LOC"], ["O", "B-PER"], ["B-LOC", "O", "B-PER"]]
    worse = [["B-PER", "O"], ["B-LOC"], ["O", "O"], ["B-LOC", "O", "B-PER"]]
    base_logits, labels = _token_rows(gold, gold)
    logits, _ = _token_rows(gold, worse)
    metric = EntityF1Points([2, 1, 2, 3], NAMES)
    error = paired_standard_error(metric, base_logits, logits, labels, samples=50, seed=3)
    rng = np.random.default_rng(3)  # the same draws by hand: sentences, not tokens
    drops = []
    for _ in range(50):
        picks = rng.integers(0, 4, 4)
        resampled_gold = [gold[i] for i in picks]
        f1 = entity_scores(resampled_gold, [worse[i] for i in picks])["seqeval_f1"]
        drops.append(100.0 - 100.0 * f1)
    assert error == pytest.approx(float(np.std(drops, ddof=1)))
    assert error > 0


# ------------------------------------------------------------------------------------------- question answering


def test_squad_answer_scores_hand_computed():
    from drone_hf.qa_metrics import answer_f1, answer_scores, normalize_answer

    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "cat sat" vs "cat sat down": precision 1, recall 2/3 -> F1 0.8
    assert answer_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert answer_f1("dog", "cat") == 0.0
    assert answer_f1("the", "a") == 1.0  # both empty after normalisation
    # the best over the gold answers, exact match after normalisation
    scores = answer_scores(["Paris.", "in paris france"], [["paris", "the city"], ["Paris"]])
    assert scores[:, 0].tolist() == [1.0, 0.0]
    assert scores[1, 1] == pytest.approx(0.5)  # precision 1/3, recall 1 -> 0.5


def test_best_span_keeps_to_the_context_and_order():
    from drone_hf.qa_metrics import best_span

    start = np.array([9.0, 1.0, 0.0, 3.0, 0.0])
    end = np.array([9.0, 0.0, 2.0, 0.0, 1.0])
    context = np.array([False, True, True, True, True])  # position 0 ([CLS]) is not context
    assert best_span(start, end, context) == (3, 4)  # 3 + 1 beats 1 + 2 and the end-before-start 3 + 2
    assert best_span(start, end, context, max_tokens=1) == (3, 3)
    assert best_span(start, end, np.zeros(5, dtype=bool)) is None
