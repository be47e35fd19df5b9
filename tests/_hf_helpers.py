"""Tiny random Hugging Face models for the model/conversion/mask tests (no downloads).

Weights are re-drawn so that every parameter matters: norms around 1 (not exactly 1), biases
non-zero, matrices scaled 1/sqrt(fan_in) so activations and logits are O(1) and an absolute
tolerance of 1e-4 is a meaningful check.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers

from llmshearing.convert.checkpoint import load_state_dict_strict
from llmshearing.convert.hf_config import model_config_from_hf
from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM

HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}

BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
            num_hidden_layers=2, vocab_size=97, rms_norm_eps=1e-5, max_position_embeddings=256)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

#: name -> (family, config overrides). Sequences in the tests are <= 24 tokens.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha-untied": ("llama", {}),
    "llama-gqa-tied-llama3rope": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                rope_scaling=LLAMA3_ROPE, max_position_embeddings=128)),
    "llama-gqa-headdim24-linearrope": ("llama", dict(num_key_value_heads=2, head_dim=24,
                                                     rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral-gqa-window": ("mistral", dict(num_key_value_heads=2, sliding_window=64, rope_theta=500000.0)),
    "mistral-mha-tied-nowindow": ("mistral", dict(sliding_window=None, tie_word_embeddings=True)),
    "qwen2-gqa-bias": ("qwen2", dict(num_key_value_heads=1, head_dim=20)),
    "qwen2-mha-tied-window": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True,
                                            sliding_window=64, max_window_layers=1)),
}


def hf_config(family: str, attn: str = "eager", **overrides: Any) -> transformers.PretrainedConfig:
    cls, _ = HF_CLASSES[family]
    kw = copy.deepcopy({**BASE, **overrides})  # transformers 5 edits rope dicts in place (shared CASES)
    cfg = cls(**kw)
    cfg._attn_implementation = attn
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(0.25 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def hf_model(family: str, seed: int = 0, attn: str = "eager", **overrides: Any) -> transformers.PreTrainedModel:
    """A random tiny HF CausalLM in eval mode (fp32)."""
    _, model_cls = HF_CLASSES[family]
    torch.manual_seed(seed)
    m = model_cls(hf_config(family, attn, **overrides)).eval()
    return randomize_(m, seed)


def hf_case(name: str, seed: int = 0, attn: str = "eager") -> transformers.PreTrainedModel:
    family, overrides = CASES[name]
    return hf_model(family, seed, attn, **overrides)


def config_of(hf: transformers.PreTrainedModel) -> ModelConfig:
    """Our ModelConfig from the HF model's config as it would be saved to config.json."""
    import json

    d = json.loads(hf.config.to_json_string(use_diff=True))
    d["architectures"] = [type(hf).__name__]
    return model_config_from_hf(d, source=f"<{type(hf).__name__} config>")


def ours_from_hf(hf: transformers.PreTrainedModel) -> LlamaForCausalLM:
    """Our model with the HF model's weights, in memory (the file path is tested in test_convert)."""
    cfg = config_of(hf)
    ours = LlamaForCausalLM(cfg).eval()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    load_state_dict_strict(ours, sd, source="hf state dict")
    return ours


def clone_hf(hf: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    return copy.deepcopy(hf).eval()


def tokens(vocab: int, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()
