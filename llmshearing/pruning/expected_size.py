"""Expected size of the masked model: the differentiable parameter count the Lagrangian's overall
sparsity is read from, and the per-row sparsities the penalty constrains."""

from __future__ import annotations

import torch

from llmshearing.models.shape import ModelShape
from llmshearing.pruning.mask_set import MaskSpec


def expected_params(source: ModelShape, probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expected remaining prunable parameters (0-d float64 tensor).

    Every weight entry survives with the product of the probabilities of the units owning
    its row and column, so per layer l (E_D = sum of hidden probabilities, or D):
        p_layer[l] * [ sum_k p_kv[l,k] * (kv_group_params(E_D) + sum_g p_q[l,k,g] * q_head_params(E_D))
                       + sum_f p_int[l,f] * channel_params(E_D) ]
    Per-unit counts are linear in d, so plugging E_D in is exact. A group's K/V rows count with
    p_kv only (in the relaxation they still compute when all its query heads are off; the
    target masks never leave a kept group empty). float64 so 0/1 probabilities reproduce
    `target.n_prunable_params()` exactly even for 7B-scale counts.
    """
    p = {k: v.double() for k, v in probs.items()}
    s = source
    L, K, G = s.n_layers, s.n_kv_heads, s.group_size
    dev = next(iter(p.values())).device
    f64 = dict(dtype=torch.float64, device=dev)
    ed = p["hidden"].sum() if "hidden" in p else torch.tensor(float(s.d_model), **f64)
    if "head" in p:  # MHA: a head is its own KV group
        attn = p["head"].sum(-1) * (s.params_per_kv_group(ed) + s.params_per_q_head(ed))
    else:
        q_per_group = p["query_head"].sum(-1) if "query_head" in p else torch.full((L, K), float(G), **f64)
        kv = p["kv_group"] if "kv_group" in p else torch.ones((L, K), **f64)
        attn = (kv * (s.params_per_kv_group(ed) + q_per_group * s.params_per_q_head(ed))).sum(-1)
    if "intermediate" in p:
        channels = p["intermediate"].sum(-1)
    else:
        channels = torch.full((L,), float(s.intermediate_size), **f64)
    mlp = channels * s.params_per_channel(ed)
    layer = p["layer"] if "layer" in p else torch.ones((L,), **f64)
    return (layer * (attn + mlp)).sum()


def expected_sparsity_per_row(specs: dict[str, MaskSpec], probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per mask type, 1 - mean P(z != 0) over the units of each row: a [rows] tensor (rows = all
    but the last logits dimension; one row for layer and hidden). What the Lagrangian needs."""
    return {n: 1 - v.reshape(-1, specs[n].row_size).mean(-1) for n, v in probs.items()}
