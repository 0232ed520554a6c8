import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from drone_hf import DroneDistillationArguments, DroneDistillationTrainer, compress_model, distill, distillation_loss

from .testing_utils import tiny_batches, tiny_dataset, tiny_teacher, tiny_tokenizer, training_args


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(num_labels: int = 3):
    teacher = tiny_teacher(num_labels=num_labels)
    with torch.no_grad():  # a random head gives near-uniform logits: sharpen it so that the KL term is not ~0
        teacher.classifier.weight.mul_(100.0)
    student = compress_model(teacher, None, method="svd", rank=2).eval()  # far from the teacher: non-zero losses
    if num_labels > 1:
        with torch.no_grad():  # and a head that ranks the classes differently
            student.classifier.weight.copy_(teacher.classifier.weight.roll(1, 0))
    return teacher, student


def _loss(tmp_path, teacher, student, batch, **weights):
    trainer = DroneDistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        teacher_model=teacher,
        distillation_args=DroneDistillationArguments(**weights),
    )
    return trainer.compute_loss(student, dict(batch))


ONLY_TASK = {"alpha_hidden": 0.0, "alpha_kl": 0.0, "alpha_task": 1.0}
ONLY_KL = {"alpha_hidden": 0.0, "alpha_kl": 1.0, "alpha_task": 0.0, "temperature": 2.0}
ONLY_HIDDEN = {"alpha_hidden": 1.0, "alpha_kl": 0.0, "alpha_task": 0.0}


def test_only_the_task_term_is_the_cross_entropy(tmp_path):
    teacher, student = _pair()
    batch = tiny_batches()[0]
    loss = _loss(tmp_path, teacher, student, batch, **ONLY_TASK)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]))


def test_kl_term_matches_a_hand_computation_at_temperature_two(tmp_path):
    teacher, student = _pair()
    batch = tiny_batches()[1]
    loss = _loss(tmp_path, teacher, student, batch, **ONLY_KL)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = student(**inputs).logits.double(), teacher(**inputs).logits.double()
    p_t, p_s = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = 4.0 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()  # T^2 * KL(p_t || p_s), mean over the batch
    assert loss.item() > 1e-4
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layers", ["all", [0, 2]])
def test_hidden_term_matches_a_hand_computed_masked_mse(tmp_path, layers):
    teacher, student = _pair()
    batch = tiny_batches()[0]  # rows 0 and 2 are padded after position 4
    loss = _loss(tmp_path, teacher, student, batch, **ONLY_HIDDEN, hidden_layers=layers)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        hs = student(**inputs, output_hidden_states=True).hidden_states
        ht = teacher(**inputs, output_hidden_states=True).hidden_states
    indices = range(len(ht)) if layers == "all" else layers
    per_layer = []
    for index in indices:
        total, count = 0.0, 0
        for row in range(len(batch["input_ids"])):
            for position in range(batch["input_ids"].shape[1]):
                if batch["attention_mask"][row, position]:
                    total += float(((hs[index][row, position] - ht[index][row, position]) ** 2).sum())
                    count += hs[index].shape[-1]
        per_layer.append(total / count)
    assert len(ht) == 3 and loss.item() > 1e-6
    assert loss.item() == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-5)
    unmasked = sum(float(F.mse_loss(hs[i], ht[i])) for i in indices) / len(per_layer)
    assert unmasked != pytest.approx(loss.item(), rel=1e-3)  # padding is left out, and that shows


def test_total_is_the_weighted_sum_of_the_terms(tmp_path):
    teacher, student = _pair()
    batch = tiny_batches()[0]
    parts = {
        name: _loss(tmp_path, teacher, student, batch, **weights)
        for name, weights in (("task", ONLY_TASK), ("kl", ONLY_KL), ("hidden", ONLY_HIDDEN))
    }
    total = _loss(tmp_path, teacher, student, batch, alpha_hidden=0.5, alpha_kl=2.0, alpha_task=0.25)
    expected = 0.5 * parts["hidden"] + 2.0 * parts["kl"] + 0.25 * parts["task"]
    torch.testing.assert_close(total, expected)


