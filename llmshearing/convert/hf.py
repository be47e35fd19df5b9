"""Conversion between Hugging Face checkpoints and llmshearing models.

Our parameter names are exactly Hugging Face's, so conversion is: translate `config.json` <->
`ModelConfig`, then copy tensors while validating every key and shape against the `ModelShape`.
The original code silently loaded with `strict=False`, took the rest of the config from a gated
Llama-2 repo and cast through fp32; here every mismatch is an error naming the file and key, the
config is carried over from the source (rms_norm_eps, rope settings, token ids, ...), and tensors
are streamed one at a time (source dtype kept unless asked otherwise), so converting a 7B model
holds at most one tensor plus whatever the source format itself keeps mapped.

Public API (the config translation is in `hf_config.py`):
    convert_hf_to_llmshearing(hf_dir, out_dir, dtype)
    export_to_hf(state_dict, cfg, out_dir, tokenizer_dir, dtype)
    convert_composer_to_hf(ckpt, out_dir, tokenizer_dir, dtype)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from llmshearing.convert.checkpoint import (
    CONFIG_NAME,
    DCP_METADATA,
    WEIGHTS_NAME,
    is_model_dir,
    load_model_config,
    read_composer_checkpoint,
)
from llmshearing.convert.hf_config import (
    HF_CONFIG_NAME,
    hf_config_from_model_config,
    read_hf_config,
)
from llmshearing.convert.hf_weights import (
    HF_WEIGHT_FILES,
    Entry,
    Source,
    drop_buffers,
    drop_tied_head,
    find_hf_weight_sources,
    iter_tensors,
    resolve_dtype,
    scan,
    short_list,
    stream_copy,
    validate_entries,
)
from llmshearing.convert.model_card import (
    CARD_NAME,
    CardFacts,
    facts_from_checkpoint,
    facts_from_handover,
    inherited,
    write_card,
)
from llmshearing.convert.special_tokens import (
    tokenizer_special_ids,
    with_special_ids,
    write_generation_config,
)
from llmshearing.data.tokenizer import HF_TOKENIZER_FILES
from llmshearing.models.config import ModelConfig

logger = logging.getLogger(__name__)



def _refuse_same_dir(src: Path, out: Path) -> None:
    if src.resolve() == out.resolve():
        raise ValueError(f"output directory {out} is the input directory; choose another one "
                         "(the input files would be overwritten while being read)")


# ---------------------------------------------------------------------------------------------
# HF -> llmshearing
# ---------------------------------------------------------------------------------------------

def convert_hf_to_llmshearing(hf_dir: str | Path, out_dir: str | Path,
                              dtype: torch.dtype | str | None = None) -> ModelConfig:
    """Convert a local Hugging Face model directory into our model directory
    (`llmshearing.json` + `model.safetensors`).

    Reads `model.safetensors`, a sharded safetensors index, `pytorch_model.bin` or a sharded .bin
    index; everything is validated against config.json before anything is written, then copied
    tensor by tensor. Returns the ModelConfig.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a directory (expected a local Hugging Face model directory "
                                f"with {HF_CONFIG_NAME} and weights)")
    dtype = resolve_dtype(dtype)
    _refuse_same_dir(hf_dir, out)
    cfg, sources, entries = _plan_hf_dir(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s (%d tensors in %d file(s)) -> %s", hf_dir, len(entries), len(sources), out)
    stream_copy(entries, sources, out / WEIGHTS_NAME, dtype, desc="hf->llmshearing")
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if (hf_dir / CARD_NAME).is_file():  # the source's card goes along: its license reaches the exports' cards
        shutil.copy2(hf_dir / CARD_NAME, out / CARD_NAME)
    return cfg


def _plan_hf_dir(hf_dir: Path) -> tuple[ModelConfig, list[Source], dict[str, Entry]]:
    """Config, weight files and tensor plan of an HF dir, validated against config.json; nothing loaded."""
    cfg = read_hf_config(hf_dir)
    sources = find_hf_weight_sources(hf_dir)
    entries = scan(sources, drop_buffers)
    validate_entries(entries, sources, cfg, str(hf_dir / HF_CONFIG_NAME))
    drop_tied_head(entries, sources, cfg)
    return cfg, sources, entries


def is_hf_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / HF_CONFIG_NAME).is_file() and any((p / n).is_file() for n in HF_WEIGHT_FILES)


