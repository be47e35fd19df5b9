"""`model.path`: an llmshearing model directory or a Hugging Face model directory, read the same way.

Our parameter names are Hugging Face's, so a 7B user can point `model.path` at the HF download and
needs no second on-disk copy (`llmshearing convert hf-to-composer` stays for a self-contained copy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmshearing.convert.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_safetensors_file,
    is_model_dir,
    load_model,
    load_model_config,
    model_from_state_dict,
)
from llmshearing.convert.hf import is_hf_model_dir, load_hf_state_dict
from llmshearing.convert.hf_config import HF_CONFIG_NAME, read_hf_config
from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM


def describe_expected() -> str:
    return (f"an llmshearing model directory ({CONFIG_NAME} + {WEIGHTS_NAME}) or a Hugging Face model "
            f"directory ({HF_CONFIG_NAME} + safetensors/.bin weights)")


def is_model_source(path: str | Path) -> bool:
    return is_model_dir(path) or is_hf_model_dir(path)


def check_weight_files(path: str | Path) -> None:
    """Every safetensors weight file of `model.path` is complete (header check, no tensor read)."""
    p = Path(path)
    files = [p / WEIGHTS_NAME] if is_model_dir(p) else sorted(p.glob("*.safetensors"))
    for f in files:
        check_safetensors_file(f)


def source_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of `model.path` (reads only config files)."""
    if is_model_dir(path):
        return load_model_config(path)
    if is_hf_model_dir(path):
        return read_hf_config(path)
    raise FileNotFoundError(f"{path}: not {describe_expected()}")


def load_source_model(path: str | Path, dtype: torch.dtype | None = None, weights: bool = True) -> LlamaForCausalLM:
    """`load_model` for either kind of directory; `weights=False` gives the model on the meta device."""
    if is_model_dir(path):
        return load_model(path, dtype=dtype, weights=weights)
    if not weights:
        with torch.device("meta"):
            return LlamaForCausalLM(source_config(path))
    if not is_hf_model_dir(path):
        raise FileNotFoundError(f"{path}: not {describe_expected()}")
    cfg, sd = load_hf_state_dict(path, dtype)
    return model_from_state_dict(cfg, sd, source=str(path))
