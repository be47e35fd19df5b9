"""PruningCallback: glues the L0Module to the Composer Trainer.

- BATCH_START: tell the L0 module the current step (completed batches) for the sparsity warm-up, and
  the global index of this rank's first microbatch (keys the mask noise, see `L0Module`).
- AFTER_LOSS: add the Lagrangian (computed inside the model forward, where FSDP has gathered the L0
  parameters, and returned as `outputs['lagrangian']`) to the loss dict as 'lag_loss' and 'total'.
- BATCH_END (after the optimizer step): clamp log_alpha into range (in place, no host sync); on
  logging steps only (every `log_interval` batches), log `L0Module.stats()`: those floats are host
  syncs (and an all-gather under FSDP2), which a GPU step should not wait for every batch.
- EVAL_START: eval must use deterministic masks; the model is in eval mode, and the module's
  `eval_target_model` picks the "current expected" or the exact target model.
- EVAL_AFTER_ALL (once per eval round, whatever the number of evaluators): rank 0 saves the
  deterministic masks to `<save_folder>/masks/masks_ba{step}.pt`.

Mask file format (torch.save of a dict):
    {'step': int,                      # completed batches
     'masks': {name: Tensor},          # StructureMasks.state_dict() of the exact-target masks (cuttable)
     'eval_masks': {name: Tensor},     # the masks this eval used (eval_target_model decides)
     'eval_target_model': bool}
Load with `StructureMasks.from_state_dict(torch.load(f)['masks'])`.

Under FSDP2 the L0 module is its own (fp32) unit whose parameters are DTensor shards outside forward;
`clamp_` works on the local shards, and stats and masks are read inside `full_l0_params` (an
all-gather of that unit alone, a few KB, run on every rank since it is a collective).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.models.sharding import full_params
from llmshearing.pruning.l0 import L0Module, unwrap_l0

log = logging.getLogger(__name__)


def find_l0(model: torch.nn.Module) -> tuple[torch.nn.Module, L0Module]:
    """(the `.l0` child as attached to the model, possibly FSDP-wrapped; the L0Module itself)."""
    m = model
    while getattr(m, "l0", None) is None and hasattr(m, "module"):
        m = m.module
    wrapped = getattr(m, "l0", None)
    if wrapped is None:
        raise ValueError("PruningCallback needs a model with an L0 module (`model.l0`); got none")
    return wrapped, unwrap_l0(wrapped)


@contextlib.contextmanager
def full_l0_params(model: torch.nn.Module) -> Iterator[L0Module]:
    """Yield the L0Module with its whole parameters (under FSDP2 an all-gather of that unit alone,
    a collective every rank enters); a no-op without FSDP."""
    wrapped, l0 = find_l0(model)
    with full_params(wrapped):
        yield l0


class PruningCallback(Callback):
    def __init__(self, save_folder: str | os.PathLike | None = None, log_interval: int = 1) -> None:
        self.save_folder = None if save_folder is None else Path(save_folder)
        self.log_interval = max(1, int(log_interval))

    # ---- training --------------------------------------------------------------------------
    def batch_start(self, state: State, logger: Logger) -> None:
        batch = state.batch
        rows = int(batch["input_ids"].shape[0]) if isinstance(batch, dict) else 0
        micro = state.device_train_microbatch_size
        per_rank = math.ceil(rows / micro) if rows and isinstance(micro, int) and micro > 0 else 1
        find_l0(state.model)[1].set_step(state.timestamp.batch.value, dist.get_global_rank() * per_rank)

    def after_loss(self, state: State, logger: Logger) -> None:
        outputs = state.outputs
        lag = outputs.get("lagrangian") if isinstance(outputs, dict) else None
        if lag is None:
            return
        loss = state.loss
        if not isinstance(loss, dict) or "total" not in loss:
            raise TypeError("PruningCallback expects the model's loss() to return a dict with a 'total' key, "
                            f"got {type(loss).__name__}")
        loss["lag_loss"] = lag
        loss["total"] = loss["total"] + lag

    def batch_end(self, state: State, logger: Logger) -> None:
        _, l0 = find_l0(state.model)
        l0.clamp_()  # in place on this rank's (shard of the) logits
        step = state.timestamp.batch.value  # completed batches, after this one
        if step % self.log_interval:
            return
        with full_l0_params(state.model) as l0:
            stats = l0.stats(step)
        logger.log_metrics({f"pruning/{k}": v for k, v in stats.items()})

    # ---- evaluation --------------------------------------------------------------------------
    def eval_start(self, state: State, logger: Logger) -> None:
        _, l0 = find_l0(state.model)
        if l0.training:  # Composer puts the model in eval mode; make sure the masks follow
            l0.eval()

    def eval_after_all(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch.value
        with full_l0_params(state.model) as l0:
            target_masks = l0.deterministic_masks(target=True).state_dict()
            eval_masks = l0.deterministic_masks(target=l0.eval_target_model).state_dict()
            eval_target = l0.eval_target_model
        if self.save_folder is None or dist.get_global_rank() != 0:
            return
        path = self.save_folder / "masks" / f"masks_ba{step}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "masks": target_masks, "eval_masks": eval_masks,
                    "eval_target_model": eval_target}, path)
        log.info("saved deterministic masks of step %d to %s", step, path)

    def eval_standalone_end(self, state: State, logger: Logger) -> None:  # `Trainer.eval()`, e.g. eval_first
        self.eval_after_all(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the step comes from the timestamp; masks and lambdas are model parameters
