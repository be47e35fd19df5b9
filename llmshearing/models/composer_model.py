"""ComposerModel wrapper: next-token loss, LM metrics, and the hook for a pruning (L0) module.

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
import torch.nn.functional as F
from composer.metrics import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import nn

from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM


def shift_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t predicts token t+1; the last position is ignored."""
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def next_token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed fp32 next-token cross-entropy, number of predicted tokens) of one batch: the two sums of
    a token-mean eval loss over many batches (or ranks)."""
    t = shift_targets(input_ids)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), t.reshape(-1), ignore_index=-100,
                         reduction="sum")
    return ce, (t != -100).sum()


class ComposerLlama(ComposerModel):
    def __init__(self, cfg: ModelConfig | None = None, l0: nn.Module | None = None,
                 model: LlamaForCausalLM | None = None) -> None:
        super().__init__()
        if model is None:
            if cfg is None:
                raise ValueError("ComposerLlama needs a ModelConfig or a model")
            model = LlamaForCausalLM(cfg)
        self.model = model
        self.l0 = l0
        self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy()}
        self.eval_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(), "LanguagePerplexity": LanguagePerplexity()}

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        masks, lag = None, None
        if self.l0 is not None:
            masks, lag = self.l0()
        logits = self.model(batch["input_ids"], masks)
        return {"logits": logits, "lagrangian": lag}

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        targets = batch.get("labels")
        if targets is None:
            targets = shift_targets(batch["input_ids"])
        logits = outputs["logits"]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return {"ce_loss": ce, "total": ce}

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> dict[str, Any]:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: dict[str, Any], metric) -> None:
        targets = batch.get("labels")
        if targets is None:
            targets = shift_targets(batch["input_ids"])
        logits = outputs["logits"]
        metric.update(logits.reshape(-1, logits.size(-1)).contiguous(), targets.reshape(-1).contiguous())

    def flops_per_batch(self, batch: dict[str, Any]) -> int:
        """Training FLOPs of one batch, llm-foundry convention: 3 x forward, forward = 2 FLOPs per
        weight per token (the input-embedding lookup excluded; a tied lm_head counted) plus
        attention 2 * 2 * n_layers * q_dim * S^2 per sequence (no causal discount)."""
        s = self.model.config.shape
        bsz, seq = batch["input_ids"].shape[:2]
        weights = s.n_params() - (0 if s.tie_embeddings else s.vocab_size * s.d_model)
        per_seq = 2 * weights * seq + 4 * s.n_layers * s.q_dim * seq * seq
        return int(3 * per_seq * bsz)
