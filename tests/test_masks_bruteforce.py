"""StructureMasks semantics checked against independent brute force (issue #2, item 4).

The masked forward of our model is compared with a *transformers* model (a different
implementation) whose weights encode the same structure directly:
    head h of layer l at value z     -> o_proj input columns of that head scaled by z
    MLP channel c of layer l at z    -> down_proj column c scaled by z
    attention block of layer l at z  -> o_proj scaled by z      (attn_layer)
    MLP block of layer l at z        -> down_proj scaled by z   (mlp_layer)
    whole layer l at z               -> o_proj and down_proj scaled by z (layer)
    hidden dims dropped              -> a genuinely smaller model with those dims sliced out of every
                                        weight (RMSNorm then averages over the kept dims only)
Cases cover MHA, GQA and Qwen2 biases.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from _hf_helpers import clone_hf, hf_case, max_abs_diff, ours_from_hf, tokens

from llmshearing.models.masks import StructureMasks

MODELS = ["llama-mha-untied", "llama-gqa-tied-llama3rope", "qwen2-gqa-bias"]
EXACT = 1e-5  # same dims, weights scaled instead of activations: only float reassociation differs
ATOL = 1e-4  # the hidden-dim cut model runs with different matrix sizes (different reductions)


def _ones(hf: transformers.PreTrainedModel) -> StructureMasks:
    c = hf.config
    L, H, F, D = c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_size
    return StructureMasks(layer=torch.ones(L), attn_layer=torch.ones(L), mlp_layer=torch.ones(L),
                          heads=torch.ones(L, H), intermediate=torch.ones(L, F), hidden=torch.ones(D))


def _head_dim(hf: transformers.PreTrainedModel) -> int:
    return hf.model.layers[0].self_attn.head_dim


@torch.no_grad()
def _scale_head(hf, layer: int, head: int, z: float) -> None:
    hd = _head_dim(hf)
    hf.model.layers[layer].self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] *= z


@torch.no_grad()
def _scale_channel(hf, layer: int, channel: int, z: float) -> None:
    hf.model.layers[layer].mlp.down_proj.weight[:, channel] *= z


@torch.no_grad()
def _scale_attn(hf, layer: int, z: float) -> None:
    hf.model.layers[layer].self_attn.o_proj.weight *= z


@torch.no_grad()
def _scale_mlp(hf, layer: int, z: float) -> None:
    hf.model.layers[layer].mlp.down_proj.weight *= z


def _slice_hidden(hf: transformers.PreTrainedModel, drop: list[int]) -> transformers.PreTrainedModel:
    """A smaller HF model: the original weights with hidden dims `drop` removed everywhere."""
    d = hf.config.hidden_size
    keep = torch.tensor([i for i in range(d) if i not in drop])
    cfg = copy.deepcopy(hf.config)
    cfg.head_dim = _head_dim(hf)  # stays: d' / heads is not the head size any more
    cfg.hidden_size = len(keep)
    small = type(hf)(cfg).eval()
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                       "gate_proj.weight", "up_proj.weight")):
            v = v[:, keep]  # input (or embedding) columns
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            v = v[keep, :]  # output rows
        elif k.endswith("norm.weight"):
            v = v[keep]
        else:
            assert k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")), k  # head-space: unchanged
        sd[k] = v.clone()
    small.load_state_dict(sd, strict=True)
    return small


def _run(hf_ref, ours, masks: StructureMasks) -> tuple[torch.Tensor, torch.Tensor]:
    x = tokens(ours.config.shape.vocab_size)
    with torch.no_grad():
        return hf_ref(x).logits, ours(x, masks)


@pytest.mark.parametrize("name", MODELS)
def test_all_ones_masks_change_nothing(name: str) -> None:
    hf = hf_case(name)
    ours = ours_from_hf(hf)
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        plain, masked = ours(x), ours(x, _ones(hf))
        assert torch.equal(ours(x, StructureMasks()), plain)  # empty masks: the plain path
    assert max_abs_diff(plain, masked) < 1e-6  # tolerance: 1e-6 absolute (RMSNorm sum/count vs mean)


# (mask field, value, brute-force edit) per case; layer 1 / head 1 / channel 5 are arbitrary picks.
UNIT_CASES = {
    "head": ("heads", 0.0), "head-half": ("heads", 0.5),
    "channel": ("intermediate", 0.0), "channel-half": ("intermediate", 0.5),
    "attn_layer": ("attn_layer", 0.0), "mlp_layer": ("mlp_layer", 0.0),
    "layer": ("layer", 0.0), "layer-half": ("layer", 0.5),
}


@pytest.mark.parametrize("case", sorted(UNIT_CASES))
@pytest.mark.parametrize("name", MODELS)
def test_unit_mask_equals_weight_edit(name: str, case: str) -> None:
    hf = hf_case(name)
    ours = ours_from_hf(hf)
    brute = clone_hf(hf)
    field, z = UNIT_CASES[case]
    masks = _ones(hf)
    layer = 1
    if field == "heads":
        masks.heads[layer, 1] = z
        _scale_head(brute, layer, 1, z)
    elif field == "intermediate":
        masks.intermediate[layer, 5] = z
        _scale_channel(brute, layer, 5, z)
    elif field == "attn_layer":
        masks.attn_layer[layer] = z
        _scale_attn(brute, layer, z)
    elif field == "mlp_layer":
        masks.mlp_layer[layer] = z
        _scale_mlp(brute, layer, z)
    else:
        masks.layer[layer] = z
        _scale_attn(brute, layer, z)
        _scale_mlp(brute, layer, z)
    want, got = _run(brute, ours, masks)
    with torch.no_grad():
        assert max_abs_diff(want, hf(tokens(hf.config.vocab_size)).logits) > 1e-3  # the edit matters
    assert max_abs_diff(want, got) < EXACT, (name, case)  # tolerance: 1e-5 absolute, fp32


@pytest.mark.parametrize("name", MODELS)
def test_gqa_whole_kv_group_zero(name: str) -> None:
    """All query heads of one KV group zeroed (what the deterministic masks do to a removed group)."""
    hf = hf_case(name)
    ours, brute = ours_from_hf(hf), clone_hf(hf)
    group = hf.config.num_attention_heads // hf.config.num_key_value_heads
    masks = _ones(hf)
    for h in range(group):  # group 0
        masks.heads[0, h] = 0.0
        _scale_head(brute, 0, h, 0.0)
    want, got = _run(brute, ours, masks)
    assert max_abs_diff(want, got) < EXACT  # tolerance: 1e-5 absolute, fp32


@pytest.mark.parametrize("name", MODELS)
def test_hidden_mask_equals_smaller_model(name: str) -> None:
    hf = hf_case(name)
    ours = ours_from_hf(hf)
    drop = [3, 17, 40]
    masks = _ones(hf)
    masks.hidden[drop] = 0.0
    want, got = _run(_slice_hidden(hf, drop), ours, masks)
    assert max_abs_diff(want, got) < ATOL, name  # tolerance: 1e-4 absolute, fp32 (different matmul sizes)


@pytest.mark.parametrize("name", MODELS)
def test_combined_masks_equal_cut_and_scaled_model(name: str) -> None:
    """Every mask kind at once, zeros and fractions, against one brute-force model."""
    hf = hf_case(name)
    ours = ours_from_hf(hf)
    drop = [0, 31]
    masks = _ones(hf)
    masks.hidden[drop] = 0.0
    masks.heads[0, 1] = 0.0
    masks.heads[1, 2] = 0.5
    masks.intermediate[1, 5] = 0.0
    masks.intermediate[0, 7] = 0.25
    masks.mlp_layer[0] = 0.5
    masks.attn_layer[1] = 0.75
    masks.layer[1] = 0.5
    brute = _slice_hidden(hf, drop)
    _scale_head(brute, 0, 1, 0.0)
    _scale_head(brute, 1, 2, 0.5)
    _scale_channel(brute, 1, 5, 0.0)
    _scale_channel(brute, 0, 7, 0.25)
    _scale_mlp(brute, 0, 0.5)
    _scale_attn(brute, 1, 0.75 * 0.5)
    _scale_mlp(brute, 1, 0.5)
    want, got = _run(brute, ours, masks)
    assert max_abs_diff(want, got) < ATOL, name  # tolerance: 1e-4 absolute, fp32


def test_partial_masks_match_bruteforce() -> None:
    """Masks with only some fields set (None = unmasked) also match brute force."""
    hf = hf_case("llama-gqa-tied-llama3rope")
    ours, brute = ours_from_hf(hf), clone_hf(hf)
    L = hf.config.num_hidden_layers
    masks = StructureMasks(heads=torch.ones(L, hf.config.num_attention_heads))
    masks.heads[1, 3] = 0.0
    _scale_head(brute, 1, 3, 0.0)
    want, got = _run(brute, ours, masks)
    assert max_abs_diff(want, got) < EXACT  # tolerance: 1e-5 absolute, fp32
