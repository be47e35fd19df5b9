"""ComposerModel wrapper: next-token loss (chunked, `models.losses`), LM metrics, and the hook for a
pruning (L0) module.

The L0 module is a separate child (`self.l0`) so that FSDP wraps it as its own unit (which it
keeps in fp32) and so that its `forward()` runs inside the model forward, where FSDP has gathered
its parameters. The Lagrangian term is computed there and handed out in `outputs`; the pruning
callback adds it to the loss (Composer calls `loss()` on the unwrapped model, outside FSDP).

Contract for `l0` (see `llmshearing.pruning.l0.L0Module`):
    l0() -> (StructureMasks, lagrangian: Tensor | None)   # stochastic in train mode
"""

from __future__ import annotations

from typing import Any

import torch
from composer.metrics import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import nn

from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM
from llmshearing.models.losses import DEFAULT_CHUNK_TOKENS, shift_targets


class SummedCrossEntropy(LanguageCrossEntropy):
    """Composer's LanguageCrossEntropy (same states, all-reduced as sums), updated from the loss sums the
    chunked forward already made instead of from logits. Through `update()`, so torchmetrics counts the
    update (otherwise every `compute()` warns that it ran before `update`)."""

    def update(self, ce_sum: torch.Tensor, n_tokens: torch.Tensor) -> None:  # type: ignore[override]
        self.sum_loss += ce_sum.detach().float()
        self.total_items += n_tokens.detach()


class SummedPerplexity(SummedCrossEntropy, LanguagePerplexity):
    """exp of the token-mean cross entropy (LanguagePerplexity's compute), same update."""


#: the key of a micro-batch under which the distillation callback hands the teacher's SoftTargets to forward
SOFT_TARGETS = "soft_targets"


class ComposerLlama(ComposerModel):
    def __init__(self, cfg: ModelConfig | None = None, l0: nn.Module | None = None,
                 model: LlamaForCausalLM | None = None, loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().__init__()
        if model is None:
            if cfg is None:
                raise ValueError("ComposerLlama needs a ModelConfig or a model")
            model = LlamaForCausalLM(cfg)
        self.model = model
        self.l0 = l0
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        self.train_metrics = {"LanguageCrossEntropy": SummedCrossEntropy()}
        self.eval_metrics = {"LanguageCrossEntropy": SummedCrossEntropy(), "LanguagePerplexity": SummedPerplexity()}

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The loss sums of the batch (see `models.losses`: the LM head and the losses a chunk of tokens at
        a time, the teacher's soft targets when the batch carries them), never the full logits."""
        masks, lag = None, None
        if self.l0 is not None:
            masks, lag = self.l0()
        targets = batch.get("labels")
        if targets is None:
            targets = shift_targets(batch["input_ids"])
        sums = self.model(batch["input_ids"], masks, targets=targets, soft_targets=batch.get(SOFT_TARGETS),
                          chunk_tokens=self.loss_chunk_tokens)
        return {"ce_sum": sums.ce_sum, "n_tokens": sums.n_tokens, "kd_sum": sums.kd_sum, "lagrangian": lag}

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Token means: 'ce_loss' (and 'kd_loss' when distilling; the distillation callback mixes it into
        'total')."""
        n = outputs["n_tokens"].clamp_min(1)
        ce = outputs["ce_sum"] / n
        out = {"ce_loss": ce, "total": ce}
        if outputs.get("kd_sum") is not None:
            out["kd_loss"] = outputs["kd_sum"] / n
        return out

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> dict[str, Any]:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: dict[str, Any], metric) -> None:
        """LanguageCrossEntropy / LanguagePerplexity are a summed loss over a token count (their states,
        all-reduced as sums); the forward already made both sums, chunk by chunk."""
        if not isinstance(metric, SummedCrossEntropy):
            raise TypeError(f"ComposerLlama updates its own summed metrics only, got {type(metric).__name__}")
        metric.update(outputs["ce_sum"], outputs["n_tokens"])

    def flops_per_batch(self, batch: dict[str, Any]) -> int:
        """Training FLOPs of one batch, llm-foundry convention: 3 x forward, forward = 2 FLOPs per
        weight per token (the input-embedding lookup excluded; a tied lm_head counted) plus
        attention 2 * 2 * n_layers * q_dim * S^2 per sequence (no causal discount)."""
        s = self.model.config.shape
        bsz, seq = batch["input_ids"].shape[:2]
        weights = s.n_params() - (0 if s.tie_embeddings else s.vocab_size * s.d_model)
        per_seq = 2 * weights * seq + 4 * s.n_layers * s.q_dim * seq * seq
        return int(3 * per_seq * bsz)