def test_regression_replaces_kl_by_logit_mse(tmp_path):
    teacher, student = _pair(num_labels=1)
    batch = {**tiny_batches()[0], "labels": torch.tensor([0.1, 0.5, 0.9, 0.3])}
    kl = _loss(tmp_path, teacher, student, batch, **ONLY_KL)
    task = _loss(tmp_path, teacher, student, batch, **ONLY_TASK)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    assert s.shape == (4, 1)
    torch.testing.assert_close(kl, F.mse_loss(s, t))  # no temperature for a regression head
    torch.testing.assert_close(task, F.mse_loss(s.squeeze(-1), batch["labels"]))
    before = copy.deepcopy(student.state_dict())
    settings = DroneDistillationArguments(max_steps=2, per_device_train_batch_size=4, alpha_task=1.0)
    distill(
        student,
        teacher,
        tiny_dataset(num_labels=1),
        settings,
        training_args=training_args(tmp_path),
        processing_class=tiny_tokenizer(),
    )
    assert not torch.equal(before["classifier.weight"], student.classifier.weight)


def test_distillation_loss_function_reports_unweighted_parts():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    loss, parts = distillation_loss(logits, logits, alpha_hidden=0.0, alpha_task=3.0, task_loss=torch.tensor(0.5))
    assert loss.item() == pytest.approx(1.5) and parts["kl"].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"`alpha_task` > 0 needs the task loss"):
        distillation_loss(logits, logits, alpha_hidden=0.0, alpha_task=1.0)
    with pytest.raises(ValueError, match=r"`alpha_hidden` > 0 needs the hidden states"):
        distillation_loss(logits, logits)


def test_distill_trains_the_student_and_leaves_the_teacher_unchanged(tmp_path):
    teacher, student = _pair()
    teacher.train()  # a trained model as the Trainer leaves it: train mode, requires_grad
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.setdefault("teacher_frozen", not any(p.requires_grad for p in teacher.parameters()))
            seen.setdefault("teacher_eval", not teacher.training)

    settings = DroneDistillationArguments(max_steps=2, per_device_train_batch_size=4, logging_steps=1, alpha_task=0.5)
    result = distill(
        student,
        teacher,
        tiny_dataset(),
        settings,
        training_args=training_args(tmp_path),
        processing_class=tiny_tokenizer(),
        callbacks=[Spy()],
    )
    assert result is student and not student.training
    assert seen == {"teacher_frozen": True, "teacher_eval": True}
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training  # flags restored
    changed = [k for k, v in student.state_dict().items() if not torch.equal(student_before[k], v)]
    assert any("down.weight" in k for k in changed)


def test_distill_copies_training_arguments_into_a_subfolder(tmp_path):
    teacher, student = _pair()
    recorded = {}

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorded.update(
                output_dir=args.output_dir,
                report_to=args.report_to,
                max_steps=args.max_steps,
                learning_rate=args.learning_rate,
                save_strategy=args.save_strategy,
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            recorded.setdefault("logs", []).append(dict(logs))

    base = training_args(tmp_path, max_steps=50, learning_rate=1e-3, save_strategy="steps", save_steps=1)
    settings = DroneDistillationArguments(max_steps=2, learning_rate=3e-5, logging_steps=1)
    distill(
        student,
        teacher,
        tiny_dataset(),
        settings,
        training_args=base,
        processing_class=tiny_tokenizer(),
        callbacks=[Recorder()],
    )
    assert recorded["output_dir"] == str(tmp_path / "out" / "distillation")
    assert (recorded["max_steps"], recorded["learning_rate"], recorded["report_to"]) == (2, 3e-5, [])
    assert recorded["save_strategy"] == "no" and not [p for p in tmp_path.rglob("*") if p.is_file()]  # no files
    assert base.max_steps == 50 and base.output_dir == str(tmp_path / "out")  # the base is untouched
    assert {"loss_hidden", "loss_kl"} <= set(recorded["logs"][0])

    # A TrainingArguments is used as is (its schedule), in its own subfolder, with the default loss.
    recorded.clear()
    distill(
        student,
        teacher,
        tiny_dataset(),
        training_args(tmp_path, max_steps=1),
        processing_class=tiny_tokenizer(),
        callbacks=[Recorder()],
    )
    assert recorded["max_steps"] == 1 and recorded["output_dir"].endswith("distillation")


def _equal_length_rows(num_rows: int = 8, length: int = 6):
    import datasets

    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 99, (num_rows, length), generator=generator).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * length] * num_rows, "labels": [i % 3 for i in range(num_rows)]}
    )


