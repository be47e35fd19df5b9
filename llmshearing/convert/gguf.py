"""GGUF files (llama.cpp's format, how many small models are released) -> an llmshearing model dir.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, with the `gguf` and
`accelerate` packages: `pip install -e ".[real]"`) and dequantizes every tensor to the requested
dtype, undoing llama.cpp's q/k row permutation; we take that model's config through the same
validation as a Hugging Face directory (its weights are transformers' own model of that config, so they
match it by construction), and save the tokenizer next to them so `prepare-data
--tokenizer OUT` and the Hugging Face export find it. A quantized release gives the dequantized
weights, not the original bf16 ones (Q4_1: about 4.5 bits per weight).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmshearing.convert.checkpoint import save_model_dir
from llmshearing.convert.hf_config import model_config_from_hf
from llmshearing.convert.hf_weights import is_dropped_buffer
from llmshearing.models.config import ModelConfig

log = logging.getLogger(__name__)


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_field(path: Path, key: str):
    """A scalar (number, bool or string) metadata field of a GGUF file, or None."""
    from gguf import (
        GGUFReader,  # installed with the [real] extra, like transformers' GGUF support needs
    )
    from gguf import GGUFValueType

    field = GGUFReader(str(path)).fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _rope_scaling(path: Path, config: dict) -> None:
    """transformers (4.x) does not read llama.cpp's rope-scaling keys, so a linear-scaled model would
    come back unscaled: read them here, and refuse kinds we do not implement."""
    arch = _gguf_field(path, "general.architecture")
    kind = _gguf_field(path, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return
    if kind != "linear":
        raise ValueError(f"{path}: rope scaling {kind!r} in the GGUF metadata is not supported (only linear)")
    config["rope_scaling"] = {"rope_type": "linear", "factor": float(_gguf_field(path, f"{arch}.rope.scaling.factor"))}


def convert_gguf_to_llmshearing(gguf_path: str | Path, out_dir: str | Path,
                                dtype: torch.dtype | None = None) -> ModelConfig:
    """Dequantize a GGUF file (to `dtype`, default fp32) into our model directory plus its tokenizer."""
    # transformers (seconds to import) and its GGUF reader are only needed here
    import transformers

    src, out = Path(gguf_path), Path(out_dir)
    if not is_gguf_file(src):
        raise ValueError(f"{src}: not a GGUF file (expected the 'GGUF' magic bytes)")
    dtype = dtype or torch.float32
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (ImportError, ValueError, OSError, KeyError) as e:
        raise ValueError(f"{src}: transformers cannot read this GGUF file: {e}") from e
    config = json.loads(hf.config.to_json_string(use_diff=False))
    config["architectures"] = [type(hf).__name__]
    _rope_scaling(src, config)
    cfg = model_config_from_hf(config, source=f"{src} (GGUF metadata)")
    sd = {k: v for k, v in hf.state_dict().items() if not is_dropped_buffer(k)}  # save_model_dir detaches
    save_model_dir(sd, cfg, out)
    # transformers' GGUF tokenizer conversion can lose the special ids; the GGUF metadata (in the
    # config) is the authority, and data prep reads them from the saved tokenizer
    for attr in ("bos", "eos", "pad"):
        tid = config.get(f"{attr}_token_id")
        if isinstance(tid, int):
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(tid))
    add_bos = _gguf_field(src, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)  # whether texts start with BOS (data prep follows it)
    tok.save_pretrained(str(out))
    log.info("converted %s -> %s [%s: %s]", src, out, cfg.family, cfg.shape.summary())
    return cfg
