"""The CUDA code paths: calibration, compression (linears and attention), held-out rank allocation, projective
embeddings, bf16 save/reload, distillation with `Trainer`, latency measurement and sentence-transformers, each on a
GPU and checked against the CPU result. Skipped without a CUDA device (`conftest.py`); run with `pytest -m gpu`."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from drone_hf import (
    DroneDistillationArguments,
    collect_activation_stats,
    compress_model,
    distill,
)
from drone_hf.profiling import measure_latency

from .testing_utils import tiny_batches, tiny_config, tiny_family_batches, tiny_teacher, tiny_tokenizer


pytestmark = pytest.mark.gpu
CUDA = torch.device(os.environ.get("DRONE_TEST_DEVICE", "cuda"))
# Families whose Q·Kᵀ product DRONE can factor, and two whose attention it refuses (linears only).
ATTENTION_FAMILIES = ["bert", "roberta", "mpnet", "distilbert", "electra"]
LINEAR_FAMILIES = ["deberta-v2", "modernbert"]


def _inputs(batch, device=None):
    return {k: (v.to(device) if device else v) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _model(model_type: str):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=3)).eval()


@torch.no_grad()
def _logits(model, batches, device):
    return torch.cat([model(**_inputs(b, device)).logits.float().cpu() for b in batches])


@pytest.mark.parametrize("model_type", ATTENTION_FAMILIES + LINEAR_FAMILIES)
def test_calibration_and_compression_on_the_gpu_match_the_cpu(model_type):
    cpu_model = _model(model_type)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
    batches = [_inputs(b) for b in tiny_family_batches(model_type)]  # CPU tensors: moved to the model's device
    stats_cpu = collect_activation_stats(cpu_model, batches)
    stats_gpu = collect_activation_stats(gpu_model, batches)
    assert stats_cpu.keys() == stats_gpu.keys()
    for name in stats_cpu:
        scale = float(stats_cpu[name].abs().max())  # float32 activations summed in another order: relative to scale
        torch.testing.assert_close(stats_gpu[name].cpu(), stats_cpu[name], rtol=1e-3, atol=1e-4 * scale)

    kwargs = {"rank": 8}
    if model_type in ATTENTION_FAMILIES:
        kwargs["attention_rank"] = 4
    compressed_cpu = compress_model(cpu_model, stats_cpu, **kwargs)
    compressed_gpu = compress_model(gpu_model, stats_gpu, **kwargs)
    assert {p.device.type for p in compressed_gpu.parameters()} == {"cuda"}
    assert compressed_gpu.config.drone_ranks == compressed_cpu.config.drone_ranks
    assert compressed_gpu.config.drone_attention_ranks == compressed_cpu.config.drone_attention_ranks
    expected = _logits(compressed_cpu, batches, None)
    error = float((_logits(compressed_gpu, batches, CUDA) - expected).abs().max())
    change = float((_logits(gpu_model, batches, CUDA) - expected).abs().max())  # compressed vs dense
    assert error <= 1e-3 * float(expected.abs().max()), (error, float(expected.abs().max()))
    assert change > 20 * error, (change, error)  # the GPU result is the compressed model, not the dense one
    assert all(torch.equal(before[k], v) for k, v in gpu_model.state_dict().items())  # the input is untouched


def test_bf16_compressed_model_saves_and_reloads_identically_on_the_gpu(tmp_path):
    teacher = tiny_teacher().to(CUDA)
    batches = tiny_batches()
    stats = collect_activation_stats(teacher, batches)
    fp32 = compress_model(teacher, stats, rank=8, attention_rank=4)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).to(CUDA)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert type(reloaded).__name__ == "DroneBertForSequenceClassification"
    saved = dict(bf16.state_dict())
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    torch.testing.assert_close(_logits(reloaded, batches, CUDA), _logits(bf16, batches, CUDA), rtol=0, atol=0)
    torch.testing.assert_close(_logits(bf16, batches, CUDA), _logits(fp32, batches, CUDA), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("search", ["exhaustive", "fast"])
def test_accuracy_budget_allocation_runs_its_evaluations_on_the_gpu(search):
    teacher = tiny_teacher()
    batches = tiny_batches(num_rows=36)  # a 10-point budget needs >= 30 held-out rows
    report_cpu, report_gpu = {}, {}
    stats = collect_activation_stats(teacher, batches)
    budget = {
        "max_accuracy_drop": 10.0,
        "eval_dataloader": batches,
        "rank_grid": [4, 8, 16],
        "allocation_options": {"search": search},
    }
    compress_model(teacher, stats, allocation_report=report_cpu, **budget)
    gpu_teacher = copy.deepcopy(teacher).to(CUDA)
    gpu = compress_model(
        gpu_teacher, collect_activation_stats(gpu_teacher, batches), allocation_report=report_gpu, **budget
    )
    assert {p.device.type for p in gpu.parameters()} == {CUDA.type}
    assert gpu.config.drone_ranks, "the budget allows some compression of the tiny model"
    # The evaluations ran on the GPU and saw the same accuracies as on the CPU (up to float rounding of ties).
    assert report_gpu["heldout_base_metric"] == pytest.approx(report_cpu["heldout_base_metric"])
    assert report_gpu["evaluations"] > 0 and report_gpu["heldout_drop"] <= 10.0 + 1e-9
    assert report_gpu["search"] == search


def test_projective_embedding_compression_on_the_gpu():
    teacher = tiny_teacher()
    batches = tiny_batches()
    gpu_teacher = copy.deepcopy(teacher).to(CUDA)
    cpu = compress_model(teacher, collect_activation_stats(teacher, batches), rank=8, embedding=(2, 8))
    gpu = compress_model(gpu_teacher, collect_activation_stats(gpu_teacher, batches), rank=8, embedding=(2, 8))
    dense = teacher.get_input_embeddings().weight.detach()

    def error(model):
        layer = model.get_input_embeddings()
        with torch.no_grad():
            rows = layer(torch.arange(dense.shape[0], device=layer.coefficients.device)).float().cpu()
        return float((rows - dense).norm() / dense.norm())

    assert gpu.get_input_embeddings().coefficients.device.type == "cuda"
    assert error(gpu) <= 1.1 * error(cpu) + 1e-6 and error(gpu) < 1.0
    assert torch.isfinite(_logits(gpu, batches, CUDA)).all()


class _Rows(torch.utils.data.Dataset):
    """Plain dict rows (no `datasets` needed): a padded batch per `DataCollatorWithPadding`."""

    def __init__(self, num_rows: int = 16):
        generator = torch.Generator().manual_seed(3)
        self.rows = [
            {
                "input_ids": torch.randint(
                    5, 99, (int(torch.randint(4, 9, (1,), generator=generator)),), generator=generator
                ).tolist(),
                "labels": i % 3,
            }
            for i in range(num_rows)
        ]
        for row in self.rows:
            row["attention_mask"] = [1] * len(row["input_ids"])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def test_distillation_trains_the_student_on_the_gpu(tmp_path):
    teacher = tiny_teacher().to(CUDA)
    stats = collect_activation_stats(teacher, tiny_batches())
    student = compress_model(teacher, stats, rank=4)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=4,
    )
    assert args.device.type == "cuda"
    distill(
        student,
        teacher,
        _Rows(),
        DroneDistillationArguments(max_steps=3, learning_rate=1e-3),
        training_args=args,
        processing_class=tiny_tokenizer(),
    )
    assert {p.device.type for p in student.parameters()} == {"cuda"}
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_measure_latency_synchronises_on_the_gpu():
    teacher = tiny_teacher().to(CUDA)
    compressed = compress_model(teacher, collect_activation_stats(teacher, tiny_batches()), rank=4)
    latency = measure_latency({"dense": teacher, "drone": compressed}, _inputs(tiny_batches()[0]), repeats=5, warmup=2)
    assert set(latency) == {"dense", "drone"} and all(0 < value < 1 for value in latency.values())


def test_sentence_transformer_compresses_and_reloads_on_the_gpu(tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    import drone_hf

    from .test_sentence_transformers import HELDOUT, SENTENCES, _build

    dense = _build(tmp_path, "bert").to(CUDA)
    report = {}
    small = drone_hf.compress_sentence_transformer(
        dense, SENTENCES, min_cosine_similarity=0.9, heldout_sentences=HELDOUT, allocation_report=report
    )
    assert small.device.type == "cuda" and report["heldout_cosine"] >= 0.9
    small.save(str(tmp_path / "small"))
    reloaded = SentenceTransformer(str(tmp_path / "small"), device="cuda")
    a = small.encode(HELDOUT, convert_to_tensor=True)
    b = reloaded.encode(HELDOUT, convert_to_tensor=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compress_model_dtype_on_the_gpu_saves_reloads_and_keeps_only_paying_ranks(tmp_path, dtype):
    from transformers import AutoModel

    from drone_hf import KernelCosts
    from drone_hf.candidates import breakeven_rank

    # Base-size shapes (768 wide, FFN 3072) at batch 32 x 512: large enough that GEMMs, not launches, set the time.
    teacher = tiny_teacher(hidden_size=768, intermediate_size=3072, num_attention_heads=12).to(CUDA)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    calibration = tiny_batches(num_rows=128, seq_len=48, batch_size=32)  # > 3072 tokens
    stats = collect_activation_stats(teacher, calibration)
    costs = KernelCosts(dtype, device=CUDA, tokens=32 * 512)
    compressed = compress_model(
        teacher, stats, target_speedup=1.2, dtype=dtype, allocation_options={"kernel_costs": costs}
    )
    assert compressed.dtype == dtype and {p.device.type for p in compressed.parameters()} == {"cuda"}
    for name, rank in compressed.config.drone_ranks.items():  # every chosen rank was measured faster on this GPU
        out_f, in_f = teacher.get_submodule(name).weight.shape
        assert rank <= breakeven_rank(out_f, in_f)
        times = costs.seconds("linear", (out_f, in_f), [None, rank])
        assert times[rank] < times[None], (name, rank, times)
    compressed.save_pretrained(tmp_path / "model")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").to(CUDA).eval()
    assert reloaded.dtype == dtype
    batches = [_inputs(b) for b in calibration]
    assert torch.equal(_logits(compressed, batches, CUDA), _logits(reloaded, batches, CUDA))
    assert type(AutoModel.from_pretrained(tmp_path / "model")).__name__.startswith("Drone")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_peft_lora_by_role_name_trains_merges_and_reloads_on_the_gpu(tmp_path):
    """`get_peft_model(compressed, LoraConfig(target_modules=["query", "value"]))` on a CUDA model: the drone LoRA
    layers (drone_hf/lora_layers.py) train there, merge exactly (rank k + r), and the merge reloads identically."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    compressed = compress_model(_model("bert"), None, method="svd", rank=8).to(CUDA)
    tuned = peft.get_peft_model(compressed, peft.LoraConfig(target_modules=["query", "value"], r=4))
    batches = tiny_batches()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for batch in batches:
        loss = tuned(**_inputs(batch, CUDA), labels=batch["labels"].to(CUDA)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval()
    assert any(float(p.abs().max()) > 0 for n, p in tuned.named_parameters() if "lora_B" in n)
    before = _logits(tuned, batches, CUDA)
    merged = tuned.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batches, CUDA), before, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).to(CUDA).eval()
    assert {k: v for k, v in reloaded.config.drone_ranks.items() if k.endswith(("query", "value"))} == {
        k: 12 for k in reloaded.config.drone_ranks if k.endswith(("query", "value"))
    }
    torch.testing.assert_close(_logits(reloaded, batches, CUDA), _logits(merged, batches, CUDA), rtol=0, atol=0)
