"""The Lagrangian penalty that drives each mask type's expected sparsity onto its warmed-up target.

Penalty per row, as the original: a mask type's Lagrangian is the mean over its rows (one per layer
for head / kv_group / intermediate, one per (layer, KV group) for query_head, a single row for layer
and hidden) of lambda_1 * (s_r - t) + lambda_2 * (s_r - t)^2, s_r = 1 - mean P(z != 0) over the row's
units. The linear term equals the penalty of the mean sparsity; the quadratic one adds the variance
of the rows, so layers cannot drift apart (half the layers at t + 0.2 and half at t - 0.2 would cost
nothing with the mean first). That matters because the cut keeps exactly the target count in every
row: an uneven masked model drops near-1 units in some layers and keeps near-0 ones in others.
"""

from __future__ import annotations

import torch

from llmshearing.pruning.mask_set import MaskSpec


def target_sparsity(specs: dict[str, MaskSpec], step: int, warmup_steps: int) -> dict[str, float]:
    """Per mask type: t_m * min(1, step / warmup_steps), t_m = 1 - kept_T / size."""
    frac = 1.0 if warmup_steps <= 0 else min(1.0, max(step, 0) / warmup_steps)
    return {n: spec.final_target_sparsity * frac for n, spec in specs.items()}


def lagrangian(rows: dict[str, torch.Tensor], targets: dict[str, float],
               lambdas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_m mean_rows[lambda_1m * (s_mr - t_m) + lambda_2m * (s_mr - t_m)^2] (0-d fp32 tensor);
    minimised over log_alpha, maximised over the lambdas (negative-lr param group)."""
    total = None
    for n, (l1, l2) in lambdas.items():
        d = rows[n] - targets[n]
        term = (l1 * d + l2 * d * d).mean()
        total = term if total is None else total + term
    return total
