"""The mask set: which hard-concrete mask types prune a source shape to a target, and how their
samples compose into the `StructureMasks` the model applies.

Mask types (L layers, H query heads, K KV groups of G query heads, F channels, D hidden):

| type         | logits    | kept per row (target)  | created when ('module' enabled and)   |
|--------------|-----------|------------------------|----------------------------------------|
| layer        | [L]       | n_layers_T             | 'layer',  n_layers_T < L               |
| head (MHA)   | [L, H]    | n_heads_T per layer    | 'head',   H_T < H, source is MHA       |
| kv_group     | [L, K]    | K_T per layer          | 'head',   K_T < K, source is GQA       |
| query_head   | [L, K, G] | G_T per KV group       | 'head',   G_T < G, source is GQA       |
| intermediate | [L, F]    | F_T per layer          | 'intermediate', F_T < F                |
| hidden       | [D]       | d_model_T              | 'hidden', D_T < D                      |

Under GQA the per-query-head mask handed to the model is z[l, k*G + g] = z_kv[l, k] * z_q[l, k, g]
(query head h uses KV group h // G, the convention of SDPA's enable_gqa / HF repeat_kv). The
deterministic masks keep exactly K_T groups per layer and G_T heads in every group, so the cut model
is a valid GQA shape. MHA is the special case G = 1, expressed as one [L, H] 'head' mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llmshearing.models.masks import StructureMasks
from llmshearing.models.shape import ModelShape, ShapeError
from llmshearing.pruning.target import validate_target

DEFAULT_MODULES: tuple[str, ...] = ("layer", "head", "intermediate", "hidden")
MASK_TYPES: tuple[str, ...] = ("layer", "head", "kv_group", "query_head", "intermediate", "hidden")


@dataclass(frozen=True)
class MaskSpec:
    """One mask type: logits shape, units kept per row in the target, and its pruning module."""

    name: str
    shape: tuple[int, ...]
    n_keep: int
    module: str

    @property
    def row_size(self) -> int:
        return self.shape[-1]

    @property
    def final_target_sparsity(self) -> float:
        return 1.0 - self.n_keep / self.row_size


def mask_specs(source: ModelShape, target: ModelShape, modules: Iterable[str]) -> dict[str, MaskSpec]:
    """The mask types needed to prune `source` to `target` (validated first)."""
    modules = list(modules)
    validate_target(source, target, modules)
    L, H, K, G = source.n_layers, source.n_heads, source.n_kv_heads, source.group_size
    specs: list[MaskSpec] = []
    if "layer" in modules and target.n_layers < L:
        specs.append(MaskSpec("layer", (L,), target.n_layers, "layer"))
    if "head" in modules:
        if K == H:  # MHA: one mask per head
            if target.n_heads < H:
                specs.append(MaskSpec("head", (L, H), target.n_heads, "head"))
        else:
            if target.n_kv_heads < K:
                specs.append(MaskSpec("kv_group", (L, K), target.n_kv_heads, "head"))
            if target.group_size < G:
                specs.append(MaskSpec("query_head", (L, K, G), target.group_size, "head"))
    if "intermediate" in modules and target.intermediate_size < source.intermediate_size:
        specs.append(MaskSpec("intermediate", (L, source.intermediate_size), target.intermediate_size,
                              "intermediate"))
    if "hidden" in modules and target.d_model < source.d_model:
        specs.append(MaskSpec("hidden", (source.d_model,), target.d_model, "hidden"))
    if not specs:
        raise ShapeError(f"target equals the source in every enabled dimension (modules {modules}); nothing to prune")
    return {s.name: s for s in specs}


def compose(source: ModelShape, zs: dict[str, torch.Tensor]) -> StructureMasks:
    """Per-type mask values -> the masks the model applies (under GQA, head h = kv group h // G x its query head)."""
    s = source
    heads = zs.get("head")
    z_kv, z_q = zs.get("kv_group"), zs.get("query_head")
    if z_kv is not None and z_q is not None:
        heads = (z_kv.unsqueeze(-1) * z_q).reshape(s.n_layers, s.n_heads)
    elif z_kv is not None:
        heads = z_kv.repeat_interleave(s.group_size, dim=-1)
    elif z_q is not None:
        heads = z_q.reshape(s.n_layers, s.n_heads)
    return StructureMasks(layer=zs.get("layer"), heads=heads, intermediate=zs.get("intermediate"),
                          hidden=zs.get("hidden"))
