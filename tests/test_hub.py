"""Model cards (offline, read back with `ModelCard.load`), atomic saving, and the Hub upload with `HfApi` mocked."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForSequenceClassification, BertTokenizerFast

import drone_hf
from drone_hf import DroneBertForSequenceClassification, DroneConfig, create_or_update_model_card
from drone_hf.hub import BEGIN_MARKER, DRONE_TAGS, END_MARKER, REMOTE_CODE_FILES, TEMPLATE_PATH

from .testing_utils import tiny_batches, tiny_teacher


REPO = Path(__file__).resolve().parents[1]
CALIBRATION = {"dataset": "glue/sst2", "split": "train", "num_samples": 13, "seed": 0}
METRICS = {"dense": {"accuracy": 0.9125, "f1": 0.9}, "compressed": {"accuracy": 0.8975, "f1": 0.88}}
SPEED = {"speedup": 1.42, "flop_bound": 1.9, "hardware": "Test CPU (2 threads)", "setting": "batch 8 x 128 tokens"}


@pytest.fixture(scope="module")
def compressed():
    teacher = tiny_teacher()
    stats = drone_hf.collect_activation_stats(teacher, tiny_batches())
    return drone_hf.compress_model(
        teacher,
        stats,
        ranks={"re:.*intermediate.dense": 8, "re:.*output.dense": 6},
        attention_ranks={"bert.encoder.layer.1.attention.self": 4},
        calibration_info=CALIBRATION,
    )


@pytest.fixture
def saved(compressed, tmp_path):
    path = tmp_path / "tiny-drone"
    compressed.save_pretrained(path)
    return path


def _tokenizer(tmp_path) -> BertTokenizerFast:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(15)]]))
    return BertTokenizerFast(vocab_file=str(vocab))


def test_card_metadata(saved):
    create_or_update_model_card(
        saved, base_model="someone/tiny-bert-sst2", dataset="sst2", metrics=METRICS, speed=SPEED
    )
    data = ModelCard.load(saved / "README.md").data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-classification"
    assert data.base_model == "someone/tiny-bert-sst2"
    assert set(DRONE_TAGS) <= set(data.tags) and data.tags[: len(DRONE_TAGS)] == list(DRONE_TAGS)
    assert data.datasets == ["nyu-mll/glue"]
    assert data.model_name == "tiny-drone"
    results = {result.metric_name: result for result in data.eval_results}
    assert set(results) == {f"{m} ({v})" for v in ("dense", "compressed") for m in ("accuracy", "f1")}
    assert results["accuracy (dense)"].metric_value == pytest.approx(0.9125)
    assert results["accuracy (compressed)"].metric_type == "accuracy"
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results} == {
        ("nyu-mll/glue", "sst2", "validation")
    }
    assert data["drone_hf"]["speed"]["hardware"] == SPEED["hardware"]


def test_card_sections_and_rank_table(saved, compressed):
    card = create_or_update_model_card(saved, dataset="glue/sst2", metrics=METRICS, speed=SPEED)
    text = card.text
    for heading in (
        "Compression summary",
        "Evaluation",
        "How to load",
        "Ranks per module",
        "Calibration",
        "Method",
        "Framework versions",
        "Citation",
    ):
        assert f"\n## {heading}\n" in text
    assert "import drone_hf" in text and 'from_pretrained("path/to/this/folder")' in text
    assert "trust_remote_code=True` does not apply" in text  # this save did not export the modelling code
    # one row per layer: attention q/k, query, key, value, attention output, intermediate, output
    assert "| 0 | — | — | — | — | 6 | 8 | 6 |" in text
    assert "| 1 | 4 | (attention) | (attention) | — | 6 | 8 | 6 |" in text
    assert "| accuracy | 91.25 | 89.75 | -1.50 |" in text
    assert "**1.42×**" in text and "Test CPU (2 threads)" in text and "FLOP bound, 1.90×" in text
    params = sum(p.numel() for p in compressed.parameters())
    assert "| parameters | " in text and f"{params:,}" in text
    for line in ("- dataset: glue/sst2", "- split: train", "- num samples: 13", "- seed: 0", "- num tokens: "):
        assert line in text
    for title in (
        "Data-aware Low-rank Compression for Large {NLP} Models",
        "Chen, Patrick and Yu, Hsiang-Fu",
        "Compressing Pre-trained Language Models by Matrix Decomposition",
        "Ben Noach, Matan",
        "Deep Learning Meets Projective Clustering",
        "Maalouf, Alaa",
    ):
        assert title in text
    assert text.count(BEGIN_MARKER) == 1 and text.count(END_MARKER) == 1


def test_card_counts_a_factored_embedding(tmp_path):
    teacher = tiny_teacher()
    model = drone_hf.compress_model(teacher, None, method="svd", rank=6, embedding=(4, 8))
    model.save_pretrained(tmp_path / "with-embedding")
    text = (tmp_path / "with-embedding" / "README.md").read_text()
    assert "Word embedding `bert.embeddings.word_embeddings`: a (4, 8)-projective clustering" in text
    params, dense = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in teacher.parameters())
    assert f"| parameters | {dense:,} | {params:,} ({100 * params / dense:.1f}%) |" in text


def test_save_pretrained_writes_card_and_reloads(saved, compressed):
    assert sorted(os.listdir(saved)) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "transformers" and "drone_hf" in card.data.tags
    assert card.data.eval_results is None  # no metrics were given
    assert "| 1 | 4 | (attention) |" in card.text
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    batch = tiny_batches()[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(reloaded(**inputs).logits, compressed.eval()(**inputs).logits)
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_merge_keeps_user_text_and_is_idempotent(saved, compressed):
    readme = saved / "README.md"
    create_or_update_model_card(saved, base_model="someone/tiny-bert-sst2", metrics=METRICS, speed=SPEED)
    card = ModelCard.load(readme)
    card.data.license = "mit"
    card.data.tags = [*card.data.tags, "my-tag"]
    card.text = card.text.replace(BEGIN_MARKER, "My own notes before.\n\n" + BEGIN_MARKER) + "\nMy notes after.\n"
    card.save(readme)
    first = create_or_update_model_card(saved).content
    assert readme.read_text() == first
    assert create_or_update_model_card(saved).content == first  # idempotent
    compressed.save_pretrained(saved)  # a later save keeps the user text and the earlier metrics/speed
    merged = ModelCard.load(readme)
    assert readme.read_text() == first
    assert merged.data.license == "mit" and "my-tag" in merged.data.tags
    assert merged.data.tags.count("drone_hf") == 1 and merged.data.base_model == "someone/tiny-bert-sst2"
    assert "My own notes before." in merged.text and "My notes after." in merged.text
    assert len(merged.data.eval_results) == 4 and "**1.42×**" in merged.text
    assert merged.text.count(BEGIN_MARKER) == 1


def test_merge_appends_section_to_foreign_card(saved):
    (saved / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# Hand-written card\n\nKeep me.\n")
    card = create_or_update_model_card(saved, dataset="mrpc")
    assert card.text.startswith("\n# Hand-written card\n\nKeep me.\n\n" + BEGIN_MARKER)
    assert card.data.license == "apache-2.0" and card.data.tags[:1] == ["drone_hf"]
    assert card.data["drone_hf"]["dataset"] == "glue/mrpc"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metrics": {"dense": {"accuracy": 91.2}}}, ValueError, r"metrics\['dense'\]\['accuracy'\].*\[-1, 1\]"),
        ({"metrics": {"teacher": {"accuracy": 0.9}}}, ValueError, r"Unknown `metrics` key 'teacher'"),
        ({"metrics": [0.9]}, TypeError, r"`metrics` must be a dict of dicts"),
        ({"speed": {"speedup": 1.5}}, ValueError, r"`speed` is missing \['hardware'\]"),
        ({"speed": {"speedup": -1, "hardware": "cpu"}}, ValueError, r"speed\['speedup'\].*positive"),
        ({"dataset": 3}, TypeError, r"`dataset` must be a str"),
    ],
)
def test_card_rejects_bad_arguments(saved, kwargs, error, match):
    with pytest.raises(error, match=match):
        create_or_update_model_card(saved, **kwargs)


def test_card_needs_a_drone_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_or_update_model_card(tmp_path)
    tiny_teacher().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'bert' model; expected a drone_hf checkpoint"):
        create_or_update_model_card(tmp_path)


def test_template_ships_once():
    """The package template is the one source; model_cards/drone_bert.md.j2 is a symlink to it."""
    assert TEMPLATE_PATH.is_file() and not TEMPLATE_PATH.is_symlink()
    assert (REPO / "model_cards" / "drone_bert.md.j2").resolve() == TEMPLATE_PATH.resolve()


# ----------------------------------------------------------------------------------------------- atomic saving


def test_failed_save_leaves_the_old_checkpoint_untouched(saved, compressed):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    with mock.patch("transformers.modeling_utils.safe_save_file", side_effect=write_half_then_fail):
        with pytest.raises(OSError, match="disk full"):
            compressed.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["tiny-drone"]


def test_card_failure_does_not_lose_the_checkpoint(saved, compressed):
    (saved / "README.md").write_text("---\n- not a mapping\n---\nUser card.\n")
    compressed.save_pretrained(saved)
    assert (saved / "README.md").read_text() == "---\n- not a mapping\n---\nUser card.\n"
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    assert reloaded.config.drone_ranks == compressed.config.drone_ranks


def test_save_over_existing_folder_keeps_foreign_files_and_drops_stale_shards(saved, compressed, tmp_path):
    _tokenizer(tmp_path).save_pretrained(saved)
    (saved / "stats.safetensors").write_bytes(b"user data")
    (saved / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (saved / "logs").mkdir()
    (saved / "logs" / "run.txt").write_text("kept")
    compressed.save_pretrained(saved)
    assert sorted(os.listdir(saved)) == [
        "README.md",
        "config.json",
        "logs",
        "model.safetensors",
        "stats.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (saved / "logs" / "run.txt").read_text() == "kept"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["tiny-drone", "vocab.txt"]


# ------------------------------------------------------------------------------------------------- Hub (mocked)


class _FakeHub:
    """Stands in for the three `HfApi` calls of a push and records the folder as it is at upload time."""

    def __init__(self, remote_readme: str | None = None):
        self.remote_readme, self.uploads, self.created = remote_readme, [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def hf_hub_download(self, api, repo_id, filename, **kwargs):
        if self.remote_readme is None:
            raise EntryNotFoundError(f"{filename} not found")
        return self.remote_readme

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", pr_url=None)

    def patch(self):
        return mock.patch.multiple(
            HfApi,
            create_repo=mock.DEFAULT,
            hf_hub_download=mock.DEFAULT,
            upload_folder=mock.DEFAULT,
            autospec=True,
        )

    def __enter__(self):
        self._patcher = self.patch()
        mocks = self._patcher.__enter__()
        for name, fake in mocks.items():
            fake.side_effect = getattr(self, name)
        return self

    def __exit__(self, *exc_info):
        return self._patcher.__exit__(*exc_info)


BASE_FILES = {"README.md", "config.json", "model.safetensors"}


@pytest.mark.parametrize("export", [False, True])
def test_push_uploads_exactly_the_checkpoint(compressed, tmp_path, export):
    with _FakeHub() as hub:
        url = drone_hf.push_compressed_to_hub(
            compressed,
            "me/tiny-drone",
            tokenizer=_tokenizer(tmp_path),
            trust_remote_code_export=export,
            card_kwargs={"base_model": "me/tiny-bert", "dataset": "sst2", "metrics": METRICS, "speed": SPEED},
        )
    assert url == "https://huggingface.co/me/tiny-drone/commit/abc123"
    assert hub.created == [("me/tiny-drone", {"private": True, "token": None, "exist_ok": True})]
    (upload,) = hub.uploads
    expected = BASE_FILES | {"tokenizer.json", "tokenizer_config.json"} | (set(REMOTE_CODE_FILES) if export else set())
    assert set(upload["files"]) == expected
    assert upload["commit_message"] == "Upload DRONE-compressed model"
    assert "model*.safetensors" in upload["delete_patterns"]
    assert ("modeling_drone.py" in upload["delete_patterns"]) is not export
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.base_model == "me/tiny-bert" and card.data.model_name == "tiny-drone"
    assert 'from_pretrained("me/tiny-drone")' in card.text
    assert ('trust_remote_code=True, revision="<commit sha you reviewed>"' in card.text) is export
    config = upload["files"]["config.json"].decode()
    assert ('"auto_map"' in config) is export
    # the export registers the Auto classes for one save only
    assert DroneBertForSequenceClassification._auto_class is None and DroneConfig._auto_class is None
    assert "auto_map" not in compressed.config.to_dict()


def test_model_push_to_hub_uses_the_drone_card(compressed):
    with _FakeHub() as hub:
        url = compressed.push_to_hub("tiny-drone", commit_message="first upload")
    assert url.endswith("/commit/abc123")
    assert hub.created == [("tiny-drone", {"private": None, "token": None, "exist_ok": True})]
    (upload,) = hub.uploads
    assert set(upload["files"]) == BASE_FILES and upload["commit_message"] == "first upload"
    assert upload["repo_id"] == "me/tiny-drone"
    assert "drone_hf" in ModelCard(upload["files"]["README.md"].decode()).data.tags


def test_push_merges_the_remote_readme(compressed, tmp_path):
    remote = tmp_path / "remote_README.md"
    remote.write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My model\n\nWritten on the Hub.\n")
    with _FakeHub(remote_readme=str(remote)) as hub:
        drone_hf.push_compressed_to_hub(compressed, "me/tiny-drone")
    card = ModelCard(hub.uploads[0]["files"]["README.md"].decode())
    assert card.data.license == "mit" and card.data.tags[0] == "mine" and "drone_hf" in card.data.tags
    assert "Written on the Hub." in card.text and BEGIN_MARKER in card.text


def test_push_rejects_a_dense_model():
    with pytest.raises(TypeError, match="must be a DRONE model"):
        drone_hf.push_compressed_to_hub(tiny_teacher(), "me/x")


# -------------------------------------------------------------------------------------------------- Hub (live)


@pytest.mark.hub
def test_live_push_and_reload(compressed, monkeypatch):
    """Pushes to a new private repo of the token's user, reloads it from the Hub and deletes it
    (`pytest --run-hub -m hub` with HF_TOKEN set)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    api = HfApi(token=os.environ["HF_TOKEN"])
    repo_id = f"{api.whoami()['name']}/drone-hf-test-{uuid.uuid4().hex[:8]}"
    try:
        url = drone_hf.push_compressed_to_hub(compressed, repo_id, token=os.environ["HF_TOKEN"])
        assert re.search(r"/commit/[0-9a-f]{40}$", url)
        reloaded = AutoModelForSequenceClassification.from_pretrained(repo_id, token=os.environ["HF_TOKEN"])
        batch = tiny_batches()[0]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        assert torch.equal(reloaded(**inputs).logits, compressed.eval()(**inputs).logits)
        assert "drone_hf" in ModelCard.load(repo_id, token=os.environ["HF_TOKEN"]).data.tags
    finally:
        api.delete_repo(repo_id, missing_ok=True)
