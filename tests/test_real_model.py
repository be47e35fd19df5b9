"""Real pretrained weights: SmolLM2-135M-Instruct (Llama architecture, 9 query heads in 3 KV groups,
30 layers, tied embeddings), from its GGUF release (tests/_real_model.py says where it comes from).

Real weights have huge activations (the residual stream of such models reaches 1e3-1e4), so float32
results differ from the exact function by much more than on random test weights. Exactness is
therefore checked in float64 (1e-9), and float32 against the float32 noise floor measured in the
same test: how far float32 is from float64 for the same computation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from _real_model import smollm2_gguf
from safetensors.torch import load_file

from llmshearing.convert.checkpoint import load_model
from llmshearing.convert.gguf import convert_gguf_to_llmshearing
from llmshearing.convert.hf import convert_composer_to_hf, convert_hf_to_llmshearing
from llmshearing.convert.model_source import load_source_model
from llmshearing.demo.corpus import prose_docs
from llmshearing.pruning import hard_concrete as hc
from llmshearing.pruning.cut import cut_model
from llmshearing.pruning.l0 import L0Module

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("real")
    gguf = smollm2_gguf()
    convert_gguf_to_llmshearing(gguf, tmp / "ours")  # what `convert hf-to-composer model.gguf OUT` does
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    hf.save_pretrained(tmp / "hf")  # the same weights as a Hugging Face directory
    tok = transformers.AutoTokenizer.from_pretrained(tmp / "ours")
    # English text found on this machine: the long descriptions of the installed packages
    text = "\n\n".join(d for _, d in zip(range(40), prose_docs()))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: 4 * 256]).view(4, 256)
    return {"tmp": tmp, "hf": hf, "ours_dir": tmp / "ours", "hf_dir": tmp / "hf", "ids": ids}


def test_conversion_round_trip_is_bit_exact(real):
    """GGUF -> ours equals HF dir -> ours; ours -> HF equals the HF dir, and loads with no warnings."""
    tmp = real["tmp"]
    convert_hf_to_llmshearing(real["hf_dir"], tmp / "ours_from_hf")
    a, b = load_file(real["ours_dir"] / "model.safetensors"), load_file(tmp / "ours_from_hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    convert_composer_to_hf(real["ours_dir"], tmp / "back")
    ref, back = load_file(real["hf_dir"] / "model.safetensors"), load_file(tmp / "back" / "model.safetensors")
    assert ref.keys() == back.keys() and all(torch.equal(ref[k], back[k]) for k in ref)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = json.loads((tmp / "back" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 3


def test_logits_match_transformers_within_its_own_fp32_noise(real):
    """Ours vs transformers in fp32, over 1,024 tokens of English text: at most transformers' own
    fp32-vs-fp64 difference (its noise floor; measured ~1.2e-4 here, and ours has been bit-equal)."""
    ids, hf = real["ids"], real["hf"]
    ours = load_model(real["ours_dir"]).eval()
    with torch.no_grad():
        ours32, hf32 = ours(ids), hf(ids).logits
        hf64 = transformers.AutoModelForCausalLM.from_pretrained(real["hf_dir"], dtype=torch.float64).eval()(ids).logits
    floor = float((hf32.double() - hf64).abs().max())
    gap = float((ours32 - hf32).abs().max())
    print(f"ours32 vs hf32 {gap:.2e}; transformers fp32 noise floor {floor:.2e}")
    assert gap <= floor


def test_perplexity_on_english_text_is_sane(real):
    """A sanity bound, not a benchmark: 7.0 measured on package READMEs; a broken conversion (wrong
    q/k permutation, lost tie, wrong norm eps) gives hundreds or more."""
    ids = real["ids"]
    ours = load_source_model(real["hf_dir"]).eval()  # model.path may be the HF dir itself
    with torch.no_grad():
        logits = ours(ids)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    print(f"perplexity {math.exp(float(ce)):.2f}")
    assert math.exp(float(ce)) < 20


def test_masked_equals_cut_in_fp64_and_within_fp32_noise(real):
    """GQA mask set (layers, whole KV groups, query heads per group, MLP channels, hidden) with random
    logits: the cut model equals the masked one to 1e-9 in fp64; in fp32 they differ by no more than
    their two fp32-vs-fp64 errors together (the noise floor of this comparison)."""
    src = load_model(real["ours_dir"], weights=False).config.shape
    tgt = src.replace(d_model=448, n_heads=4, n_kv_heads=2, n_layers=20, intermediate_size=1024)
    l0 = L0Module(src, tgt, ["layer", "head", "intermediate", "hidden"], eval_target_model=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in l0.log_alpha_params():
            p.copy_((torch.randn(p.shape, generator=gen) * 2).clamp(hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX))
    assert l0.mask_types == ["layer", "kv_group", "query_head", "intermediate", "hidden"]
    masks = l0.eval().deterministic_masks(target=True)
    x = real["ids"][:2, :128]
    out = {}
    for dtype in (torch.float32, torch.float64):
        model = load_model(real["ours_dir"], dtype=dtype).eval()
        cut = cut_model(model, masks).eval()
        with torch.no_grad():
            out[dtype] = (model(x, masks.to(dtype)).double(), cut(x).double())
        if dtype == torch.float32:
            assert cut.config.shape == tgt and sum(p.numel() for p in cut.parameters()) == tgt.n_params()
    (m32, c32), (m64, c64) = out[torch.float32], out[torch.float64]
    exact = float((m64 - c64).abs().max())
    gap32 = float((m32 - c32).abs().max())
    floor = float((m32 - m64).abs().max() + (c32 - c64).abs().max())
    print(f"masked vs cut: fp64 {exact:.1e}; fp32 {gap32:.1e} (noise floor {floor:.1e})")
    assert exact < 1e-9
    assert gap32 <= floor
