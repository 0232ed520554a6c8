"""The feature-distillation loss (Ben Noach & Goldberg, AACL 2020) as pure tensor functions: hidden-state MSE over
non-padding tokens, softened-logit KL and the task loss, weighted. [`DroneDistillationTrainer`] calls them; the
sentence-embedding variant ([`embedding_distillation_loss`], no logits) is what
[`compress_sentence_transformer`]'s `distill_steps` trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def hidden_state_mse(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    *,
    attention_mask: torch.Tensor | None = None,
    hidden_layers: str | Sequence[int] = "all",
) -> torch.Tensor:
    r"""
    Mean over the selected layers of the MSE between teacher and student hidden states, over non-padding tokens.

    Args:
        student_hidden_states (`Sequence[Tensor]`): `output_hidden_states` of the student, each `batch x seq x hidden`
            (index 0 is the embeddings' output).
        teacher_hidden_states (`Sequence[Tensor]`): The teacher's, same shapes.
        attention_mask (`Tensor`, *optional*): `batch x seq`, 1 for real tokens; padding positions are left out.
        hidden_layers (`str` or `Sequence[int]`, *optional*, defaults to `"all"`): Indices to match, or `"all"`.

    Returns:
        `torch.Tensor`: a scalar (float32).
    """
    if len(student_hidden_states) != len(teacher_hidden_states):
        raise ValueError(
            f"Student and teacher return {len(student_hidden_states)} and {len(teacher_hidden_states)} hidden states; "
            "hidden-state distillation needs the same number of layers."
        )
    indices = range(len(teacher_hidden_states)) if hidden_layers == "all" else list(hidden_layers)
    mask = None if attention_mask is None else attention_mask.to(torch.float32).unsqueeze(-1)
    losses = []
    for index in indices:
        student, teacher = student_hidden_states[index].float(), teacher_hidden_states[index].float()
        if student.shape != teacher.shape:
            raise ValueError(f"Hidden state {index}: shape {tuple(student.shape)} (student), {tuple(teacher.shape)}.")
        if mask is None:
            losses.append(F.mse_loss(student, teacher))
        else:
            squared = (student - teacher).pow(2) * mask
            losses.append(squared.sum() / (mask.sum() * student.shape[-1]).clamp_min(1.0))
    return torch.stack(losses).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_hidden_states: Sequence[torch.Tensor] | None = None,
    teacher_hidden_states: Sequence[torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    task_loss: torch.Tensor | None = None,
    alpha_hidden: float = 1.0,
    alpha_kl: float = 1.0,
    alpha_task: float = 0.0,
    temperature: float = 2.0,
    hidden_layers: str | Sequence[int] = "all",
    regression: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    The feature-distillation loss `alpha_hidden * hidden MSE + alpha_kl * T^2 * KL(softmax(t/T) || softmax(s/T)) +
    alpha_task * task_loss`; for regression the KL term is `MSE(student logits, teacher logits)` (no temperature).
    Terms with weight 0 are not computed.

    Args:
        student_logits (`Tensor`), teacher_logits (`Tensor`): `batch x num_labels`.
        student_hidden_states, teacher_hidden_states (`Sequence[Tensor]`, *optional*): Needed when `alpha_hidden > 0`.
        attention_mask (`Tensor`, *optional*): Excludes padding from the hidden-state MSE.
        task_loss (`Tensor`, *optional*): The student's own loss on the labels; needed when `alpha_task > 0`.
        alpha_hidden, alpha_kl, alpha_task (`float`): Weights. temperature (`float`): `T`.
        hidden_layers (`str` or `Sequence[int]`, *optional*, defaults to `"all"`): See [`hidden_state_mse`].
        regression (`bool`, *optional*, defaults to `False`): A one-output regression head.

    Returns:
        `tuple[Tensor, dict[str, Tensor]]`: the total and its unweighted parts (`hidden`, `kl`, `task`).

    Example:

    ```py
    >>> import torch
    >>> loss, parts = distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), alpha_hidden=0.0)
    >>> float(loss)
    0.0
    ```
    """
    parts: dict[str, torch.Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if alpha_hidden > 0:
        if student_hidden_states is None or teacher_hidden_states is None:
            raise ValueError("`alpha_hidden` > 0 needs the hidden states of both models (output_hidden_states=True).")
        parts["hidden"] = hidden_state_mse(
            student_hidden_states, teacher_hidden_states, attention_mask=attention_mask, hidden_layers=hidden_layers
        )
        total = total + alpha_hidden * parts["hidden"]
    if alpha_kl > 0:
        student, teacher = student_logits.float(), teacher_logits.float()
        if regression:
            parts["kl"] = F.mse_loss(student, teacher)
        else:
            parts["kl"] = temperature**2 * F.kl_div(
                F.log_softmax(student / temperature, dim=-1),
                F.log_softmax(teacher / temperature, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
        total = total + alpha_kl * parts["kl"]
    if alpha_task > 0:
        if task_loss is None:
            raise ValueError("`alpha_task` > 0 needs the task loss: the batches must have `labels`.")
        parts["task"] = task_loss.float()
        total = total + alpha_task * parts["task"]
    return total, parts


def embedding_distillation_loss(
    student_hidden_state: torch.Tensor,
    teacher_hidden_state: torch.Tensor,
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    hidden_weight: float = 1.0,
    cosine_weight: float = 10.0,
    relation_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    The distillation loss of a sentence-embedding encoder: `hidden_weight * MSE(last hidden states) + cosine_weight *
    mean(1 - cos(student embedding, teacher embedding)) + relation_weight * MSE(student's in-batch cosine matrix,
    teacher's)`, the MSE over non-padding tokens ([`hidden_state_mse`]) and the cosines over the final sentence
    embeddings (after pooling, dense and normalisation modules). The relation term compares every pair of sentences in
    the batch: it is what retrieval and pair scoring rank by. Terms with weight 0 are not computed.

    Args:
        student_hidden_state (`Tensor`), teacher_hidden_state (`Tensor`): `batch x seq x hidden` last hidden states.
        student_embeddings (`Tensor`), teacher_embeddings (`Tensor`): `batch x dim` sentence embeddings.
        attention_mask (`Tensor`, *optional*): `batch x seq`, 1 for real tokens; padding is left out of the MSE.
        hidden_weight (`float`, *optional*, defaults to 1.0): Weight of the hidden-state MSE.
        cosine_weight (`float`, *optional*, defaults to 10.0): Weight of the embedding cosine distance.
        relation_weight (`float`, *optional*, defaults to 0.0): Weight of the mean squared difference between the
            `batch x batch` cosine-similarity matrices of the student's and the teacher's embeddings.

    Returns:
        `tuple[Tensor, dict[str, Tensor]]`: the total (float32 scalar) and its unweighted parts (`hidden`, `cosine`).

    Example:

    ```py
    >>> import torch
    >>> hidden, embeddings = torch.ones(2, 3, 4), torch.ones(2, 4)
    >>> loss, parts = embedding_distillation_loss(hidden, hidden, embeddings, embeddings)
    >>> float(loss)
    0.0
    ```
    """
    parts: dict[str, torch.Tensor] = {}
    total = student_embeddings.new_zeros((), dtype=torch.float32)
    if hidden_weight > 0:
        parts["hidden"] = hidden_state_mse(
            [student_hidden_state], [teacher_hidden_state], attention_mask=attention_mask
        )
        total = total + hidden_weight * parts["hidden"]
    if (cosine_weight > 0 or relation_weight > 0) and student_embeddings.shape != teacher_embeddings.shape:
        raise ValueError(
            f"Sentence embeddings of shape {tuple(student_embeddings.shape)} (student) and "
            f"{tuple(teacher_embeddings.shape)} (teacher); the cosine terms need one shape."
        )
    if cosine_weight > 0:
        cosine = F.cosine_similarity(student_embeddings.float(), teacher_embeddings.float(), dim=-1)
        parts["cosine"] = (1.0 - cosine).mean()
        total = total + cosine_weight * parts["cosine"]
    if relation_weight > 0:
        student_unit = F.normalize(student_embeddings.float(), dim=-1)
        teacher_unit = F.normalize(teacher_embeddings.float(), dim=-1)
        parts["relation"] = F.mse_loss(student_unit @ student_unit.T, teacher_unit @ teacher_unit.T)
        total = total + relation_weight * parts["relation"]
    return total, parts


__all__ = ["distillation_loss", "embedding_distillation_loss", "hidden_state_mse"]
