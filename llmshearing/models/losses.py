"""Next-token losses computed from the final hidden states, a chunk of tokens at a time.

Why chunks: the full logits of a micro-batch are [tokens, vocab]. With Llama-3's 128,256-token vocabulary
at seq 4096 that is 0.5 G values per sequence (1 GiB in bf16, 2 GiB per fp32 copy), and a loss in fp32
makes several copies (the upcast, log-softmax, its gradient; distillation adds the teacher's logits, two
log-softmaxes, an exp and a product). Here the LM head runs on `chunk_tokens` tokens at a time and each
chunk is reduced to sums at once; in training every chunk is recomputed in backward
(`torch.utils.checkpoint`), so at no time does more than one chunk of logits exist, forward or backward
(the approach of torchtune's chunked cross-entropy and of Liger's / Apple's fused ones, at the price of a
second LM-head matmul per chunk in backward).

The sums (CE summed over the predicted tokens, their count, the distillation KL summed) are what a
micro-batch's mean loss and a token-mean eval loss over many batches or ranks are made of.

Distillation: p^T = softmax(logits / T); per token T^2 * KL(p_teacher^T || p_student^T) (forward KL, the
student covers the teacher's mass) or KL(p_student^T || p_teacher^T) (reverse); T^2 keeps the gradient
scale of the soft targets independent of T (Hinton et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
#: tokens per LM-head chunk: at vocabulary 128,256 one fp32 chunk of logits is 0.5 GiB, at 32,000 125 MiB
DEFAULT_CHUNK_TOKENS = 1024


class Divergence(str, Enum):
    forward_kl = "forward_kl"  # KL(teacher || student)
    reverse_kl = "reverse_kl"  # KL(student || teacher)


@dataclass
class SoftTargets:
    """A frozen teacher's final hidden states [B, S, D_t] (no grad) and its LM-head weight [V, D_t]."""

    hidden: torch.Tensor
    head_weight: torch.Tensor
    temperature: float = 1.0
    divergence: Divergence = Divergence.forward_kl


@dataclass
class LossSums:
    ce_sum: torch.Tensor  # fp32 0-d: next-token cross-entropy summed over the predicted tokens
    n_tokens: torch.Tensor  # int64 0-d: predicted tokens (targets != IGNORE_INDEX)
    kd_sum: torch.Tensor | None = None  # fp32 0-d: T^2 * KL summed over the same tokens


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 divergence: Divergence | str) -> torch.Tensor:
    """[N] KL between the tempered distributions of two [N, V] logit tensors, in fp32 (no T^2)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if Divergence(divergence) == Divergence.forward_kl:
        return (t.exp() * (t - s)).sum(-1)
    return (s.exp() * (s - t)).sum(-1)


def shift_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts token t+1; the last position is ignored."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def next_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 next-token cross-entropy, number of predicted tokens) of one batch of full logits (a
    Hugging Face model's, say): the two sums of a token-mean eval loss over many batches (or ranks)."""
    t = shift_targets(input_ids)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), t.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return ce, (t != IGNORE_INDEX).sum()


def _chunk_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                t_hidden: torch.Tensor | None, t_weight: torch.Tensor | None, temperature: float,
                divergence: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, T^2 KL sum) of one chunk of tokens: hidden [C, D], targets [C]."""
    logits = F.linear(hidden, weight).float()
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if t_hidden is None:
        return ce, ce.new_zeros(())
    t_logits = F.linear(t_hidden, t_weight)
    # every position goes through the KL and a mask picks the kept ones: no boolean indexing (no copy
    # of the chunk's logits, no device-to-host sync for the kept count)
    kl = kl_per_token(logits, t_logits, temperature, divergence).masked_fill(targets == IGNORE_INDEX, 0.0)
    return ce, kl.sum() * temperature ** 2


def chunked_losses(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                   soft: SoftTargets | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> LossSums:
    """LossSums of hidden [B, S, D] through the LM head `head_weight` [V, D] against targets [B, S]
    (IGNORE_INDEX where there is none), and against a teacher's soft targets when given."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    th = tw = None
    temperature, divergence = 1.0, Divergence.forward_kl.value
    if soft is not None:
        if soft.hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(f"teacher hidden states {tuple(soft.hidden.shape)} do not match the student's "
                             f"{tuple(hidden.shape)} (same tokens needed)")
        if soft.head_weight.size(0) != head_weight.size(0):
            raise ValueError(f"teacher vocabulary {soft.head_weight.size(0)} differs from the student's "
                             f"{head_weight.size(0)}: do they share the tokenizer?")
        if soft.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {soft.temperature}")
        th, tw = soft.hidden.reshape(-1, soft.hidden.size(-1)).detach(), soft.head_weight.detach()
        temperature, divergence = float(soft.temperature), Divergence(soft.divergence).value
    recompute = torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad)
    ce_sum = kd_sum = None
    for start in range(0, h.size(0), chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        args = (h[sl], head_weight, t[sl], None if th is None else th[sl], tw, temperature, divergence)
        if recompute:  # keep only the chunk's inputs for backward; its logits are recomputed there
            ce, kd = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            ce, kd = _chunk_sums(*args)
        ce_sum = ce if ce_sum is None else ce_sum + ce
        kd_sum = kd if kd_sum is None else kd_sum + kd
    return LossSums(ce_sum=ce_sum, n_tokens=(t != IGNORE_INDEX).sum(), kd_sum=kd_sum if soft is not None else None)