def load_hf_state_dict(hf_dir: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and state dict of a local Hugging Face model directory, validated exactly as
    `convert_hf_to_llmshearing` validates them, but kept in memory (safetensors tensors are read
    one by one, cast to `dtype` if given): `model.path` can point at the HF download itself."""
    cfg, sources, entries = _plan_hf_dir(Path(hf_dir))
    sd = {}
    for e, t in iter_tensors(entries, sources):
        sd[e.key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if cfg.shape.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return cfg, sd


# ---------------------------------------------------------------------------------------------
# llmshearing -> HF
# ---------------------------------------------------------------------------------------------

def _check_export_dir(out: Path) -> None:
    """transformers picks the first weights layout it finds; a stale shard index or .bin left in
    the directory could shadow the new model.safetensors, so refuse rather than guess."""
    stale = [p.name for p in out.glob("*") if p.name != "model.safetensors" and
             (p.name in HF_WEIGHT_FILES or (p.name.startswith(("model-", "pytorch_model-"))))]
    if stale:
        raise ValueError(f"{out}: already contains other weight files {sorted(stale)}; export into an empty directory")


def _check_tokenizer_dir(tokenizer_dir: str | Path) -> list[str]:
    tok = Path(tokenizer_dir)
    if not tok.is_dir():
        raise FileNotFoundError(f"{tok}: tokenizer directory not found")
    found = [n for n in HF_TOKENIZER_FILES if (tok / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{tok}: no tokenizer files; looked for {', '.join(HF_TOKENIZER_FILES)}")
    return found


def copy_tokenizer(tokenizer_dir: str | Path, out: Path) -> list[str]:
    """The tokenizer's files (generation_config.json is rewritten by the export, see special_tokens)."""
    tok = Path(tokenizer_dir)
    found = _check_tokenizer_dir(tok)
    if tok.resolve() != out.resolve():
        for n in found:
            shutil.copy2(tok / n, out / n)
    return found


def _export_sources(sources: Sequence[Source], entries: dict[str, Entry], cfg: ModelConfig, out: Path,
                    tokenizer_dir: str | Path | None, dtype: torch.dtype | None, config_source: str,
                    card: CardFacts | None = None) -> Path:
    """Shared tail of every export: validate, write weights + config.json (+ tokenizer) + the model card."""
    emb = entries.get("model.embed_tokens.weight")  # None: validate_entries reports it just below
    # built first: refuses unsupported combinations before anything is written
    hf_cfg = hf_config_from_model_config(cfg, dtype or (emb.dtype if emb is not None else torch.float32))
    validate_entries(entries, sources, cfg, config_source)
    drop_tied_head(entries, sources, cfg)
    if tokenizer_dir is not None:  # checked before anything is written: its ids must fit the model
        _check_tokenizer_dir(tokenizer_dir)
        hf_cfg = with_special_ids(hf_cfg, tokenizer_special_ids(tokenizer_dir, cfg.shape.vocab_size))
    out.mkdir(parents=True, exist_ok=True)
    _check_export_dir(out)
    stream_copy(entries, sources, out / "model.safetensors", dtype, desc="llmshearing->hf")
    (out / HF_CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tokenizer_dir is not None:
        logger.info("copied tokenizer files %s", copy_tokenizer(tokenizer_dir, out))
    write_generation_config(out, hf_cfg, tokenizer_dir)
    write_card(out, (card or CardFacts(config=cfg)).with_(config=cfg))
    return out


def export_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                 tokenizer_dir: str | Path | None = None, dtype: torch.dtype | str | None = None,
                 card: CardFacts | None = None) -> Path:
    """Write a Hugging Face model directory (`config.json` + `model.safetensors` [+ tokenizer])
    that `AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.

    Tied models store only `model.embed_tokens.weight` (what `save_pretrained` does); tensors keep
    their dtype unless `dtype` is given. With a tokenizer, config.json takes its bos/eos/pad ids, and
    a generation_config.json is always written (special_tokens.py). Returns the output directory.
    """
    out = Path(out_dir)
    sources = [Source(name="state dict", sd=state_dict)]
    entries = scan(sources, drop_buffers)
    return _export_sources(sources, entries, cfg, out, tokenizer_dir, resolve_dtype(dtype), "the model config", card)


def _refuse_pruning_checkpoint(sd: Mapping[str, Any], pruning: Any, source: str) -> None:
    l0 = [k for k in sd if k.startswith("l0.")]
    if l0 or pruning:  # ModelInfo.pruning is None (or empty) outside pruning runs
        logger.warning("%s is a pruning checkpoint (%d mask parameters)", source, len(l0))
        raise ValueError(f"{source}: this is a pruning checkpoint (it carries L0 mask parameters / pruning "
                         "settings); its weights are the unpruned model. Run `llmshearing prune-export` to cut "
                         "it to the target shape first, then convert the resulting model directory")


def convert_composer_to_hf(ckpt: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                           dtype: torch.dtype | str | None = None, commands: Sequence[str] = ()) -> ModelConfig:
    """Export (a) an llmshearing model directory or (b) a Composer training checkpoint (a full
    `latest-rank0.pt` or a sharded checkpoint folder; config from its ModelInfo callback state) to a
    Hugging Face model directory. Pruning checkpoints are refused (prune-export them first).
    The model card gathers what the checkpoint / hand-over file recorded (model_card.py), plus
    `commands`. Returns the config.
    """
    path, out = Path(ckpt), Path(out_dir)
    dtype = resolve_dtype(dtype)
    if path.is_dir() and not (path / DCP_METADATA).is_file():
        if not is_model_dir(path):
            hint = " (it looks like a Hugging Face model already)" if (path / HF_CONFIG_NAME).is_file() else ""
            raise FileNotFoundError(f"{path}: not an llmshearing model directory; looked for {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}{hint}")
        _refuse_same_dir(path, out)
        cfg = load_model_config(path)
        sources = [Source(name=str(path / WEIGHTS_NAME), path=path / WEIGHTS_NAME)]
        entries = scan(sources, lambda k: k)
        card = facts_from_handover(cfg, path)
        if card.source_model is None:  # not a cut model: its own (copied) source card, if any
            card = card.with_(**inherited(str(path)))
        card = card.with_(commands=[*card.commands, *commands])
        _export_sources(sources, entries, cfg, out, tokenizer_dir, dtype, str(path / CONFIG_NAME), card)
        return cfg
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; expected a Composer checkpoint (e.g. latest-rank0.pt, or a "
                                f"sharded checkpoint folder) or an llmshearing model directory ({CONFIG_NAME} + "
                                f"{WEIGHTS_NAME})")
    ck = read_composer_checkpoint(path)
    sd = ck.model_state
    _refuse_pruning_checkpoint(sd, ck.pruning, str(path))
    cfg = ck.model_config
    other = sorted(k for k in sd if not k.startswith("model."))
    if other:
        raise ValueError(f"{path}: unexpected entries in the checkpoint's model state {short_list(other)}")
    weights = {k.removeprefix("model."): v for k, v in sd.items()}
    card = facts_from_checkpoint(ck)
    card = card.with_(commands=[*card.commands, *commands])
    del ck, sd
    sources = [Source(name=str(path), sd=weights)]
    entries = scan(sources, drop_buffers)
    _export_sources(sources, entries, cfg, out, tokenizer_dir, dtype, f"{path} (ModelInfo config)", card)
    return cfg
