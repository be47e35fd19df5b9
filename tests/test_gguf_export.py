"""GGUF writing (issue 27, part 2): `llmshearing convert composer-to-gguf`, through llama.cpp's `gguf` package.

Checked by an independent reader, transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`,
which undoes llama.cpp's q/k permutation itself): its logits equal ours computed with the weights rounded
to the file's type (fp32 compute, 1e-4 absolute), its tokenizer encodes as ours does; and by our own reader
(`convert hf-to-composer model.gguf`), which must give back every tensor bit for bit (rounded to the file's
type; norms stay f32 as llama.cpp writes them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from _hf_helpers import hf_model, max_abs_diff, ours_from_hf, tokens

from llmshearing.cli import main
from llmshearing.convert.checkpoint import load_model_dir
from llmshearing.convert.gguf import convert_gguf_to_llmshearing
from llmshearing.convert.gguf_export import write_gguf
from llmshearing.data.tokenizer import train_tokenizer
from llmshearing.models.llama import LlamaForCausalLM

ATOL = 1e-4  # fp32 logits
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TEXT = "def f(x):\n    return x + 1  # The licensee shall not sublicense. It was a bright cold day."


def _rounded(sd: dict, dtype: str) -> dict:
    """The weights as the file stores them: matrices in `dtype`, 1-D tensors f32."""
    return {k: v.to(TORCH[dtype]).float() if v.dim() > 1 else v.float() for k, v in sd.items()}


def _gguf_hf(f: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exported(sheared, tmp_path_factory):
    """The sheared fixture's continued-pretraining checkpoint, written in each dtype by the CLI."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for dt in TORCH:
        files[dt] = out / f"tiny-{dt}.gguf"
        assert main(["convert", "composer-to-gguf", str(sheared.cpt_ckpt), str(files[dt]),
                     "--tokenizer", str(sheared.tok), "--dtype", dt]) == 0
    return files


@pytest.mark.parametrize("dtype", list(TORCH))
def test_transformers_reads_our_gguf_with_our_logits(sheared, exported, dtype):
    cfg, sd = load_model_dir(sheared.cut)  # for the config; the weights are the exported model's
    hf_sd = transformers.AutoModelForCausalLM.from_pretrained(sheared.hf, dtype=torch.float32).state_dict()
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(_rounded({k: hf_sd[k] for k in ours.state_dict()}, dtype))
    g = _gguf_hf(exported[dtype])
    x = tokens(cfg.shape.vocab_size, seq=32)
    with torch.no_grad():
        assert max_abs_diff(g(x).logits, ours(x)) < ATOL  # fp32 compute on the file's weights


def test_gguf_tokenizer_and_special_ids(sheared, exported):
    import gguf

    f = exported["f16"]
    ref = transformers.AutoTokenizer.from_pretrained(sheared.tok)
    tok = transformers.AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    assert tok(TEXT)["input_ids"] == ref(TEXT)["input_ids"]  # BOS + the same byte-level BPE pieces
    fields = gguf.GGUFReader(str(f)).fields
    ids = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]) for k in ("bos", "eos")}
    assert ids == {"bos": ref.bos_token_id, "eos": ref.eos_token_id} == {"bos": 0, "eos": 1}
    assert len(fields["tokenizer.ggml.tokens"].data) == 1024  # padded to the model's vocabulary


@pytest.mark.parametrize("dtype", list(TORCH))
def test_our_reader_round_trip_is_bit_exact(sheared, exported, dtype, tmp_path):
    convert_gguf_to_llmshearing(exported[dtype], tmp_path / "back")
    cfg, back = load_model_dir(tmp_path / "back")
    want = _rounded(transformers.AutoModelForCausalLM.from_pretrained(sheared.hf, dtype=torch.float32).state_dict(),
                    dtype)
    assert cfg.shape == load_model_dir(sheared.cut)[0].shape
    assert sorted(back) == sorted(k for k in want if not k.endswith("inv_freq"))
    for k in back:
        assert torch.equal(back[k], want[k]), k
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back").eos_token_id == 1


@pytest.fixture(scope="module")
def tok300(tmp_path_factory) -> Path:
    texts = [TEXT, "licensee warranty software permission granted copyright notice"] * 30
    return train_tokenizer(texts, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok300"))


CASES = {  # shapes the sheared model does not have: GQA, head_dim != d/heads, tied, qwen2 biases, mistral
    "llama-gqa-headdim24-tied": ("llama", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen2-gqa-bias": ("qwen2", dict(num_key_value_heads=2)),
    "mistral-nowindow": ("mistral", dict(num_key_value_heads=1, sliding_window=None)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_other_shapes(name, tok300, tmp_path):
    family, kw = CASES[name]
    hf = hf_model(family, vocab_size=300, **kw)
    ours = ours_from_hf(hf)
    f = write_gguf(ours.state_dict(), ours.config, tmp_path / "m.gguf", tokenizer_dir=tok300, dtype="f32")
    x = tokens(300)
    if name != "llama-linear-rope":  # transformers 4.x ignores llama.cpp's rope-scaling keys (our reader reads them)
        with torch.no_grad():
            assert max_abs_diff(_gguf_hf(f)(x).logits, hf(x).logits) < ATOL
    cfg = convert_gguf_to_llmshearing(f, tmp_path / "back")
    assert cfg.shape == ours.config.shape and cfg.rope_scaling == ours.config.rope_scaling
    _, back = load_model_dir(tmp_path / "back")
    sd = ours.state_dict()  # load_model_dir gives a tied head back as the embedding
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_unsupported_are_refused(tok300, tmp_path):
    for family, kw, match in (("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16}), "rope_scaling"),
                              ("mistral", dict(sliding_window=64), "sliding window")):
        ours = ours_from_hf(hf_model(family, vocab_size=300, **kw))
        with pytest.raises(ValueError, match=match):
            write_gguf(ours.state_dict(), ours.config, tmp_path / "x.gguf", tokenizer_dir=tok300)
    assert main(["convert", "composer-to-gguf", str(tmp_path / "missing"), str(tmp_path / "y.gguf")]) == 2
