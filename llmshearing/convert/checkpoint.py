"""The llmshearing model directory: what `model.path` points to.

    <dir>/llmshearing.json   ModelConfig (shape + rope/norm settings + family)
    <dir>/model.safetensors  weights under Hugging Face parameter names

Safetensors (not pickles) so that loading is safe and can be memory-mapped tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmshearing.models.config import ModelConfig

CONFIG_NAME = "llmshearing.json"
WEIGHTS_NAME = "model.safetensors"


def save_model_dir(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write weights + config. Tied lm_head weights are stored once (as embed_tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if cfg.shape.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def load_model_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    f = p / CONFIG_NAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no llmshearing model config (expected {CONFIG_NAME} in the model directory)")
    try:
        return ModelConfig.from_dict(json.loads(f.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f}: invalid model config: {e}") from e


def load_model_dir(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load config + state dict (tensor by tensor, optionally cast)."""
    p = Path(path)
    cfg = load_model_config(p)
    wf = p / WEIGHTS_NAME
    if not wf.is_file():
        raise FileNotFoundError(f"{wf}: missing weights file")
    sd: dict[str, torch.Tensor] = {}
    with safe_open(str(wf), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if cfg.shape.tie_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return cfg, sd


def load_model(path: str | Path, dtype: torch.dtype | None = None, weights: bool = True):
    """Build an `LlamaForCausalLM` from a model directory, refusing missing/unexpected/misshaped keys.

    The model is built on the meta device and the loaded tensors are assigned, so a 7B model is
    neither randomly initialised first nor held twice. Parameters get `dtype` (default: the file's).
    `weights=False` reads only the config and returns the model on the meta device (ranks that
    receive the weights from rank 0).
    """
    from llmshearing.models.llama import LlamaForCausalLM

    if not weights:
        with torch.device("meta"):
            return LlamaForCausalLM(load_model_config(path))
    cfg, sd = load_model_dir(path, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    load_state_dict_strict(model, sd, source=str(path), assign=True)
    model.model.rotary_emb.to_empty(device="cpu")
    model.model.rotary_emb.reset_parameters()
    return model


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with an error that names the file and every bad key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if bad:
            parts.append("shape mismatches: " + "; ".join(bad[:8]))
        raise ValueError(f"{source}: weights do not match the model config: " + " | ".join(parts))
    model.load_state_dict(sd, strict=True, assign=assign)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
