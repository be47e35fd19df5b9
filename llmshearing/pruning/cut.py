"""Cut: a masked model + deterministic masks -> a dense model of the smaller shape.

Fold every kept mask value into the weights it multiplies, then slice away zeroed units, so the
dense model computes exactly what the masked model computes in eval mode:

- hidden z [D]: embeddings columns (E*z)[:, keep]; every RMSNorm weight (w*z)[keep]; o_proj and
  down_proj output rows (W*z)[keep]; q/k/v/gate/up input columns [:, keep]; lm_head columns
  [:, keep] *without* z (z already reached it through the final norm; the reference applied it
  twice). RMSNorm under the mask normalises over kept dims only, so it equals the d'-dim norm.
- head z (per query head): o_proj input columns of the head, times the layer's attention gate;
  heads with z == 0 removed (q rows and bias, o columns); KV groups left with no query head
  removed (k/v rows and biases). Every kept group must keep the same number of query heads and
  every kept layer the same numbers of heads / groups, else ValueError (no valid dense shape).
- intermediate z: down_proj columns times the MLP gate; channels with z == 0 removed.
- layers whose attention and MLP gates are both 0 are dropped and the rest renumbered.

Tied embeddings: embedding and lm_head stay one tensor only if the kept hidden values are all 1.
Otherwise the embedding carries z and the lm_head does not, so the cut model is untied (its
ModelShape has tie_embeddings=False) and a warning is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from llmshearing.convert.checkpoint import model_from_state_dict
from llmshearing.models.llama import LlamaForCausalLM
from llmshearing.models.masks import StructureMasks
from llmshearing.models.shape import ModelShape

log = logging.getLogger(__name__)


@dataclass
class CutPlan:
    """Which units survive (indices into the source model) and the resulting shape."""

    kept_layers: list[int]
    kept_heads: list[torch.Tensor]  # per kept layer: query-head indices (ascending)
    kept_groups: list[torch.Tensor]  # per kept layer: KV-group indices (ascending)
    kept_channels: list[torch.Tensor]  # per kept layer: intermediate channel indices
    kept_hidden: torch.Tensor  # hidden dim indices
    untie: bool
    shape: ModelShape


def _gate(masks: StructureMasks, i: int, which: str) -> float:
    g = masks.attn_gate(i) if which == "attn" else masks.mlp_gate(i)
    return 1.0 if g is None else float(g)


def plan_cut(shape: ModelShape, masks: StructureMasks) -> CutPlan:
    """Validate the masks against `shape` and decide which units survive."""
    masks = masks.detach().to("cpu", torch.float32)
    masks.validate(shape.n_layers, shape.n_heads, shape.intermediate_size, shape.d_model)
    K, G = shape.n_kv_heads, shape.group_size

    kept_layers = [i for i in range(shape.n_layers)
                   if _gate(masks, i, "attn") != 0 or _gate(masks, i, "mlp") != 0]
    if not kept_layers:
        raise ValueError("every layer's gate is 0: the cut model would have no layers")

    kept_heads, kept_groups, kept_channels = [], [], []
    for i in kept_layers:
        if masks.heads is None:
            on = torch.ones(K, G, dtype=torch.bool)
        else:
            on = (masks.heads[i] != 0).view(K, G)
        per_group = on.sum(-1)
        groups = torch.nonzero(per_group > 0).flatten()
        counts = per_group[groups].unique()
        if len(groups) == 0:
            raise ValueError(f"layer {i} is kept but all its heads are masked; a dense layer needs >= 1 head "
                             "(drop the layer with its layer mask instead)")
        if len(counts) > 1:
            raise ValueError(
                f"layer {i} keeps {per_group[groups].tolist()} query heads in its KV groups {groups.tolist()}; "
                "a GQA model needs the same number in every kept group (use deterministic masks with the "
                "exact target, i.e. eval_target_model=True)")
        kept_groups.append(groups)
        kept_heads.append(torch.nonzero(on.flatten()).flatten())
        if masks.intermediate is None:
            kept_channels.append(torch.arange(shape.intermediate_size))
        else:
            kept_channels.append(torch.nonzero(masks.intermediate[i] != 0).flatten())

    def uniform(name: str, per_layer: list[int]) -> int:
        if len(set(per_layer)) != 1:
            raise ValueError(f"kept layers {kept_layers} keep different numbers of {name} {per_layer}; a dense "
                             "model needs the same number in every layer (use the exact-target masks)")
        if per_layer[0] == 0:
            raise ValueError(f"the cut model would have 0 {name} per layer")
        return per_layer[0]

    n_heads = uniform("query heads", [len(h) for h in kept_heads])
    n_kv = uniform("KV groups", [len(g) for g in kept_groups])
    n_ch = uniform("MLP channels", [len(c) for c in kept_channels])

    if masks.hidden is None:
        kept_hidden = torch.arange(shape.d_model)
        untie = False
    else:
        kept_hidden = torch.nonzero(masks.hidden != 0).flatten()
        if len(kept_hidden) == 0:
            raise ValueError("every hidden dim is masked: the cut model would have d_model 0")
        untie = shape.tie_embeddings and not bool((masks.hidden[kept_hidden] == 1).all())
    new_shape = shape.replace(d_model=len(kept_hidden), n_heads=n_heads, n_kv_heads=n_kv, n_layers=len(kept_layers),
                              intermediate_size=n_ch, tie_embeddings=shape.tie_embeddings and not untie)
    return CutPlan(kept_layers, kept_heads, kept_groups, kept_channels, kept_hidden, untie, new_shape)


def _rows(w: torch.Tensor, units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Rows of the given units, where unit u owns rows [u*unit_size, (u+1)*unit_size)."""
    return w.reshape(-1, unit_size, *w.shape[1:])[units].reshape(-1, *w.shape[1:])


