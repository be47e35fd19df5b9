"""Hugging Face `config.json` <-> our ModelConfig, through transformers' own config classes.

Reading builds the family's config class (LlamaConfig, MistralConfig, Qwen2Config) from the file, so
every key the file omits takes transformers' default, the same model transformers would build;
writing builds that class from our values and serialises it the way `save_pretrained` does. Keys we
do not model (bos/eos/pad ids, use_cache, ...) travel in `ModelConfig.extra_hf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig
from transformers.utils import CONFIG_NAME as HF_CONFIG_NAME

from llmshearing.models.config import ARCHITECTURES, ModelConfig
from llmshearing.models.shape import ModelShape, ShapeError

#: Keys that must be given explicitly: a default here would silently build a different model.
_REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")

#: Keys that ModelConfig represents (read into it, and written back from it on export).
_CONSUMED_KEYS = frozenset(_REQUIRED_KEYS) | {
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters",
    "max_position_embeddings", "initializer_range", "hidden_act", "attention_bias", "mlp_bias",
}

#: Bookkeeping keys that are regenerated on export (or would be stale after pruning, like
#: `layer_types`, one entry per layer), so they are not carried in `extra_hf`.
_DROPPED_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "layer_types", "_commit_hash", "_attn_implementation_autoset", "auto_map",
})

_SUPPORTED_ROPE = ("llama3", "linear", "default")
_ROPE_REQUIRED = {"linear": ("factor",),
                  "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


def _supported_list() -> str:
    return ", ".join(f"{v} (model_type {k!r})" for k, v in ARCHITECTURES.items())


def _family_of(config: Mapping[str, Any], source: str) -> str:
    """Family from `model_type` and/or `architectures`, which must agree when both are given."""
    by_arch = {v: k for k, v in ARCHITECTURES.items()}
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = config.get("model_type")
    if len(archs) > 1:
        raise ValueError(f"{source}: several architectures {archs}; expected exactly one of: {_supported_list()}")
    arch = archs[0] if archs else None
    if arch is not None and arch not in by_arch:
        raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: {_supported_list()}")
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {_supported_list()}")
    if arch is None and model_type is None:
        raise ValueError(f"{source}: neither 'architectures' nor 'model_type' is set; "
                         f"cannot tell the architecture (supported: {_supported_list()})")
    family = by_arch[arch] if arch is not None else model_type
    if model_type is not None and model_type != family:
        raise ValueError(f"{source}: architectures {arch!r} and model_type {model_type!r} disagree")
    return family


def _rope_scaling_from_hf(rs: Any, source: str) -> dict[str, Any] | None:
    """Keep the dict as written (for a faithful export) after checking we implement it."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"{source}: rope_scaling must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in _SUPPORTED_ROPE:
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; "
                         f"supported: {', '.join(_SUPPORTED_ROPE)} or null")
    if kind == "default":
        return None
    missing = [k for k in _ROPE_REQUIRED[kind] if rs.get(k) is None]
    if missing:
        raise ValueError(f"{source}: rope_scaling of type {kind!r} needs {missing}")
    return dict(rs)


