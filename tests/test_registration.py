"""Registration happens once, on `import drone_hf`; checked in fresh interpreters."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from drone_hf import compress_model

from .testing_utils import tiny_teacher


REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    compress_model(tiny_teacher(), None, method="svd", rank=4).save_pretrained(path)
    return path


def test_auto_classes_load_after_import(checkpoint):
    result = _run(
        f"""
        import drone_hf
        from transformers import AutoConfig, AutoModelForSequenceClassification
        assert type(AutoConfig.from_pretrained({str(checkpoint)!r})).__name__ == "DroneConfig"
        model = AutoModelForSequenceClassification.from_pretrained({str(checkpoint)!r})
        print(type(model).__name__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("DroneBertForSequenceClassification")


def test_without_import_transformers_does_not_recognize(checkpoint):
    result = _run(
        f"""
        from transformers import AutoModelForSequenceClassification
        AutoModelForSequenceClassification.from_pretrained({str(checkpoint)!r})
        """
    )
    assert result.returncode != 0
    assert "drone_bert" in result.stderr and "does not recognize" in result.stderr


def test_import_twice_and_reload_are_idempotent():
    result = _run(
        """
        import importlib
        import drone_hf
        import drone_hf as again
        importlib.reload(drone_hf)
        from transformers import AutoConfig
        print(AutoConfig.for_model("drone_bert").__class__.__name__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DroneConfig"


def test_modeling_file_does_not_register():
    result = _run(
        """
        import drone_hf.modeling_drone_bert
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        import sys
        # importing the package __init__ is unavoidable for a submodule import; check the modeling file's own text
        src = open(drone_hf.modeling_drone_bert.__file__).read()
        print("register(" in src)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_different_class_under_our_model_type_is_a_collision():
    result = _run(
        """
        from transformers import AutoConfig, BertConfig
        class Other(BertConfig):
            model_type = "drone_bert"
        AutoConfig.register("drone_bert", Other)
        import drone_hf
        """
    )
    assert result.returncode != 0 and "already registered" in result.stderr


def test_import_is_light_and_every_family_is_registered():
    """`import drone_hf` registers every family's DRONE config and heads, and loads neither Trainer nor datasets
    (scipy only if transformers' own modelling import brings it)."""
    result = _run(
        """
        import sys
        import transformers.modeling_utils
        scipy_from_transformers = "scipy" in sys.modules
        import drone_hf
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        loaded = [m for m in ("transformers.trainer", "datasets", "evaluate", "sklearn") if m in sys.modules]
        if not scipy_from_transformers and "scipy" in sys.modules:
            loaded.append("scipy")
        print("loaded:", loaded)
        print("types:", sorted(t for t in CONFIG_MAPPING._extra_content if t.startswith("drone_")))
        print("all sorted:", drone_hf.__all__[1:] == sorted(drone_hf.__all__[1:]))
        drone_hf.DroneCompressionCallback  # lazy names still resolve
        """
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    assert "all sorted: True" in result.stdout
    for family in ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta-v2", "modernbert"):
        assert f"'drone_{family}'" in result.stdout
