"""FinishGradients: what happens to the gradients between the last backward and the optimizer step.

1. On CPU (gloo) under FSDP2, turn summed gradients into averaged ones. FSDP2 reduce-scatters fp32
   gradients with ReduceOp.AVG, which gloo silently runs as a SUM (pytorch/pytorch#162338, open; torch
   2.7): every gradient arrives world_size times too large. Adam hides it (a scale-invariant update),
   gradient clipping does not: a 2-rank distilled run drifted from the 1-rank run by 1e-2 until this was
   fixed. NCCL (GPU) runs are unaffected and skip this.
2. Clip the global gradient norm (`sharding.clip_grad_norm_`: plain tensors and DTensor shards alike).
   Composer 0.32.1's GradientClipping does nothing under FSDP2: with FSDP enabled it only looks for
   FSDP1 root modules and calls their `clip_grad_norm_`.

One algorithm, not two, because Composer runs the algorithms of an AFTER_* event in reverse order of
the list (its FILO pass); here the order matters. It runs at AFTER_TRAIN_BATCH: after all
micro-batches, before the optimizer step, where Composer's clipping ran.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from llmshearing.models.sharding import average_summed_grads_, clip_grad_norm_


class FinishGradients(Algorithm):
    def __init__(self, max_norm: float | None, divide_by: int = 1) -> None:
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.divide_by = int(divide_by)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    @torch.no_grad()
    def apply(self, event: Event, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        average_summed_grads_(params, self.divide_by)
        if self.max_norm is not None:
            clip_grad_norm_(params, self.max_norm)