@torch.no_grad()
def cut_model(model: LlamaForCausalLM, masks: StructureMasks) -> LlamaForCausalLM:
    """A new dense LlamaForCausalLM of the cut shape, equal to `model(ids, masks)` in eval mode."""
    src = model.config.shape
    plan = plan_cut(src, masks)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    dtype = sd["model.embed_tokens.weight"].dtype
    # fold in fp32 (fp64 for an fp64 model, so that masked == cut holds to fp64 precision there)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    m = masks.detach().to("cpu", work)
    hd = src.head_dim
    keep_d = plan.kept_hidden
    hz = m.hidden if m.hidden is not None else torch.ones(src.d_model, dtype=work)

    def w(k: str) -> torch.Tensor:
        return sd[k].to(work)

    out: dict[str, torch.Tensor] = {}
    emb = w("model.embed_tokens.weight")
    out["model.embed_tokens.weight"] = (emb * hz)[:, keep_d]
    out["model.norm.weight"] = (w("model.norm.weight") * hz)[keep_d]
    out["lm_head.weight"] = w("lm_head.weight")[:, keep_d]
    if plan.untie:
        log.warning("hidden mask values are not all 1: the embedding carries them and lm_head does not, so "
                    "the cut model has untied embeddings (tie_embeddings=False)")

    for j, i in enumerate(plan.kept_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{j}."
        heads, groups, chans = plan.kept_heads[j], plan.kept_groups[j], plan.kept_channels[j]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[q + norm + ".weight"] = (w(p + norm + ".weight") * hz)[keep_d]
        # attention
        out[q + "self_attn.q_proj.weight"] = _rows(w(p + "self_attn.q_proj.weight"), heads, hd)[:, keep_d]
        for kv in ("k_proj", "v_proj"):
            out[q + f"self_attn.{kv}.weight"] = _rows(w(p + f"self_attn.{kv}.weight"), groups, hd)[:, keep_d]
        if src.qkv_bias:
            out[q + "self_attn.q_proj.bias"] = _rows(w(p + "self_attn.q_proj.bias"), heads, hd)
            for kv in ("k_proj", "v_proj"):
                out[q + f"self_attn.{kv}.bias"] = _rows(w(p + f"self_attn.{kv}.bias"), groups, hd)
        head_z = m.heads[i] if m.heads is not None else torch.ones(src.n_heads, dtype=work)
        col_scale = head_z.repeat_interleave(hd) * _gate(m, i, "attn")  # [H*hd]
        o = w(p + "self_attn.o_proj.weight") * col_scale[None, :] * hz[:, None]  # [D, H*hd]
        out[q + "self_attn.o_proj.weight"] = _rows(o.t(), heads, hd).t()[keep_d]
        # MLP
        for proj in ("gate_proj", "up_proj"):
            out[q + f"mlp.{proj}.weight"] = w(p + f"mlp.{proj}.weight")[chans][:, keep_d]
        int_z = m.intermediate[i] if m.intermediate is not None else torch.ones(src.intermediate_size, dtype=work)
        down = w(p + "mlp.down_proj.weight") * (int_z * _gate(m, i, "mlp"))[None, :] * hz[:, None]
        out[q + "mlp.down_proj.weight"] = down[keep_d][:, chans]

    new_sd = {k: v.to(dtype).contiguous() for k, v in out.items()}
    del out
    if plan.shape.tie_embeddings:
        new_sd["lm_head.weight"] = new_sd["model.embed_tokens.weight"]
    # takes over the tensors (no second, randomly initialised copy of the cut model)
    return model_from_state_dict(model.config.with_shape(plan.shape), new_sd, source="the cut model")


def cut_report(shape: ModelShape, masks: StructureMasks) -> dict[str, Any]:
    """What the cut keeps: source indices of layers, per-layer counts, hidden count, final size."""
    plan = plan_cut(shape, masks)
    return {
        "kept_layers": plan.kept_layers,
        "heads_per_layer": plan.shape.n_heads,
        "kv_heads_per_layer": plan.shape.n_kv_heads,
        "kept_heads": {i: h.tolist() for i, h in zip(plan.kept_layers, plan.kept_heads)},
        "channels_per_layer": plan.shape.intermediate_size,
        "hidden": plan.shape.d_model,
        "untied_embeddings": plan.untie,
        "shape": plan.shape.to_dict(),
        "n_params": plan.shape.n_params(),
        "source_n_params": shape.n_params(),
    }
