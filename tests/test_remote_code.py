"""The opt-in remote-code export: `auto_map` + the modelling files beside the weights load with
`trust_remote_code=True` in a fresh interpreter where drone_hf cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf import DroneBertForSequenceClassification
from drone_hf.hub import REMOTE_CODE_FILES

from .test_hub import _FakeHub
from .testing_utils import tiny_batches, tiny_teacher


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "drone_hf"
# Runs first in every child: drone_hf is made unimportable (even when pip-installed) and the checkout leaves sys.path.
_NO_DRONE_HF = f"""
import sys
sys.modules["drone_hf"] = None
sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != {str(REPO)!r}]
"""


def _run_without_drone_hf(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(cwd / "hf_modules"),
        "HF_HOME": str(cwd / "hf_home"),
    }
    script = "import os\n" + _NO_DRONE_HF + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def compressed():
    teacher = tiny_teacher()
    stats = drone_hf.collect_activation_stats(teacher, tiny_batches())
    return drone_hf.compress_model(teacher, stats, rank=6, attention_rank=4).eval()


@pytest.fixture(scope="module")
def exported(compressed, tmp_path_factory):
    """The folder exactly as `push_compressed_to_hub(..., trust_remote_code_export=True)` uploads it."""
    with _FakeHub() as hub:
        drone_hf.push_compressed_to_hub(compressed, "me/tiny-drone-remote", trust_remote_code_export=True)
    folder = tmp_path_factory.mktemp("remote") / "tiny-drone-remote"
    folder.mkdir()
    for name, content in hub.uploads[0]["files"].items():
        (folder / name).write_bytes(content)
    return folder


def _inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batches()[0]
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_modelling_files_import_only_transformers_torch_and_siblings(name):
    """Module-level imports only; the guarded lazy imports of drone_hf inside methods are allowed."""
    tree = ast.parse((PACKAGE / name).read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                assert f"{node.module}.py" in REMOTE_CODE_FILES, f"{name} imports sibling {node.module}, not exported"
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        allowed = {
            "__future__",
            "collections",
            "copy",
            "dataclasses",
            "difflib",
            "os",
            "re",
            "types",
            "warnings",
            "torch",
        }
        assert roots <= allowed | {"transformers", "huggingface_hub"}, f"{name} imports {roots}"


def test_export_writes_auto_map_and_every_sibling(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_drone.DroneConfig",
        "AutoModelForSequenceClassification": "modeling_drone.DroneBertForSequenceClassification",
    }
    for name in REMOTE_CODE_FILES:
        assert (exported / name).read_bytes() == (PACKAGE / name).read_bytes()


def test_exported_folder_still_loads_with_the_plugin(exported, compressed):
    model = AutoModelForSequenceClassification.from_pretrained(exported)  # local registration wins, no remote code
    assert type(model) is DroneBertForSequenceClassification
    assert torch.equal(model(**_inputs()).logits, compressed(**_inputs()).logits)


def test_trust_remote_code_without_drone_hf(exported, compressed, tmp_path):
    torch.save(_inputs(), tmp_path / "inputs.pt")
    result = _run_without_drone_hf(
        f"""
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification
        try:
            import drone_hf
        except ImportError:
            pass
        else:
            raise SystemExit("drone_hf is importable in the child")
        folder = {str(exported)!r}
        try:
            AutoModelForSequenceClassification.from_pretrained(folder)
        except ValueError as error:
            print("refused without trust_remote_code:", "trust_remote_code" in str(error))
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        print("class:", type(model).__module__, type(config).__name__)
        torch.save(model(**torch.load("inputs.pt")).logits, "logits.pt")
        model.save_pretrained("resaved")  # the override falls back to plain transformers: no card, code re-copied
        import os
        print("resaved:", sorted(os.listdir("resaved")))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "refused without trust_remote_code: True" in out
    assert "class: transformers_modules." in out and "modeling_drone DroneConfig" in out
    assert torch.equal(torch.load(tmp_path / "logits.pt"), compressed(**_inputs()).logits)
    resaved = sorted(["config.json", "model.safetensors", *REMOTE_CODE_FILES])
    assert f"resaved: {resaved}" in out


def test_copied_files_import_in_isolation(tmp_path):
    """The exported files alone, as a package outside the checkout, import without drone_hf."""
    package = tmp_path / "isolated"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(PACKAGE / name, package / name)
    result = _run_without_drone_hf(
        """
        sys.path.insert(0, ".")
        from isolated.modeling_drone import DroneBertForSequenceClassification
        from isolated.configuration_drone import DroneConfig
        config = DroneConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2,
                             vocab_size=99, drone_ranks={"bert.encoder.layer.0.intermediate.dense": 8},
                             drone_attention_ranks={"bert.encoder.layer.1.attention.self": 4})
        model = DroneBertForSequenceClassification(config)
        print(sorted(model.drone_modules()))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bert.encoder.layer.0.intermediate.dense" in result.stdout


@pytest.mark.parametrize(
    ("model_type", "class_name", "auto_name"),
    [
        ("roberta", "RobertaForSequenceClassification", "AutoModelForSequenceClassification"),
        ("distilbert", "DistilBertForTokenClassification", "AutoModelForTokenClassification"),
        ("mpnet", "MPNetModel", "AutoModel"),
    ],
)
def test_other_families_load_with_trust_remote_code_without_drone_hf(model_type, class_name, auto_name, tmp_path):
    """The export covers every family and head: `auto_map` names the head's Auto class and the DRONE class, which the
    copied `modeling_drone.py` makes on demand; without `trust_remote_code` the load refuses."""
    import transformers

    from .testing_utils import tiny_config, tiny_family_batches

    torch.manual_seed(0)
    model = getattr(transformers, class_name)(tiny_config(model_type, num_labels=2)).eval()
    batch = {k: v for k, v in tiny_family_batches(model_type)[0].items() if k in ("input_ids", "attention_mask")}
    stats = drone_hf.collect_activation_stats(model, [batch])
    compressed = drone_hf.compress_model(model, stats, rank=4, attention_rank=4).eval()
    with _FakeHub() as hub:
        drone_hf.push_compressed_to_hub(compressed, f"me/tiny-{model_type}", trust_remote_code_export=True)
    folder = tmp_path / "exported"
    folder.mkdir()
    for name, content in hub.uploads[0]["files"].items():
        (folder / name).write_bytes(content)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoConfig": f"configuration_drone.Drone{type(model.config).__name__}",
        auto_name: f"modeling_drone.Drone{class_name}",
    }
    torch.save(batch, tmp_path / "inputs.pt")
    result = _run_without_drone_hf(
        f"""
        import torch, transformers
        folder = {str(folder)!r}
        try:
            transformers.{auto_name}.from_pretrained(folder)
        except ValueError as error:
            print("refused without trust_remote_code:", "trust_remote_code" in str(error))
        model = transformers.{auto_name}.from_pretrained(folder, trust_remote_code=True).eval()
        print("class:", type(model).__name__)
        with torch.no_grad():
            torch.save(model(**torch.load("inputs.pt"))[0], "out.pt")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused without trust_remote_code: True" in result.stdout
    assert f"class: Drone{class_name}" in result.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), compressed(**batch)[0])
