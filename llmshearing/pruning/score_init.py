"""From importance scores to masks: the score init of the L0 logits, and the one-shot cut's hard masks.

Why: with the paper's uniform init every unit starts equal and the Lagrangian has to find the whole
structure from the training signal; starting the logits from measured importance gives it the
one-shot structure at step 0 to improve on, and gives the one-shot baseline the same selection.

Per mask type (`mask_set.py`), the unit scores of one row (`unit_scores`):
layer [L] = layer scores; head [L, H] (MHA) = head scores; kv_group [L, K] = the sum of each group's
query-head scores; query_head [L, K, G] = head scores, ranked *within* each KV group; intermediate
[L, F]; hidden [D]. In every row, rank rho(u) = 0 for the highest score (ties: lower index first).

Score init (`score_log_alpha`), for a row of N units of which the target keeps k:

    log_alpha(u) = LOG_ALPHA_MAX - spread * rho(u) / (N - 1) - margin * [rho(u) >= k]

so the kept units lie in [MAX - spread, MAX] (MAX = log 100, where the uniform init sits), the dropped
ones `margin` lower, and the order inside each class follows the scores. The *margin* is the stated
guarantee: the lowest kept logit exceeds the highest dropped one by at least `margin` (default 2.0,
i.e. P(z != 0) of a dropped unit ~0.95 vs ~0.998 kept: training still samples near-full models while
the deterministic mask at step 0 keeps exactly the top-k of every row). Everything stays inside
[LOG_ALPHA_MIN, LOG_ALPHA_MAX]. The Lagrangian training then proceeds as with the uniform init.
"""

from __future__ import annotations

import torch
from torch import nn

from llmshearing.models.masks import StructureMasks
from llmshearing.models.shape import ModelShape
from llmshearing.pruning import hard_concrete as hc
from llmshearing.pruning.mask_set import MaskSpec, compose, mask_specs
from llmshearing.pruning.scores import ImportanceScores

DEFAULT_MARGIN: float = 2.0
DEFAULT_SPREAD: float = 1.0


def unit_scores(source: ModelShape, spec: MaskSpec, scores: ImportanceScores) -> torch.Tensor:
    """The scores of mask type `spec`'s units, in its logits' shape (see the module docstring)."""
    L, K, G = source.n_layers, source.n_kv_heads, source.group_size
    by_name = {
        "layer": lambda: scores.layers,
        "head": lambda: scores.heads,
        "kv_group": lambda: scores.kv_groups(G),
        "query_head": lambda: scores.heads.reshape(L, K, G),
        "intermediate": lambda: scores.intermediate,
        "hidden": lambda: scores.hidden,
    }
    s = by_name[spec.name]()
    if tuple(s.shape) != spec.shape:
        raise ValueError(f"scores for mask '{spec.name}' have shape {tuple(s.shape)}, the mask has {spec.shape}: "
                         "scores of another model?")
    return s.double()


def ranks(s: torch.Tensor) -> torch.Tensor:
    """Rank of every unit in its row (last dim): 0 = highest score, ties to the lower index."""
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    pos = torch.arange(s.shape[-1]).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def score_log_alpha(s: torch.Tensor, n_keep: int, margin: float = DEFAULT_MARGIN,
                    spread: float = DEFAULT_SPREAD) -> torch.Tensor:
    """fp32 logits of one mask type from its unit scores `s` (rows x N), `n_keep` kept per row."""
    n = s.shape[-1]
    if margin <= 0 or spread < 0:
        raise ValueError(f"score init needs margin > 0 and spread >= 0, got margin={margin}, spread={spread}")
    if hc.LOG_ALPHA_MAX - spread - margin < hc.LOG_ALPHA_MIN:
        raise ValueError(f"margin + spread = {margin + spread} exceeds the logits' range "
                         f"[{hc.LOG_ALPHA_MIN:.3f}, {hc.LOG_ALPHA_MAX:.3f}]")
    r = ranks(s).double()
    la = hc.LOG_ALPHA_MAX - spread * r / max(n - 1, 1) - margin * (r >= n_keep).double()
    return la.float()


def top_k_keep(source: ModelShape, spec: MaskSpec, scores: ImportanceScores) -> torch.Tensor:
    """Boolean [spec.shape]: the `n_keep` highest-scoring units of every row."""
    return ranks(unit_scores(source, spec, scores)) < spec.n_keep


def _set_full_(p: nn.Parameter, full: torch.Tensor) -> None:
    """Write a whole tensor into a parameter: a plain one, or this rank's shard of an FSDP2 DTensor
    (every rank passes the same whole tensor; no communication)."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import (
            compute_local_shape_and_global_offset,
        )

        shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
        local = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        p.to_local().copy_(local.to(p.to_local().device))
    else:
        p.copy_(full.to(p.device))


@torch.no_grad()
def init_from_scores_(l0, scores: ImportanceScores, margin: float = DEFAULT_MARGIN,
                      spread: float = DEFAULT_SPREAD) -> dict[str, torch.Tensor]:
    """Set every log_alpha of an L0Module (plain or FSDP2-sharded) from `scores`; the multipliers stay 0.
    Returns the whole logits written, by mask type."""
    out = {}
    for name, spec in l0.specs.items():
        la = score_log_alpha(unit_scores(l0.source, spec, scores), spec.n_keep, margin, spread)
        _set_full_(l0.log_alpha(name), la)
        out[name] = la
    return out


def oneshot_masks(source: ModelShape, target: ModelShape, modules, scores: ImportanceScores) -> StructureMasks:
    """Hard 0/1 masks keeping the top-scoring units at the target counts (the one-shot cut: no values
    other than 0 and 1 are folded into the weights)."""
    specs = mask_specs(source, target, list(modules))
    return compose(source, {n: top_k_keep(source, s, scores).float() for n, s in specs.items()})