def test_gradient_accumulation_steps_reach_the_trainer_and_equal_one_larger_batch(tmp_path):
    """One optimiser step on the same 8 rows: batch 4 x 2 accumulated batches gives the weights of batch 8 x 1.

    Exact because every term of the loss is a per-batch mean over equally many items: the hidden-state MSE over the
    non-padding tokens of the batch (the rows all have 6 tokens and no padding, so each batch of 4 holds half of the
    tokens), the KL over rows (`batchmean`); Trainer divides each batch's loss by the accumulation steps. Dropout is
    off (it would draw differently), the learning rate is constant from step 1, and SGD (not AdamW, whose first step is
    ~`lr * sign(grad)`) makes the update proportional to the gradient. 8 rows are one epoch, so both runs see all of
    them in their one step, whatever the shuffled order; batch 4 without accumulation (half the rows) differs.
    """
    teacher = tiny_teacher(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = compress_model(teacher, None, method="svd", rank=2).eval()
    rows = _equal_length_rows()
    recorded = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorded.append(args.gradient_accumulation_steps)

    def one_step(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        settings = DroneDistillationArguments(
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.5,
            warmup_steps=0,
            lr_scheduler_type="constant",
        )
        trained = distill(
            copy.deepcopy(student),
            teacher,
            rows,
            settings,
            training_args=training_args(tmp_path, optim="sgd"),
            processing_class=tiny_tokenizer(),
            callbacks=[Recorder()],
        )
        return trained.state_dict()

    accumulated, large, half = one_step(4, 2), one_step(8, 1), one_step(4, 1)
    assert recorded == [2, 1, 1]
    assert any(not torch.equal(value, student.state_dict()[name]) for name, value in large.items())
    for name, value in large.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.allclose(half[name], value, rtol=1e-3, atol=1e-5) for name, value in large.items())


def test_distillation_trainer_evaluates_with_logits_only(tmp_path):
    teacher, student = _pair()
    trainer = DroneDistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        teacher_model=teacher,
        processing_class=tiny_tokenizer(),
        eval_dataset=tiny_dataset(8),
    )
    predictions = trainer.predict(tiny_dataset(8))
    assert predictions.predictions.shape == (8, 3) and predictions.metrics["test_loss"] > 0


def test_unlabelled_rows_take_no_task_term_and_only_the_teacher_teaches_them(tmp_path):
    teacher, student = _pair()
    batch = dict(tiny_batches()[0])
    labels = batch["labels"].clone()
    labels[::2] = -100  # every other row unlabelled (e.g. augmented text)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = labels != -100
    task = _loss(tmp_path, teacher, student, {**batch, "labels": labels}, **ONLY_TASK)
    torch.testing.assert_close(task, F.cross_entropy(logits[labelled], labels[labelled]))
    assert not torch.isclose(task, F.cross_entropy(logits, batch["labels"]))  # the unlabelled rows did not count
    # A batch of unlabelled rows only: no task term (the model's own loss would be NaN), the KL term unchanged.
    none = torch.full_like(labels, -100)
    assert _loss(tmp_path, teacher, student, {**batch, "labels": none}, **ONLY_TASK).item() == 0.0
    both = {"alpha_hidden": 0.0, "alpha_kl": 1.0, "alpha_task": 1.0}
    kl = _loss(tmp_path, teacher, student, batch, **ONLY_KL)
    torch.testing.assert_close(_loss(tmp_path, teacher, student, {**batch, "labels": none}, **both), kl)
    mixed = _loss(tmp_path, teacher, student, {**batch, "labels": labels}, **both)
    torch.testing.assert_close(mixed, kl + task)


def test_task_term_without_labels_raises(tmp_path):
    teacher, student = _pair()
    batch = {k: v for k, v in tiny_batches()[0].items() if k != "labels"}
    with pytest.raises(ValueError, match=r"`alpha_task` > 0 needs `labels`"):
        _loss(tmp_path, teacher, student, batch, alpha_task=1.0)


