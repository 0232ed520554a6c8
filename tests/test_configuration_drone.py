import copy
import pickle

import pytest
from huggingface_hub.errors import StrictDataclassError

from drone_hf import DRONE_FORMAT_VERSION, DroneConfig


RANKS = {"bert.encoder.layer.0.intermediate.dense": 8, "bert.encoder.layer.1.attention.self.query": 4}


def _config(**kwargs):
    return DroneConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, **kwargs)


def test_round_trip(tmp_path):
    config = _config(drone_ranks=RANKS, drone_method="svd", drone_calibration={"dataset": "glue/sst2", "seed": 0})
    config.save_pretrained(tmp_path)
    loaded = DroneConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "drone_bert"
    assert loaded.drone_ranks == RANKS
    assert loaded.drone_method == "svd"
    assert loaded.drone_calibration == {"dataset": "glue/sst2", "seed": 0}
    assert loaded.drone_format_version == 1  # float checkpoints keep the oldest version that describes them
    assert loaded.to_dict()["drone_ranks"] == RANKS
    assert copy.deepcopy(config).drone_ranks == RANKS
    assert pickle.loads(pickle.dumps(config)).drone_ranks == RANKS


def test_unknown_extra_key_is_tolerated(tmp_path):
    config = _config(drone_ranks=RANKS, drone_future_option="x")
    config.save_pretrained(tmp_path)
    assert DroneConfig.from_pretrained(tmp_path).drone_ranks == RANKS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"drone_ranks": {"bert.encoder.layer.0.output.dense": 0}}, r"must be a positive int .*got 0"),
        ({"drone_ranks": {"bert.encoder.layer.0.output.dense": True}}, r"must be a positive int"),
        ({"drone_ranks": {"re:.*dense": 4}}, r"full module names .*no regex"),
        ({"drone_ranks": {"": 4}}, r"full module names"),
        ({"drone_format_version": DRONE_FORMAT_VERSION + 1}, r"only reads versions .*Upgrade"),
        ({"drone_format_version": 0}, r"positive int"),
        ({"drone_method": ""}, r"`drone_method` must be a method name such as"),
        ({"drone_quantization": {"method": "int8-dynamic"}}, r"exactly the keys \['method', 'modules'\]"),
        ({"drone_quantization": {"method": "int4", "modules": ["a.b"]}}, r"must be one of \['int8-dynamic'\]"),
        ({"drone_quantization": {"method": "int8-dynamic", "modules": []}}, r"non-empty list"),
        ({"drone_quantization": {"method": "int8-dynamic", "modules": ["re:.*"]}, "drone_format_version": 2}, "regex"),
        ({"drone_quantization": {"method": "int8-dynamic", "modules": ["a.b"]}}, r"drone_format_version >= 2"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(StrictDataclassError, match=match):
        _config(**kwargs)


def test_future_version_in_file_raises(tmp_path):
    _config(drone_ranks=RANKS).save_pretrained(tmp_path)
    text = (
        (tmp_path / "config.json")
        .read_text()
        .replace('"drone_format_version": 1', f'"drone_format_version": {DRONE_FORMAT_VERSION + 1}')
    )
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(StrictDataclassError, match="Upgrade"):
        DroneConfig.from_pretrained(tmp_path)
