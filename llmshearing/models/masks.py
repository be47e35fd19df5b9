"""StructureMasks: the one representation of structure masks that the model applies.

The model only knows how to *apply* masks (multiply activations); how they are learned lives in
`llmshearing.pruning`. Every field is optional; `None` means "not masked" and costs nothing.

Shapes (L layers, H query heads, F intermediate channels, D hidden):

| field        | shape  | multiplies                                                          |
|--------------|--------|---------------------------------------------------------------------|
| layer        | [L]    | the attention-block output AND the MLP-block output of layer i      |
| attn_layer   | [L]    | the attention-block output of layer i                               |
| mlp_layer    | [L]    | the MLP-block output of layer i                                     |
| heads        | [L, H] | each query head's attention context, before the output projection   |
| intermediate | [L, F] | the MLP activation act(gate(x)) * up(x), per channel                |
| hidden       | [D]    | embeddings, every RMSNorm output, every block output (residual)     |

GQA: head masks are per *query head*. The pruning module composes them as
z_head[l, h] = z_kv_group[l, h // group_size] * z_query[l, h], and its deterministic masks keep
whole KV groups and the same number of query heads in every kept group, so that the cut model
is a valid GQA shape (n_heads divisible by n_kv_heads). A KV group whose query heads are all zero
contributes nothing and is removed by the cut.

Under `hidden`, RMSNorm computes its variance only over the kept dims (z != 0), so the masked
model equals the cut model with a smaller d_model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import torch


@dataclass
class StructureMasks:
    layer: torch.Tensor | None = None
    attn_layer: torch.Tensor | None = None
    mlp_layer: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                yield f.name, v

    def is_empty(self) -> bool:
        return not any(True for _ in self.items())

    def to(self, *args, **kwargs) -> "StructureMasks":
        return StructureMasks(**{k: v.to(*args, **kwargs) for k, v in self.items()})

    def detach(self) -> "StructureMasks":
        return StructureMasks(**{k: v.detach() for k, v in self.items()})

    def attn_gate(self, i: int) -> torch.Tensor | None:
        """Scalar gate of layer i's attention block (layer x attn_layer), or None."""
        return _mul(self.layer[i] if self.layer is not None else None,
                    self.attn_layer[i] if self.attn_layer is not None else None)

    def mlp_gate(self, i: int) -> torch.Tensor | None:
        return _mul(self.layer[i] if self.layer is not None else None,
                    self.mlp_layer[i] if self.mlp_layer is not None else None)

    def for_layer(self, i: int) -> "LayerMasks":
        """Layer i's slice: tensors of the same shapes for every layer, so that one compiled graph serves
        all decoder layers (an integer layer index in the layer's forward would specialise it per layer)."""
        return LayerMasks(attn_gate=self.attn_gate(i), mlp_gate=self.mlp_gate(i),
                          heads=self.heads[i] if self.heads is not None else None,
                          intermediate=self.intermediate[i] if self.intermediate is not None else None,
                          hidden=self.hidden)

    def validate(self, n_layers: int, n_heads: int, intermediate_size: int, d_model: int) -> None:
        want = {
            "layer": (n_layers,), "attn_layer": (n_layers,), "mlp_layer": (n_layers,),
            "heads": (n_layers, n_heads), "intermediate": (n_layers, intermediate_size), "hidden": (d_model,),
        }
        for k, v in self.items():
            if tuple(v.shape) != want[k]:
                raise ValueError(f"mask '{k}' has shape {tuple(v.shape)}, the model expects {want[k]}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.items()}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "StructureMasks":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown mask names {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


@dataclass
class LayerMasks:
    """What one decoder layer applies: scalar gates of its two blocks, [H] heads, [F] channels, [D] hidden."""

    attn_gate: torch.Tensor | None = None
    mlp_gate: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def _mul(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a * b
