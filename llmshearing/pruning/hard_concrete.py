"""Hard-concrete (L0) masks: the math of one stochastic mask type, as pure tensor functions.

A mask type is a tensor of logits `log_alpha` of shape [..., N]: the last dim holds the N units
of one *row* (e.g. the heads of one layer), leading dims enumerate rows. Nothing here knows
about models or Composer; `llmshearing.pruning.l0` composes several mask types.

Everything is computed in fp32 whatever the input dtype, because the stretched sigmoid and the
0.8-scaled deterministic scores are sensitive to bf16 rounding near the 0/1 ends.

Constants follow the method (Louizos et al. 2018 as used by Sheared-LLaMA): temperature
beta = 2/3, stretch interval (l, r) = (-0.1, 1.1), eps = 1e-6, log_alpha kept in
[log 1e-2, log 1e2]. The init mean 5 lies above that range, so the effective init is log 100.
"""

from __future__ import annotations

import math

import torch

BETA: float = 2.0 / 3.0
LIMIT_L: float = -0.1
LIMIT_R: float = 1.1
EPS: float = 1e-6
LOG_ALPHA_MIN: float = math.log(1e-2)
LOG_ALPHA_MAX: float = math.log(1e2)
INIT_MEAN: float = 5.0
INIT_STD: float = 0.01
#: the reference's "magical number": deterministic scores are sigmoid(log_alpha / beta * 0.8)
DETERMINISTIC_SCALE: float = 0.8

#: beta * log(-l / r): the logit at which the stretched sample is exactly 0
_Q0_SHIFT: float = BETA * math.log(-LIMIT_L / LIMIT_R)


def init_log_alpha(shape: tuple[int, ...] | torch.Size, mean: float = INIT_MEAN, std: float = INIT_STD,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 logits ~ N(mean, std), clamped to the allowed range (so the parameter is always in
    range, as the reference's clamp-at-use made it in effect)."""
    t = torch.empty(tuple(shape), dtype=torch.float32)
    t.normal_(mean, std, generator=generator)
    return t.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def clamp_at_use(log_alpha: torch.Tensor) -> torch.Tensor:
    """Value clamped to [LOG_ALPHA_MIN, LOG_ALPHA_MAX], gradient passed through unchanged.

    Matches the reference (which clamps in place right before use, so gradients flow as if
    unclamped) without in-place edits inside forward, which FSDP would discard on reshard.
    """
    la = log_alpha.float()
    return la + (la.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX) - la).detach()


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard-concrete sample z in [0, 1] per unit (shared by the whole batch).

    u ~ U(eps, 1-eps); s = sigmoid((log u - log(1-u) + log_alpha) / beta);
    z = clamp(s * (r - l) + l, 0, 1). Differentiable w.r.t. log_alpha.
    """
    la = log_alpha.float()
    u = torch.rand(la.shape, dtype=torch.float32, device=la.device, generator=generator)
    u = u * (1 - 2 * EPS) + EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = 1 - Q(0), the "score" of each unit; Q(0) clamped to [eps, 1-eps]."""
    q0 = torch.sigmoid(_Q0_SHIFT - log_alpha.float()).clamp(EPS, 1 - EPS)
    return 1 - q0


def soft_scores(log_alpha: torch.Tensor) -> torch.Tensor:
    """sigmoid(log_alpha / beta * 0.8): the values that kept units carry in deterministic masks."""
    return torch.sigmoid(log_alpha.float() / BETA * DETERMINISTIC_SCALE)


def expected_n_keep(log_alpha: torch.Tensor) -> torch.Tensor:
    """Per-row kept count of the "current expected" model: N - round(N - sum(scores)).

    Written as the reference does (round the number to *remove*) so that .5 ties round alike.
    Returns a long tensor of the leading (row) shape; no host sync.
    """
    n = log_alpha.shape[-1]
    n_remove = torch.round(n - prob_nonzero(log_alpha).sum(-1))
    return (n - n_remove).long()


def deterministic(log_alpha: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
    """Deterministic mask: soft scores with all but the `n_keep` largest of every row set to 0.

    Batched over rows (argsort + scatter of ranks, no loop). `n_keep` is an int or a tensor of
    the row shape (log_alpha.shape[:-1]). Ties are broken towards the lower unit index
    (stable sort), so the result is reproducible.
    """
    soft = soft_scores(log_alpha)
    n = soft.shape[-1]
    order = torch.argsort(soft, dim=-1, descending=True, stable=True)
    positions = torch.arange(n, device=soft.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    if isinstance(n_keep, torch.Tensor):
        limit = n_keep.to(device=soft.device).unsqueeze(-1)
    else:
        if not 0 <= n_keep <= n:
            raise ValueError(f"n_keep={n_keep} is outside [0, {n}] (the row size)")
        limit = n_keep
    return torch.where(ranks < limit, soft, torch.zeros_like(soft))