def _rope_from_hf(config: Mapping[str, Any], source: str) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) from either config.json format: transformers < 5 writes `rope_theta` and
    `rope_scaling`; transformers 5 writes one `rope_parameters` object holding both. Read by hand because
    transformers 4.x ignores `rope_parameters` (a Llama-3 file saved by 5.x would silently get theta 10000),
    and 5.x has no `rope_theta` attribute. theta None: not in the file (the class default applies)."""
    params = config.get("rope_parameters")
    if params is None:
        theta = config.get("rope_theta")
        return None if theta is None else float(theta), _rope_scaling_from_hf(config.get("rope_scaling"), source)
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: rope_parameters must be one object (per-layer-type rope parameters are not "
                         f"supported), got {params!r}")
    if params.get("rope_theta") is None:
        raise ValueError(f"{source}: rope_parameters has no rope_theta")
    theta = float(params["rope_theta"])
    scaling = _rope_scaling_from_hf({k: v for k, v in params.items() if k != "rope_theta"} or None, source)
    if config.get("rope_theta") is not None and float(config["rope_theta"]) != theta:
        raise ValueError(f"{source}: rope_theta {config['rope_theta']} and rope_parameters.rope_theta {theta} disagree")
    legacy = _rope_scaling_from_hf(config.get("rope_scaling"), source)
    if legacy is not None and legacy != scaling:
        raise ValueError(f"{source}: rope_scaling {legacy} and rope_parameters {params} disagree")
    return theta, scaling


def _sliding_window_from_hf(family: str, hf: PretrainedConfig) -> int | None:
    """Mistral: every layer uses `sliding_window` (null = none). Qwen2: only with use_sliding_window.
    Our model refuses sequences longer than the window (it does not implement the window), which
    is exact for shorter sequences and never silently wrong for longer ones."""
    if family == "mistral":
        return hf.sliding_window
    if family == "qwen2" and getattr(hf, "use_sliding_window", False):
        return hf.sliding_window
    return None


def _hf_config_object(family: str, values: Mapping[str, Any], source: str) -> PretrainedConfig:
    """transformers' own config class for the family, built from `values`: its defaults fill every
    key a config.json omits, exactly as transformers would when it loads the same file."""
    kwargs = {k: v for k, v in json.loads(json.dumps(values)).items()  # a copy: configs edit rope dicts
              if k not in _DROPPED_KEYS or k == "architectures"}
    try:
        return AutoConfig.for_model(family, **kwargs)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:  # transformers 5 validates via the hub's
        raise ValueError(f"{source}: transformers rejects this config: {e}") from e  # strict dataclasses


def _check_unsupported_features(family: str, config: Mapping[str, Any], source: str) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (LLaMA-family models use 'silu')")
    if config.get("quantization_config") is not None:
        raise ValueError(f"{source}: quantized checkpoints (quantization_config) cannot be converted; "
                         "use the unquantized bf16/fp16/fp32 weights")
    if family == "llama":
        if config.get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=true is not supported (our MLP projections have no bias)")
        if config.get("attention_bias", False):
            raise ValueError(f"{source}: attention_bias=true is not supported for llama: transformers then puts a "
                             "bias on o_proj too, which our attention does not have (only q/k/v biases, as in qwen2)")


def model_config_from_hf(config_dict: Mapping[str, Any], source: str = HF_CONFIG_NAME) -> ModelConfig:
    """Translate a Hugging Face `config.json` (as a dict) into our ModelConfig.

    Omitted optional keys take transformers' class defaults (through its own config class) so the
    result describes the model that transformers would build from the same file. Keys we do not model (bos/eos/pad ids, use_cache,
    max_window_layers, ...) are kept in `extra_hf` and written back on export. `source` names the
    file in error messages.
    """
    family = _family_of(config_dict, source)
    _check_unsupported_features(family, config_dict, source)
    missing = [k for k in _REQUIRED_KEYS if config_dict.get(k) is None]
    if family != "llama" and config_dict.get("num_key_value_heads") is None:
        # MistralConfig / Qwen2Config default to 8 / 32 KV heads whatever num_attention_heads is;
        # a file that omits the key almost certainly meant something else, so ask for it.
        missing.append("num_key_value_heads")
    if missing:
        raise ValueError(f"{source}: missing required keys {missing}")
    rope_theta, rope_scaling = _rope_from_hf(config_dict, source)
    hf = _hf_config_object(family, config_dict, source)
    if rope_theta is None:  # the class default, wherever this transformers version keeps it
        rope_theta = float(getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"])

    d, heads = config_dict["hidden_size"], config_dict["num_attention_heads"]
    head_dim = config_dict.get("head_dim")
    if head_dim is None:
        if not isinstance(d, int) or not isinstance(heads, int) or heads <= 0 or d % heads:
            raise ValueError(f"{source}: hidden_size {d} is not divisible by num_attention_heads {heads} "
                             "and head_dim is not set")
        head_dim = d // heads
    try:
        shape = ModelShape(
            d_model=d, n_heads=heads,
            n_kv_heads=config_dict.get("num_key_value_heads") or heads,
            head_dim=head_dim, n_layers=config_dict["num_hidden_layers"],
            intermediate_size=config_dict["intermediate_size"], vocab_size=config_dict["vocab_size"],
            tie_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=family == "qwen2",
        )
        extra = {k: v for k, v in config_dict.items() if k not in _CONSUMED_KEYS and k not in _DROPPED_KEYS}
        if family == "mistral" or (family == "qwen2" and config_dict.get("use_sliding_window", False)):
            extra.pop("sliding_window", None)  # represented by ModelConfig.sliding_window
        extra.pop("use_sliding_window", None)  # regenerated from ModelConfig.sliding_window
        return ModelConfig(
            shape=shape, family=family,
            rms_norm_eps=float(hf.rms_norm_eps), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.max_position_embeddings),
            sliding_window=_sliding_window_from_hf(family, hf),
            initializer_range=float(hf.initializer_range),
            extra_hf=json.loads(json.dumps(extra)),  # a JSON-clean copy: it goes into llmshearing.json
        )
    except (ShapeError, TypeError) as e:
        raise ValueError(f"{source}: invalid model dimensions: {e}") from e


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` transformers itself writes (`save_pretrained`) for this model: its config
    class built from our values, serialised as it serialises it (inverse of `model_config_from_hf`).

    `extra_hf` is passed first and the keys we own override it, so a stale extra key can never
    contradict the (possibly pruned) shape. `dtype` becomes `torch_dtype`/`dtype`: both are
    written because transformers < 4.56 reads only the former and newer versions prefer the latter.
    """
    s, family = cfg.shape, cfg.family
    if family not in ARCHITECTURES:
        raise ValueError(f"cannot export family {family!r}; supported: {_supported_list()}")
    if family == "qwen2" and not s.qkv_bias:
        raise ValueError("a qwen2 model without q/k/v biases cannot be exported: Qwen2ForCausalLM always has them")
    if family != "qwen2" and s.qkv_bias:
        raise ValueError(f"a {family} model with q/k/v biases cannot be exported: {ARCHITECTURES[family]} "
                         "has no q/k/v-only bias (use family 'qwen2')")
    out: dict[str, Any] = dict(cfg.extra_hf)
    out.update(
        architectures=[ARCHITECTURES[family]], model_type=family,
        hidden_size=s.d_model, intermediate_size=s.intermediate_size,
        num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
        num_hidden_layers=s.n_layers, vocab_size=s.vocab_size, tie_word_embeddings=s.tie_embeddings,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
    )
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    else:  # null = the class default for llama/qwen2; MistralConfig has no such attribute at all
        out.pop("rope_scaling", None)
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif family == "qwen2":
        out["use_sliding_window"] = cfg.sliding_window is not None
        if cfg.sliding_window is not None:
            out["sliding_window"] = cfg.sliding_window
        else:
            out.setdefault("sliding_window", None)
    written = json.loads(_hf_config_object(family, out, "the exported config").to_json_string(use_diff=True))
    written["torch_dtype"] = written["dtype"] = _dtype_name(dtype)
    return dict(sorted(written.items()))


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    """ModelConfig of a local HF directory (its config.json)."""
    f = Path(hf_dir) / HF_CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found; a Hugging Face model directory needs {HF_CONFIG_NAME}")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e
    return model_config_from_hf(config, source=str(f))
