"""One LLaMA-family decoder (Llama-2/3, Mistral, Qwen2-style) whose forward applies optional
structure masks.

Parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
state dict converts by validation alone and an exported model loads with no missing keys.
With `masks=None` (or an empty `StructureMasks`) no mask op runs: it is a plain model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmshearing.models.config import ModelConfig
from llmshearing.models.losses import (
    DEFAULT_CHUNK_TOKENS,
    LossSums,
    SoftTargets,
    chunked_losses,
)
from llmshearing.models.masks import LayerMasks, StructureMasks
from llmshearing.models.rope import RotaryEmbedding, apply_rotary

#: Apply RoPE in the dtype of q/k. Under autocast q/k leave their projections in bf16 while cos/sin
#: follow the fp32 residual stream, so without this the rotation promotes q and k to fp32 (five
#: elementwise passes at twice the bytes, then a cast back to bf16 inside SDPA), as transformers
#: does. With it the rotation runs in bf16 (a few bf16 roundings on q/k, well inside bf16 training
#: tolerance). No effect when q/k are fp32 (CPU / fp32 runs stay bit-identical). Module-level so a
#: benchmark can A/B it (`benchmarks/train_throughput.py --ab-rope`).
ROPE_IN_QK_DTYPE: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, hidden_z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.promote_types(dtype, torch.float32))  # fp32 statistics, fp64 for fp64 checks
        if hidden_z is None:
            var = xf.pow(2).mean(-1, keepdim=True)
        else:
            # variance over the kept dims only, so that this equals a d'-dim RMSNorm of the cut
            # model; counted as a tensor (no host sync).
            kept = (hidden_z != 0).to(xf.dtype)
            var = (xf.pow(2) * kept).sum(-1, keepdim=True) / kept.sum()
        y = self.weight * (xf * torch.rsqrt(var + self.eps)).to(dtype)
        if hidden_z is not None:
            y = y * hidden_z.to(y.dtype)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        s = cfg.shape
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(s.d_model, s.q_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.d_model, s.kv_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.d_model, s.kv_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.q_dim, s.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                head_z: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.sliding_window is not None and t > self.sliding_window:
            raise NotImplementedError(
                f"sequence length {t} exceeds the model's sliding_window {self.sliding_window}; "
                "sliding-window attention is not implemented (use sequences <= the window)"
            )
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if ROPE_IN_QK_DTYPE and cos.dtype != q.dtype:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, k, cos, sin)
        ctx = _causal_sdpa(q, k, v, self.n_heads // self.n_kv_heads)
        if head_z is not None:
            ctx = ctx * head_z.to(ctx.dtype).view(1, -1, 1, 1)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """Causal SDPA; `group` query heads share one K/V head (1 = MHA).

    On CUDA, `enable_gqa=True` is served by the flash kernel only for fp16/bf16 inputs with
    head_dim <= 256; otherwise (e.g. fp32 without autocast) torch 2.7 falls back to the *math*
    backend (its memory-efficient kernel rejects GQA), which materialises the [B, H, S, S] scores.
    There we expand K/V to all query heads (query head h uses K/V head h // group, as enable_gqa
    and HF's repeat_kv do) so the memory-efficient kernel can take it. CPU keeps enable_gqa
    (unchanged numerics).
    """
    if group > 1 and q.is_cuda:
        low = (torch.float16, torch.bfloat16)
        flash_dtype = q.dtype in low or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in low)
        if not flash_dtype or q.shape[-1] > 256:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f = cfg.shape.d_model, cfg.shape.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, int_z: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if int_z is not None:
            h = h * int_z.to(h.dtype)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.shape.d_model
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # Activation checkpointing (set by the trainer): keep only this layer's input for backward and
        # recompute the rest. Inside the layer, not a wrapper module, so parameter names, checkpoints
        # and the FSDP unit (whose hooks stay outside the recomputed region) do not change with it.
        self.checkpoint_activations = False
        self._impl = self._forward  # or its torch.compile'd version (`compile_layer`)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                masks: LayerMasks | None = None) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._impl, x, cos, sin, masks, use_reentrant=False)
        return self._impl(x, cos, sin, masks)

    def compile_layer(self, backend: str = "inductor") -> None:
        """torch.compile this layer's computation as one graph (`fullgraph`: a graph break is an error, not
        a silent fallback). The module keeps its names and hooks (FSDP's stay outside the graph), and
        every layer runs the same code on same-shaped inputs, so they share compiled graphs."""
        self._impl = torch.compile(self._forward, backend=backend, fullgraph=True, dynamic=False)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: LayerMasks | None) -> torch.Tensor:
        if masks is None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))
        hz = masks.hidden
        a = self.self_attn(self.input_layernorm(x, hz), cos, sin, masks.heads)
        x = x + _gate(a, masks.attn_gate, hz)
        m = self.mlp(self.post_attention_layernorm(x, hz), masks.intermediate)
        return x + _gate(m, masks.mlp_gate, hz)


def _gate(y: torch.Tensor, scalar: torch.Tensor | None, hidden_z: torch.Tensor | None) -> torch.Tensor:
    if scalar is not None:
        y = y * scalar.to(y.dtype)
    if hidden_z is not None:
        y = y * hidden_z.to(y.dtype)
    return y


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        s = cfg.shape
        self.embed_tokens = nn.Embedding(s.vocab_size, s.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.d_model, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(s.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: torch.Tensor, masks: StructureMasks | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(input_ids.shape[1], x.device, x.dtype)
        hz = None if masks is None else masks.hidden
        if hz is not None:
            x = x * hz.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks.for_layer(i) if masks is not None else None)
        return self.norm(x, hz)


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids, masks=None) -> logits [B, S, V]` (or the hidden states, or chunked losses)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.shape.d_model, cfg.shape.vocab_size, bias=False)
        self.reset_parameters()

    def tie_weights(self) -> None:
        if self.config.shape.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HF-style init: N(0, initializer_range) for matrices, zeros for biases, ones for norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.tie_weights()

    @property
    def shape(self):
        return self.config.shape

    def forward(self, input_ids: torch.Tensor, masks: StructureMasks | None = None, *,
                targets: torch.Tensor | None = None, soft_targets: SoftTargets | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS, output: str = "logits") -> torch.Tensor | LossSums:
        """`output`: 'logits' [B, S, V]; 'hidden' (the final norm's output [B, S, D], what a teacher hands
        its student); 'losses' (`LossSums` against `targets` [B, S] and optional `soft_targets`, the LM
        head run a chunk of tokens at a time: no [tokens, vocab] tensor of the whole batch). Giving
        `targets` means 'losses'. The losses are computed here, inside the forward, so that under FSDP2
        the LM-head weight is the gathered one and its gradient goes the usual way."""
        if masks is not None and masks.is_empty():
            masks = None
        h = self.model(input_ids, masks)
        if targets is not None or output == "losses":
            if targets is None:
                raise ValueError("output='losses' needs targets")
            return chunked_losses(h, self.lm_head.weight, targets, soft_targets, chunk_tokens)
        if output == "hidden":
            return h
        if output != "logits":
            raise ValueError(f"output must be 'logits', 'hidden' or 'losses', got {output!r}")
        return self.lm_head(h)

    def compile_layers(self, backend: str = "inductor") -> None:
        """torch.compile every decoder layer (see `DecoderLayer.compile_layer`); the embeddings, the final norm
        and the chunked LM head + loss stay eager."""
        import torch._dynamo.config as dynamo_config

        # one graph per distinct input signature (masked / unmasked, train / eval, last partial batch)
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
        for layer in self.model.layers:
            layer.compile_layer(backend)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        for layer in self.model.layers:
            layer.checkpoint_activations = enabled
