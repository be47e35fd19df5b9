"""The special-token ids of an export: taken from the tokenizer written beside the weights.

A model built from `model.init` (the demo, the tiny configs) has no ids of its own, and transformers'
Llama defaults (bos 1, eos 2) are not our trained tokenizer's (`<s>` = 0, `</s>` = 1): `generate()` and
every harness generation task would stop on the wrong token. So the tokenizer is the authority for
bos/eos/pad in `config.json`, and a `generation_config.json` (what `generate()` actually reads) is
written from the same ids, keeping the source's other generation settings and its extra stop ids
(Llama-3-Instruct stops on several).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def tokenizer_special_ids(tokenizer_dir: str | Path, vocab_size: int) -> dict[str, int]:
    """bos/eos/pad ids the tokenizer defines (keys it does not define are absent). Ids outside the
    model's vocabulary mean the tokenizer is not this model's: refused before anything is written."""
    from transformers import AutoTokenizer  # seconds to import; only exports need it

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: transformers cannot load this tokenizer (%s); config.json keeps the model's own "
                    "special-token ids", tokenizer_dir, e)
        return {}
    ids = {k: getattr(tok, k) for k in ID_KEYS}
    ids = {k: int(v) for k, v in ids.items() if isinstance(v, int)}
    bad = {k: v for k, v in ids.items() if not 0 <= v < vocab_size}
    if bad:
        raise ValueError(f"{tokenizer_dir}: special-token ids {bad} are outside the model's vocabulary "
                         f"(vocab_size {vocab_size}); is this the model's tokenizer?")
    return ids


def with_special_ids(hf_config: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    """config.json with the tokenizer's ids (ids the tokenizer does not define stay as they were)."""
    out = dict(hf_config)
    for k, v in ids.items():
        if out.get(k) != v:
            if out.get(k) is not None:
                log.info("config.json %s: %s -> %s (the tokenizer's)", k, out[k], v)
            out[k] = v
    return out


def generation_config(hf_config: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """generation_config.json for the export: the source's settings (sampling defaults, ...) with the
    config's ids; a source list of stop ids is kept when it contains the config's EOS."""
    from transformers import GenerationConfig

    d = dict(source or {})
    d.pop("transformers_version", None)
    for k in ID_KEYS:
        v = hf_config.get(k)
        if v is None:
            continue
        if k == "eos_token_id" and isinstance(d.get(k), list) and v in d[k]:
            continue  # several stop tokens, ours among them
        d[k] = v
    return GenerationConfig(**d).to_diff_dict()


def read_source_generation_config(tokenizer_dir: str | Path | None) -> dict[str, Any] | None:
    if tokenizer_dir is None:
        return None
    f = Path(tokenizer_dir) / GENERATION_CONFIG_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e


def write_generation_config(out: Path, hf_config: dict[str, Any], tokenizer_dir: str | Path | None) -> None:
    gen = generation_config(hf_config, read_source_generation_config(tokenizer_dir))
    (out / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
