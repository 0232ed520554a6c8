import copy

import pytest
import torch
from transformers import DataCollatorWithPadding

from drone_hf import DroneDistillationArguments, DroneDistillationTrainer, compress_model, distill
from drone_hf.teacher_cache import TeacherOutputCache

from .testing_utils import tiny_dataset, tiny_teacher, tiny_tokenizer, training_args


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair():
    teacher = tiny_teacher(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():  # sharpen the random head so that the KL term is not ~0
        teacher.classifier.weight.mul_(100.0)
    student = compress_model(teacher, None, method="svd", rank=2).eval()
    return teacher, student


def _padded(rows, side="right"):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = side
    return DataCollatorWithPadding(tokenizer)([{k: v for k, v in row.items() if k != "labels"} for row in rows])


class _CountCalls:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def test_lookup_returns_the_teachers_outputs_at_the_real_tokens_under_any_padding():
    """Cached in batches of 4 in dataset order, read back in another grouping and padding length: the logits and
    every hidden state equal a direct teacher forward at the real tokens; padding positions are zeros."""
    teacher, _ = _pair()
    rows = tiny_dataset(num_rows=12)
    cache = TeacherOutputCache.build(teacher, [_padded(rows.select(range(i, i + 4))) for i in range(0, 12, 4)])
    assert len(cache) == 12 and cache.layers == list(range(teacher.config.num_hidden_layers + 1))
    batch = _padded(rows.select([11, 0, 6, 3, 5]))  # lengths 7, 4, 6, 7, 5: padded to 7
    with torch.no_grad():
        direct = teacher.eval()(**batch, output_hidden_states=True)
    cached = cache.lookup(batch)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the batch has padding
    torch.testing.assert_close(cached.logits, direct.logits, rtol=1e-5, atol=1e-5)
    for index, hidden in enumerate(direct.hidden_states):
        torch.testing.assert_close(cached.hidden_states[index][mask], hidden[mask], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(cached.hidden_states[index][~mask]) == 0


def test_left_padded_batches_are_refused():
    """A left-padded row's absolute positions shift with its batch's length (the teacher's outputs at its tokens
    change: checked), so neither building nor reading the cache takes one."""
    teacher, _ = _pair()
    rows = tiny_dataset(num_rows=8)
    short, long = _padded(rows.select([0, 1]), "left"), _padded(rows.select([0, 3]), "left")  # row 0 padded 1, 3
    with torch.no_grad():
        a, b = teacher.eval()(**short).logits[0], teacher(**long).logits[0]
    assert not torch.allclose(a, b, atol=1e-3)
    cache = TeacherOutputCache.build(teacher, [_padded(rows)])
    for call in (lambda: TeacherOutputCache.build(teacher, [long]), lambda: cache.lookup(long)):
        with pytest.raises(ValueError, match="right-padded"):
            call()


def test_only_the_chosen_layers_are_cached_and_bfloat16_halves_the_memory():
    teacher, _ = _pair()
    rows = tiny_dataset(num_rows=8)
    batches = [_padded(rows.select(range(i, i + 4))) for i in (0, 4)]
    full = TeacherOutputCache.build(teacher, batches)
    chosen = TeacherOutputCache.build(teacher, batches, layers=[0, 2])
    half = TeacherOutputCache.build(teacher, batches, layers=[0, 2], dtype="bfloat16")
    logits_only = TeacherOutputCache.build(teacher, batches, layers=None)
    batch = batches[1]
    states = chosen.lookup(batch).hidden_states
    assert [state is not None for state in states] == [True, False, True] + [False] * (len(states) - 3)
    torch.testing.assert_close(states[2], full.lookup(batch).hidden_states[2])
    logits_bytes = logits_only.nbytes
    assert logits_only.lookup(batch).hidden_states is None and logits_bytes == 8 * 3 * 4
    assert half.nbytes - logits_bytes == (chosen.nbytes - logits_bytes) // 2
    torch.testing.assert_close(half.lookup(batch).hidden_states[2].float(), states[2], rtol=1e-2, atol=1e-2)


def test_a_row_that_was_not_cached_is_an_error():
    teacher, _ = _pair()
    rows = tiny_dataset(num_rows=8)
    cache = TeacherOutputCache.build(teacher, [_padded(rows.select(range(4)))])
    changed = _padded(rows.select([0, 1]))
    changed["input_ids"][0, 0] += 1  # as a masking collator would
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup(changed)


def test_build_restores_the_teachers_mode_and_refuses_a_bad_dtype():
    teacher, _ = _pair()
    teacher.train()
    TeacherOutputCache.build(teacher, [_padded(tiny_dataset(num_rows=4))])
    assert teacher.training
    with pytest.raises(ValueError, match="teacher_cache_dtype.*'int8'"):
        TeacherOutputCache.build(teacher, [], dtype="int8")
    with pytest.raises(ValueError, match="held no rows"):
        TeacherOutputCache.build(teacher, [])


@pytest.mark.parametrize(
    "overrides, match",
    [({"teacher_cache_dtype": "float64"}, "teacher_cache_dtype"), ({"cache_teacher_outputs": 1}, "True or False")],
)
def test_bad_cache_arguments_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        DroneDistillationArguments(**overrides)


def test_cached_distillation_trains_the_same_student_without_teacher_forwards(tmp_path):
    """Three SGD steps (batch 4 x 2 accumulated, rows of 4-7 tokens padded per batch, shuffled): the cached teacher
    gives the same student as a teacher forward per batch, and the teacher runs only to build the cache (once per
    batch of the 24 rows), never during the steps."""
    teacher, student = _pair()
    rows = tiny_dataset(num_rows=24)

    def run(cache: bool):
        counter = _CountCalls(teacher)
        settings = DroneDistillationArguments(
            max_steps=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=0.5,
            warmup_steps=0,
            lr_scheduler_type="constant",
            alpha_task=0.5,
            cache_teacher_outputs=cache,
        )
        trainer = DroneDistillationTrainer(
            model=copy.deepcopy(student),
            args=training_args(tmp_path, optim="sgd", **settings.training_overrides()),
            teacher_model=teacher,
            distillation_args=settings,
            train_dataset=rows,
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        counter.handle.remove()
        return trainer, counter.calls

    plain, plain_calls = run(cache=False)
    cached, cached_calls = run(cache=True)
    assert plain_calls == 3 * 2 and cached_calls == 24 // 4  # per batch vs once per cached batch
    assert plain.teacher_cache is None and len(cached.teacher_cache) == 24 and cached.teacher_cache_seconds > 0
    trained, reference = cached.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(value, student.state_dict()[name]) for name, value in reference.items())
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_distill_passes_the_cache_setting_through(tmp_path):
    teacher, student = _pair()
    counter = _CountCalls(teacher)
    settings = DroneDistillationArguments(max_steps=4, per_device_train_batch_size=8, cache_teacher_outputs=True)
    distill(
        student,
        teacher,
        tiny_dataset(num_rows=16),
        settings,
        training_args=training_args(tmp_path),
        processing_class=tiny_tokenizer(),
    )
    counter.handle.remove()
    assert counter.calls == 2  # the two cache batches; four steps read the cache


@pytest.mark.parametrize("cache", [False, True])
def test_the_teacher_runs_under_the_trainings_mixed_precision(tmp_path, cache):
    """`bf16=True`: the teacher's linears compute in bf16 as the student's do (the teacher is not prepared by
    accelerate, so without the autocast it ran in float32), per batch or once for the cache."""
    teacher, student = _pair()
    dtypes = set()
    handle = teacher.classifier.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    settings = DroneDistillationArguments(max_steps=2, per_device_train_batch_size=8, cache_teacher_outputs=cache)
    distill(
        student,
        teacher,
        tiny_dataset(num_rows=16),
        settings,
        training_args=training_args(tmp_path, bf16=True),
        processing_class=tiny_tokenizer(),
    )
    handle.remove()
    assert dtypes == {torch.bfloat16}
