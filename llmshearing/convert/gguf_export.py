"""Our model (any source the converters read) -> a GGUF file for llama.cpp / Ollama, unquantised (f32, f16,
bf16), with its tokenizer.

Everything format-specific comes from llama.cpp's own Python package (`gguf`): the writer, the
metadata keys, the tensor names (`TensorNameMap`), bf16 packing and the tokenizer readers
(`BpeVocab` / `LlamaHfVocab` / `SentencePieceVocab`, `SpecialVocab` for merges and special ids). What
is ours is the one convention llama.cpp imposes on Llama: q_proj/k_proj rows are stored permuted
(each head's two rotary halves interleaved), the inverse of what transformers' GGUF reader (and so
`convert hf-to-composer model.gguf`) undoes; Qwen2 is stored unpermuted. As in llama.cpp's converter,
1-D tensors (norms, biases) stay f32 whatever the file type.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from llmshearing.convert.special_tokens import tokenizer_special_ids
from llmshearing.models.config import ModelConfig

log = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16", "bf16")


def _arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name; only what it would read as the same model is written."""
    if cfg.family == "qwen2":
        return "qwen2"
    if cfg.family == "mistral" and cfg.sliding_window is not None:
        raise ValueError("a Mistral model with a sliding window has no unquantised llama.cpp equivalent we write; "
                         "export it to Hugging Face instead")
    if cfg.shape.qkv_bias:
        raise ValueError(f"a {cfg.family} model with q/k/v biases cannot be written as GGUF 'llama'")
    return "llama"


def llama_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `LlamaModel.permute`): per head, rows
    [0, 2, 4, ..., 1, 3, 5, ...] of the HF rotate-half layout become interleaved pairs."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensor_data(t: torch.Tensor, dtype: str):
    """(numpy array, raw GGML type or None) of one tensor in the file's dtype (1-D kept f32)."""
    import gguf

    x = t.detach().to(torch.float32).cpu().numpy()
    if x.ndim <= 1 or dtype == "f32":
        return x, None
    if dtype == "f16":
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _add_tokenizer(w, tokenizer_dir: Path, vocab_size: int) -> None:
    """tokens / types / scores from the first of llama.cpp's vocab readers that accepts the tokenizer,
    padded to the model's vocabulary; merges, special ids and add_bos through SpecialVocab."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    vocab = None
    for cls in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
        try:
            vocab = cls(tokenizer_dir)
            break
        except (FileNotFoundError, TypeError, ImportError, KeyError):
            continue
    if vocab is None:
        raise ValueError(f"{tokenizer_dir}: llama.cpp's tokenizer readers accept none of these files "
                         "(byte-level BPE tokenizer.json, Llama HF tokenizer.json, or tokenizer.model)")
    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text if isinstance(text, bytes) else str(text).encode())
        scores.append(score)
        types.append(typ)
    if len(tokens) > vocab_size:
        raise ValueError(f"{tokenizer_dir}: {len(tokens)} tokens, more than the model's vocabulary ({vocab_size})")
    special = _special_token_ids(tokenizer_dir)
    types = [gguf.TokenType.CONTROL if i in special else t for i, t in enumerate(types)]
    for i in range(len(tokens), vocab_size):  # llama.cpp's converter pads the same way
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    sv = gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    # the ids the Hugging Face export writes (the tokenizer's, special_tokens.py) win over SpecialVocab's guesses
    for k, v in tokenizer_special_ids(tokenizer_dir, vocab_size).items():
        sv.special_token_ids[k.removesuffix("_token_id")] = v
    sv.add_to_gguf(w, quiet=True)


def _special_token_ids(tokenizer_dir: Path) -> set[int]:
    """Ids of tokenizer.json's special added tokens (CONTROL in GGUF)."""
    f = tokenizer_dir / "tokenizer.json"
    if not f.is_file():
        return set()
    added = json.loads(f.read_text()).get("added_tokens") or []
    return {int(a["id"]) for a in added if a.get("special")}


def write_gguf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_file: str | Path,
               tokenizer_dir: str | Path | None = None, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `state_dict` (our/HF parameter names) as one GGUF file; returns its path."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    arch, s = _arch(cfg), cfg.shape
    rs = cfg.rope_scaling
    if rs is not None and rs.get("rope_type", rs.get("type")) != "linear":
        raise ValueError(f"rope_scaling {rs} is not written to GGUF here (only linear); export to Hugging Face")
    out = Path(out_file)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: a GGUF file name ends in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name or out.stem)
    w.add_file_type(ftype)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(s.d_model)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.intermediate_size)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(s.vocab_size)
    if rs is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if tokenizer_dir is not None:
        _add_tokenizer(w, Path(tokenizer_dir), s.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     s.n_layers)
    for key, t in state_dict.items():
        if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and s.tie_embeddings):
            continue  # buffers; a tied head is the embedding (llama.cpp reuses token_embd)
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF tensor name for {key!r}")
        if arch == "llama" and key.endswith("self_attn.q_proj.weight"):
            t = llama_permute(t, s.n_heads)
        elif arch == "llama" and key.endswith("self_attn.k_proj.weight"):
            t = llama_permute(t, s.n_kv_heads)
        data, raw = _tensor_data(t, dtype)
        if raw is None:
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s (%s, %s)", out, arch, dtype)
    return out


def convert_to_gguf(src: str | Path, out_file: str | Path, tokenizer_dir: str | Path | None = None,
                    dtype: str = "f16") -> ModelConfig:
    """An llmshearing model dir, a Hugging Face dir or a Composer checkpoint (not a pruning one:
    prune-export it first) -> GGUF. The tokenizer defaults to the one inside `src` (an HF export has it)."""
    from llmshearing.convert.checkpoint import is_model_dir, load_model_dir, read_composer_checkpoint
    from llmshearing.convert.hf import _refuse_pruning_checkpoint, is_hf_model_dir, load_hf_state_dict
    from llmshearing.data.tokenizer import HF_TOKENIZER_FILES

    p = Path(src)
    if is_model_dir(p):
        cfg, sd = load_model_dir(p)
    elif is_hf_model_dir(p):
        cfg, sd = load_hf_state_dict(p)
    else:
        ck = read_composer_checkpoint(p)
        _refuse_pruning_checkpoint(ck.model_state, ck.pruning, str(p))
        cfg, sd = ck.model_config, {k.removeprefix("model."): v for k, v in ck.model_state.items()}
    if tokenizer_dir is None:
        if not (p.is_dir() and any((p / n).is_file() for n in HF_TOKENIZER_FILES)):
            raise ValueError(f"{p} holds no tokenizer and llama.cpp needs one in the file: pass --tokenizer DIR")
        tokenizer_dir = p
    write_gguf(sd, cfg, out_file, tokenizer_dir=tokenizer_dir, dtype=dtype)
    return cfg
