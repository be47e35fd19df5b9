"""Knowledge distillation from a frozen teacher: the loss, and the teacher's per-domain eval losses.

Since Sheared-LLaMA, structured pruning recovers best when the pruned student learns from the
source model's logits (Minitron; Llama-3.2 1B/3B) rather than from the LM loss alone. Here the
student's loss is

    (1 - alpha) * CE(student, next tokens) + alpha * T^2 * D(p_teacher^T, p_student^T)

per token (mean over the tokens that have a target), p^T = softmax(logits / T), D the forward KL
KL(teacher || student) (default: the student covers the teacher's mass) or the reverse KL. T^2
keeps the gradient scale of the soft targets independent of T (Hinton et al.).

The teacher's own per-domain eval losses on the run's eval rows are the reference losses of
teacher-gap mixing (`dynamic_loading.update: teacher_gap`): the data mixture then steers to the
domains where the student lags its teacher most.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class Divergence(str, Enum):
    forward_kl = "forward_kl"  # KL(teacher || student)
    reverse_kl = "reverse_kl"  # KL(student || teacher)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0, divergence: str = Divergence.forward_kl,
                      ignore_index: int = -100) -> torch.Tensor:
    """T^2 * mean over positions with a target of the KL between the tempered distributions (fp32)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: do they share the vocabulary?")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Every position goes through the KL and a mask picks the kept ones: boolean indexing would copy
    # both [tokens, vocab] tensors and make the GPU report the kept count to the host every micro-batch.
    keep = targets != ignore_index
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if Divergence(divergence) == Divergence.forward_kl:
        kl = (t.exp() * (t - s)).sum(-1)
    else:
        kl = (s.exp() * (s - t)).sum(-1)
    return kl.masked_fill(~keep, 0.0).sum() / keep.sum() * temperature ** 2
