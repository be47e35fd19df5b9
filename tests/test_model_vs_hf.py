"""Our decoder equals transformers' own Llama/Mistral/Qwen2 implementations (fp32, CPU).

Covers MHA and GQA, tied and untied embeddings, llama3 and linear RoPE scaling, head_dim !=
hidden/heads, Qwen2 q/k/v biases, Mistral/Qwen2 sliding-window configs (sequences inside the
window), and exact parameter counts. The HF models are random tiny ones (tests/_hf_helpers.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from _hf_helpers import (
    BASE,
    CASES,
    config_of,
    hf_case,
    hf_model,
    max_abs_diff,
    ours_from_hf,
    tokens,
)

from llmshearing.convert.checkpoint import load_state_dict_strict
from llmshearing.convert.hf_config import model_config_from_hf
from llmshearing.models.llama import LlamaForCausalLM

ATOL = 1e-4  # fp32 logits of O(1) magnitude; observed differences are ~1e-6


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_hf(name: str) -> None:
    hf = hf_case(name)
    ours = ours_from_hf(hf)
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        want, got = hf(x).logits, ours(x)
    assert want.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    assert max_abs_diff(want, got) < ATOL, name  # tolerance: 1e-4 absolute, fp32


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3rope", "qwen2-gqa-bias"])
def test_logits_equal_hf_sdpa(name: str) -> None:
    hf = hf_case(name, attn="sdpa")
    assert hf.config._attn_implementation == "sdpa"
    ours = ours_from_hf(hf)
    x = tokens(hf.config.vocab_size, seed=5)
    with torch.no_grad():
        assert max_abs_diff(hf(x).logits, ours(x)) < ATOL  # tolerance: 1e-4 absolute, fp32


@pytest.mark.parametrize("name", sorted(CASES))
def test_n_params_equals_hf(name: str) -> None:
    hf = hf_case(name)
    shape = config_of(hf).shape
    assert shape.n_params() == sum(p.numel() for p in hf.parameters())  # parameters() counts tied ones once
    assert shape.n_params() == sum(p.numel() for p in ours_from_hf(hf).parameters())


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3rope", "llama-gqa-headdim24-linearrope"])
def test_rope_scaling_matters_at_test_length(name: str) -> None:
    """Guard for the test above: with the same weights, dropping rope_scaling changes the logits,
    so equality with HF really exercises the scaled frequencies."""
    family, overrides = CASES[name]
    scaled = hf_case(name)
    plain = hf_model(family, **{**overrides, "rope_scaling": None})
    plain.load_state_dict(scaled.state_dict())
    x = tokens(scaled.config.vocab_size)
    with torch.no_grad():
        assert max_abs_diff(scaled(x).logits, plain(x).logits) > 1e-2


def test_head_dim_differs_from_hidden_over_heads() -> None:
    hf = hf_case("llama-gqa-headdim24-linearrope")
    s = config_of(hf).shape
    assert s.head_dim == 24 and s.head_dim * s.n_heads != s.d_model and s.n_kv_heads < s.n_heads


def test_qwen2_biases_are_used() -> None:
    """Zeroing the q/k/v biases changes the logits, so the match above covers them."""
    hf = hf_case("qwen2-gqa-bias")
    ours = ours_from_hf(hf)
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        before = ours(x)
        for layer in ours.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        assert max_abs_diff(before, ours(x)) > 1e-2


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_omitted_keys_take_transformers_defaults(family: str) -> None:
    """A minimal config.json means the same model here as in transformers (e.g. eps 1e-6, not 1e-5)."""
    minimal = {"model_type": family, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "intermediate_size": 96, "vocab_size": 97}
    if family != "llama":
        minimal["num_key_value_heads"] = 2  # required there: transformers' defaults (8 / 32) ignore the heads
    cfg = model_config_from_hf(minimal)
    hf_cfg = transformers.AutoConfig.for_model(**minimal)
    assert cfg.rms_norm_eps == hf_cfg.rms_norm_eps == 1e-6
    hf_theta = getattr(hf_cfg, "rope_theta", None) or hf_cfg.rope_parameters["rope_theta"]  # transformers 5
    assert cfg.rope_theta == hf_theta
    assert cfg.max_position_embeddings == hf_cfg.max_position_embeddings
    assert cfg.shape.tie_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.shape.n_kv_heads == hf_cfg.num_key_value_heads
    assert cfg.initializer_range == hf_cfg.initializer_range
    want_window = hf_cfg.sliding_window if family == "mistral" else None
    assert cfg.sliding_window == want_window


def test_eps_is_carried_not_defaulted() -> None:
    """Our ModelConfig default eps (1e-5) differs from HF's (1e-6): conversion must carry the file's."""
    for eps in (1e-5, 1e-6, 3e-6):
        d = json.loads(transformers.LlamaConfig(**{**BASE, "rms_norm_eps": eps}).to_json_string(use_diff=True))
        assert model_config_from_hf(d).rms_norm_eps == eps


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_kv_heads_required_where_transformers_default_ignores_heads(family: str) -> None:
    minimal = {"model_type": family, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "intermediate_size": 96, "vocab_size": 97}
    with pytest.raises(ValueError, match="num_key_value_heads"):
        model_config_from_hf(minimal)


def _as_transformers5_writes_it(d: dict) -> dict:
    """The config.json of transformers >= 5: rope_theta and rope_scaling merged into rope_parameters
    (written by hand here, so the test does not depend on the installed transformers version)."""
    d = dict(d)
    params = {"rope_type": "default", **(d.pop("rope_scaling", None) or {}), "rope_theta": d.pop("rope_theta")}
    params.pop("type", None)
    return {**d, "rope_parameters": params}


@pytest.mark.parametrize("name", ["llama-gqa-tied-llama3rope", "mistral-gqa-window", "qwen2-gqa-bias"])
def test_config_written_by_transformers5_reads_as_the_same_model(name: str) -> None:
    """A Llama-3 config.json saved by transformers 5 has no `rope_theta` key; transformers 4.x ignores its
    `rope_parameters`, so read naively it would become theta 10000 and no llama3 scaling: a different model."""
    family, overrides = CASES[name]
    hf = hf_model(family, **{**overrides, "rope_theta": 250000.0})
    d = json.loads(hf.config.to_json_string(use_diff=False))
    d["architectures"] = [type(hf).__name__]
    if "rope_parameters" not in d:
        d = _as_transformers5_writes_it(d)
    d.pop("rope_theta", None), d.pop("rope_scaling", None)
    cfg = model_config_from_hf(d)
    assert cfg.rope_theta == 250000.0
    assert (cfg.rope_scaling or {}).get("rope_type") == overrides.get("rope_scaling", {}).get("rope_type")
    ours = LlamaForCausalLM(cfg).eval()
    load_state_dict_strict(ours, dict(hf.state_dict()), source="hf")
    x = tokens(hf.config.vocab_size)
    with torch.no_grad():
        want, got = hf(x).logits, ours(x)
        assert max_abs_diff(want, got) < ATOL  # tolerance: 1e-4 absolute, fp32
        # guard: the same weights at the class-default theta are clearly another model
        plain = LlamaForCausalLM(model_config_from_hf({**d, "rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 10000.0}})).eval()
        load_state_dict_strict(plain, dict(hf.state_dict()), source="hf")
        assert max_abs_diff(want, plain(x)) > 1e-2


def test_rope_parameters_that_contradict_rope_theta_are_refused() -> None:
    d = {**BASE, "model_type": "llama", "rope_theta": 10000.0,
         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    with pytest.raises(ValueError, match="rope_theta 10000.0 and rope_parameters.rope_theta 500000.0 disagree"):
        model_config_from_hf(d)
    d = {**BASE, "model_type": "llama", "rope_parameters": {"full_attention": {"rope_theta": 1e4},
                                                            "sliding_attention": {"rope_theta": 1e6}}}
    with pytest.raises(ValueError, match="per-layer-type"):
        model_config_from_hf(d)
    d = {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        model_config_from_hf(d)


def test_config_transformers_rejects_is_one_error_naming_the_file(monkeypatch) -> None:
    """transformers 5 validates configs through huggingface_hub's strict dataclasses, whose error is not a
    ValueError (e.g. hidden_size not a multiple of the heads even with head_dim set): still one message."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    import llmshearing.convert.hf_config as hc

    def reject(*a, **k):
        raise StrictDataclassClassValidationError("validate_architecture", ValueError("hidden size (16) ..."))

    monkeypatch.setattr(hc.AutoConfig, "for_model", reject)
    with pytest.raises(ValueError, match=r"(?s)some/config.json: transformers rejects this config: .*hidden size"):
        model_config_from_hf({**BASE, "model_type": "llama"}, source="some/config.json")
