import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from drone_hf import (
    DroneBertForSequenceClassification,
    DroneConfig,
    DroneLinear,
    collect_activation_stats,
    compress_model,
)

from .testing_utils import copy_checkpoint, tiny_batches, tiny_teacher


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    teacher = tiny_teacher()
    stats = collect_activation_stats(teacher, tiny_batches())
    compressed = compress_model(
        teacher, stats, ranks={"re:.*intermediate.dense": 6, "re:.*attention.self.*": 4}
    ).eval()
    dense_dir, drone_dir = tmp_path_factory.mktemp("dense"), tmp_path_factory.mktemp("drone")
    teacher.save_pretrained(dense_dir)
    compressed.save_pretrained(drone_dir)
    return teacher, compressed, dense_dir, drone_dir


def test_round_trip_is_exact_with_no_key_problems(saved):
    _, compressed, _, drone_dir = saved
    loaded, info = AutoModelForSequenceClassification.from_pretrained(drone_dir, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert type(loaded) is DroneBertForSequenceClassification
    assert loaded.config.drone_ranks == compressed.config.drone_ranks
    for name, module in compressed.named_modules():
        assert type(loaded.get_submodule(name)) is type(module)
    for name, rank in loaded.config.drone_ranks.items():
        assert loaded.get_submodule(name).down.weight.shape[0] == rank
    batch = tiny_batches()[0]
    with torch.no_grad():
        a = compressed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_checkpoint_is_smaller_and_config_lists_ranks(saved):
    teacher, compressed, dense_dir, drone_dir = saved
    assert os.path.getsize(drone_dir / "model.safetensors") < os.path.getsize(dense_dir / "model.safetensors")
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in teacher.parameters())
    config = json.loads((drone_dir / "config.json").read_text())
    assert config["model_type"] == "drone_bert"
    assert config["architectures"] == ["DroneBertForSequenceClassification"]
    assert config["drone_format_version"] == 1 and config["drone_method"] == "drone"
    assert len(config["drone_ranks"]) == 8
    tensors = load_file(drone_dir / "model.safetensors")
    name = "bert.encoder.layer.1.intermediate.dense"
    assert tensors[f"{name}.down.weight"].shape == (6, 32) and tensors[f"{name}.up.weight"].shape == (37, 6)
    assert f"{name}.up.bias" in tensors and f"{name}.weight" not in tensors


def test_constructor_builds_shapes_from_config_on_meta():
    config = DroneConfig(**tiny_teacher().config.to_dict() | {"drone_ranks": {"bert.encoder.layer.0.output.dense": 5}})
    with torch.device("meta"):
        model = DroneBertForSequenceClassification(config)
    layer = model.get_submodule("bert.encoder.layer.0.output.dense")
    assert isinstance(layer, DroneLinear) and layer.rank == 5 and layer.down.weight.is_meta
    assert list(model.drone_modules()) == ["bert.encoder.layer.0.output.dense"]


NAME = "bert.encoder.layer.0.intermediate.dense"


@pytest.mark.parametrize(
    "edit_config, edit_tensors, match",
    [
        (lambda c: c["drone_ranks"].update({NAME: 3}), None, "do not match the shapes its `drone_ranks`"),
        (lambda c: c["drone_ranks"].pop(NAME), None, "does not match its config.*intermediate.dense.down.weight"),
        (lambda c: c["drone_ranks"].update({"bert.encoder.layer.0.output.dense": 3}), None, "output.dense"),
        (None, lambda t: t.pop(f"{NAME}.up.weight"), r"does not match its config.*\['bert.encoder.layer.0.inter"),
    ],
)
def test_checkpoint_that_disagrees_with_its_config_raises(saved, tmp_path, edit_config, edit_tensors, match):
    bad = copy_checkpoint(saved[3], tmp_path / "bad", edit_config, edit_tensors)
    with pytest.raises(ValueError, match=match):
        AutoModelForSequenceClassification.from_pretrained(bad)


def test_rank_out_of_range_in_config_raises(saved, tmp_path):
    bad = copy_checkpoint(saved[3], tmp_path / "bad", lambda c: c["drone_ranks"].update({NAME: 40}))
    with pytest.raises(ValueError, match=r"Rank for `bert.encoder.layer.0.intermediate.dense` \(37x32\).*\[1, 31\]"):
        AutoModelForSequenceClassification.from_pretrained(bad)


def test_train_step_updates_factors(saved):
    _, compressed, _, drone_dir = saved
    model = AutoModelForSequenceClassification.from_pretrained(drone_dir).train()
    batch = tiny_batches()[0]
    before = model.get_submodule(NAME).down.weight.detach().clone()
    loss = model(**batch).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.get_submodule(NAME).down.weight)
