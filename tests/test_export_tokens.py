"""The export's special-token ids are the tokenizer's (issue 27, part 4).

A model made from `model.init` has no ids of its own; the export must not fall back on transformers'
Llama defaults (bos 1 / eos 2) when the tokenizer beside it says `<s>` = 0, `</s>` = 1. Checked the way
a user meets it: transformers' own `generate()` on the exported directory stops at the tokenizer's EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from _hf_helpers import hf_model

from llmshearing.convert.hf import convert_composer_to_hf, convert_hf_to_llmshearing, export_to_hf
from llmshearing.data.tokenizer import train_tokenizer
from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM
from llmshearing.models.shape import ModelShape

TEXTS = ["def f(x):\n    return x + 1\n", "The licensee shall not sublicense the software.",
         "It was a bright cold day in April, and the clocks were striking thirteen."] * 20


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Path:
    """The demo's kind of tokenizer: byte-level BPE, `<s>` = 0, `</s>` = 1, no pad."""
    return train_tokenizer(TEXTS, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


@torch.no_grad()
def _chain_model(chain: list[int]) -> LlamaForCausalLM:
    """A model.init-style model (no extra_hf ids) whose greedy continuation of chain[i] is chain[i+1]:
    attention and MLP outputs are zeroed so the last hidden state is norm(embedding of the last token),
    and each head row of chain[i+1] is that hidden state of chain[i], scaled to dominate."""
    cfg = ModelConfig(shape=ModelShape(d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, n_layers=2,
                                       intermediate_size=96, vocab_size=300), max_position_embeddings=64)
    assert cfg.extra_hf == {}
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    for layer in m.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    m.lm_head.weight.normal_(0, 0.02)
    for a, b in zip(chain, chain[1:]):
        h = m.model.norm(m.model.embed_tokens.weight[a])
        m.lm_head.weight[b] = 50 * h / h.norm()
    return m


def test_generate_on_export_stops_at_the_tokenizers_eos(demo_tokenizer: Path, tmp_path: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(demo_tokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, None)
    # 1 (EOS) is followed by more tokens: a generate() that ignores it runs on to max_new_tokens
    chain = [40, 41, 42, 1, 43, 44, 45, 46, 47, 48, 49, 50]
    m = _chain_model(chain)
    out = tmp_path / "hf"
    export_to_hf(m.state_dict(), m.config, out, tokenizer_dir=demo_tokenizer)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1) and cfg.get("pad_token_id") is None
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)

    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[40]])
    with torch.no_grad():
        seq = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=1)[0].tolist()
    assert seq == [40, 41, 42, 1], seq  # stopped right after the tokenizer's EOS


def _special_tokenizer(d: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose special tokens sit at 3 (<s>), 4 (</s>), 5 (<pad>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "a": 1, "b": 2, "<s>": 3, "</s>": 4, "<pad>": 5,
             **{f"w{i}": i for i in range(6, vocab_size)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>", pad_token="<pad>").save_pretrained(d)


def test_ids_agree_for_an_export_from_a_hf_source(tmp_path: Path) -> None:
    """HF source (ids 3/4/5 in its config, a generation config with two stop ids and a temperature)
    -> ours -> HF with its tokenizer: config, generation config and tokenizer agree with the source."""
    hf = hf_model("llama", bos_token_id=3, eos_token_id=4, pad_token_id=5)
    hf.save_pretrained(tmp_path / "src")
    _special_tokenizer(tmp_path / "src", hf.config.vocab_size)
    transformers.GenerationConfig(bos_token_id=3, eos_token_id=[4, 7], pad_token_id=5, temperature=0.7,
                                  do_sample=True).save_pretrained(tmp_path / "src")
    convert_hf_to_llmshearing(tmp_path / "src", tmp_path / "ours")
    convert_composer_to_hf(tmp_path / "ours", tmp_path / "back", tokenizer_dir=tmp_path / "src")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (3, 4, 5)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (3, 4, 5)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (3, [4, 7], 5)
    assert gen.temperature == 0.7 and gen.do_sample


def test_tokenizer_that_does_not_fit_the_model_is_refused(demo_tokenizer: Path, tmp_path: Path) -> None:
    """Special ids beyond the model's vocabulary: refused before anything is written."""
    cfg = ModelConfig(shape=ModelShape(d_model=32, n_heads=2, n_kv_heads=2, head_dim=16, n_layers=1,
                                       intermediate_size=48, vocab_size=300))
    tok = tmp_path / "tok"
    _special_tokenizer(tok, 300)
    small = ModelConfig(shape=cfg.shape.replace(vocab_size=4))
    m = LlamaForCausalLM(small)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        export_to_hf(m.state_dict(), small, tmp_path / "out", tokenizer_dir=tok)
    assert not (tmp_path / "out").exists()
