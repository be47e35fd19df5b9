"""LossGuard: stop a run whose training loss stops being a number, with the step, and keep what a
user needs to look into it (when pruning, the L0 state: mask logits and multipliers).

It reads the loss Composer has already all-reduced and copied to the host for logging
(`state.total_loss_dict`), so it adds no device sync and every rank stops at the same batch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.callbacks.pruning import find_l0, full_l0_params


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names the batch and what was saved."""


class LossGuard(Callback):
    def __init__(self, save_folder: str | Path) -> None:
        self.save_folder = Path(save_folder)

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = state.total_loss_dict or {}
        bad = {k: v for k, v in losses.items() if not math.isfinite(float(v))}
        if not bad:
            return
        step = int(state.timestamp.batch)
        saved = ""
        try:
            find_l0(state.model)
        except ValueError:
            pass
        else:
            with full_l0_params(state.model) as l0:  # whole tensors (FSDP2's state_dict would give shards)
                l0_state = {k: v.detach().cpu().clone() for k, v in l0.named_parameters()}
            path = self.save_folder / "masks" / f"l0_state_nonfinite_ba{step}.pt"
            if dist.get_global_rank() == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"step": step, "l0_state": l0_state, "losses": losses}, path)
            # every rank stops at this batch: none may exit (and have the launcher kill rank 0) before the file exists
            dist.barrier()
            saved = f"; the mask logits and multipliers after that step are in {path}"
        raise NonFiniteLossError(f"training loss is not finite at batch {step}: "
                                 + ", ".join(f"{k}={v}" for k, v in bad.items())
                                 + f"{saved}; checkpoints up to the last save_interval are intact (lower optimizer.lr "
                                 "or pruning.lag_lr, then relaunch)")