@pytest.mark.parametrize(
    "teacher_overrides, weights, match",
    [
        ({"vocab_size": 120}, {}, r"different vocabularies \(`vocab_size` 120 vs 99\)"),
        ({"num_labels": 2}, {}, r"`teacher_model` has `num_labels=2`, `model` has `num_labels=3`"),
        ({"num_hidden_layers": 3}, {}, r"same `num_hidden_layers` \(teacher 3, student 2\); set `alpha_hidden=0`"),
        ({"hidden_size": 16, "num_attention_heads": 2}, {}, r"same `hidden_size` \(teacher 16, student 32\)"),
        ({}, {"hidden_layers": [5]}, r"`hidden_layers` \[5\] out of range: indices go from 0 \(embeddings\) to 2"),
    ],
)
def test_incompatible_teacher_raises(tmp_path, teacher_overrides, weights, match):
    student = tiny_teacher()
    with pytest.raises(ValueError, match=match):
        DroneDistillationTrainer(
            model=student,
            args=training_args(tmp_path),
            teacher_model=tiny_teacher(**teacher_overrides),
            distillation_args=DroneDistillationArguments(**weights),
        )


def test_logit_only_distillation_accepts_another_shape(tmp_path):
    student, teacher = tiny_teacher(), tiny_teacher(num_hidden_layers=3)
    settings = DroneDistillationArguments(alpha_hidden=0.0, max_steps=1, per_device_train_batch_size=4)
    distill(
        student,
        teacher,
        tiny_dataset(8),
        settings,
        training_args=training_args(tmp_path),
        processing_class=tiny_tokenizer(),
    )


def test_teacher_with_another_tokenizer_raises(tmp_path):
    teacher, student = _pair()
    one_step = DroneDistillationArguments(max_steps=1)

    def distill_one_step(model, **kwargs):
        distill(model, teacher, tiny_dataset(), one_step, training_args=training_args(tmp_path), **kwargs)

    with pytest.raises(ValueError, match=r"different vocabularies \(99 vs 99 tokens\)"):
        distill_one_step(student, processing_class=tiny_tokenizer(), teacher_processing_class=tiny_tokenizer(offset=7))
    with pytest.raises(ValueError, match=r"The tokenizer has 120 tokens but the models' `vocab_size` is 99"):
        distill_one_step(student, processing_class=tiny_tokenizer(vocab_size=120))
    with pytest.raises(ValueError, match=r"`teacher_model` is the student itself"):
        distill_one_step(teacher)


@pytest.mark.parametrize("dataset, match", [(None, r"needs a `train_dataset`"), ([], r"`train_dataset` is empty")])
def test_distill_without_training_rows_raises(tmp_path, dataset, match):
    teacher, student = _pair()
    with pytest.raises(ValueError, match=match):
        distill(student, teacher, dataset, DroneDistillationArguments(), training_args=training_args(tmp_path))


@pytest.mark.parametrize("balance", [True, False])
def test_the_trainer_balances_the_students_factors_without_changing_its_function(tmp_path, balance):
    teacher, student = _pair()
    with torch.no_grad():  # unbalance every factor pair as DRONE's are: up x 100, down / 100
        for module in student.modules():
            if hasattr(module, "balance_"):
                module.up.weight.mul_(100.0)
                module.down.weight.div_(100.0)
    batch = next(iter(tiny_batches()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = student(**inputs).logits
    DroneDistillationTrainer(
        model=student,
        args=training_args(tmp_path),
        teacher_model=teacher,
        distillation_args=DroneDistillationArguments(balance_factors=balance),
    )
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, before, rtol=1e-5, atol=1e-5)
    pairs = [m for m in student.modules() if hasattr(m, "balance_")]
    ratios = torch.cat([m.up.weight.norm(dim=0) / m.down.weight.norm(dim=1) for m in pairs])
    if balance:
        torch.testing.assert_close(ratios, torch.ones_like(ratios), rtol=1e-4, atol=0)
    else:
        assert ratios.min() > 100
