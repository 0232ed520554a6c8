import pytest
from transformers import BertConfig, BertModel

from drone_hf.targets import encoder_linear_roles, resolve_ranks, resolve_target_modules, shared_input_name

from .testing_utils import tiny_teacher


L0 = "bert.encoder.layer.0."
L1 = "bert.encoder.layer.1."


def test_default_targets_are_all_encoder_linears_in_order():
    targets = resolve_target_modules(tiny_teacher())
    assert len(targets) == 12
    assert targets[:6] == [
        L0 + "attention.self.query",
        L0 + "attention.self.key",
        L0 + "attention.self.value",
        L0 + "attention.output.dense",
        L0 + "intermediate.dense",
        L0 + "output.dense",
    ]
    assert "bert.pooler.dense" not in targets and "classifier" not in targets


def test_roles_names_and_regexes_select_modules():
    model = tiny_teacher()
    assert resolve_target_modules(model, "intermediate") == [L0 + "intermediate.dense", L1 + "intermediate.dense"]
    assert resolve_target_modules(model, [L1 + "output.dense"]) == [L1 + "output.dense"]
    assert resolve_target_modules(model, [r"re:.*layer\.1\.attention\.self\..*"]) == [
        L1 + "attention.self.query",
        L1 + "attention.self.key",
        L1 + "attention.self.value",
    ]


@pytest.mark.parametrize(
    "targets, error, match",
    [
        ("ffn", ValueError, r"Unknown target module `ffn`.*roles of this bert model: \['query'"),
        (["bert.pooler.dense"], ValueError, r"`bert.pooler.dense` in `target_modules` is not a compression target"),
        (["re:nothing.*"], ValueError, "matches no encoder linear"),
        (["re:("], ValueError, "Invalid regex"),
        ([3], TypeError, "must be strings"),
    ],
)
def test_bad_targets(targets, error, match):
    with pytest.raises(error, match=match):
        resolve_target_modules(tiny_teacher(), targets)


def test_a_bare_encoder_has_the_same_roles_without_the_prefix():
    roles = encoder_linear_roles(BertModel(BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37)))
    assert roles["encoder.layer.0.attention.self.query"] == "query" and len(roles) == 12 * 6


TARGETS = [L0 + "attention.self.query", L0 + "intermediate.dense", L0 + "output.dense"]


def test_precedence_exact_beats_regex():
    ranks = resolve_ranks(TARGETS, ranks={"re:.*dense": 4, L0 + "output.dense": 9})
    assert ranks[L0 + "output.dense"] == 9


def test_precedence_first_matching_regex_wins():
    ranks = resolve_ranks(TARGETS, ranks={"re:.*intermediate.*": 5, "re:.*dense": 4})
    assert ranks[L0 + "intermediate.dense"] == 5 and ranks[L0 + "output.dense"] == 4


def test_precedence_regex_beats_default():
    ranks = resolve_ranks(TARGETS, rank=7, ranks={"re:.*query": 3})
    assert ranks == {L0 + "attention.self.query": 3, L0 + "intermediate.dense": 7, L0 + "output.dense": 7}


def test_regex_matches_whole_name_only():
    with pytest.raises(ValueError, match="matches no target"):
        resolve_ranks(TARGETS, ranks={"re:query": 3})


def test_absent_means_dense():
    assert resolve_ranks(TARGETS, ranks={L0 + "output.dense": 9}) == {L0 + "output.dense": 9}


def test_unknown_exact_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown module in `ranks` .*Close matches: \['bert.encoder.layer.0.output"):
        resolve_ranks(TARGETS, ranks={L0 + "outputs.dense": 9})


def test_shared_input_of_key_and_value_is_query():
    assert shared_input_name(L0 + "attention.self.value", "value") == L0 + "attention.self.query"
    assert shared_input_name(L0 + "output.dense", "output") == L0 + "output.dense"
