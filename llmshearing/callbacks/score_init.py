"""ScoreInitCallback (`pruning.init: scores`): start the L0 masks from importance scores measured on the
run's own train data, before the first step or evaluation.

When: at FIT_START, or at the standalone evaluation a run makes before it (`eval_first`), whichever
comes first; never on a resumed run (batch > 0: its masks come from the checkpoint). Not earlier
(AFTER_LOAD), because under DDP ranks > 0 hold their model weights only once DDP's wrap has
broadcast rank 0's.

Calibration rows: `n_batches` global batches of the train data, drawn as the first
n_batches * global_batch_size ids of a permutation of all train rows seeded by the run's seed
(domains in proportion to their row counts; independent of the loader's cursors, which it does not
touch). Rank r scores rows [r * B/W, (r + 1) * B/W) of every global batch, in micro-batches; the
scores are all-reduced (`pruning.scores`), so every world size gives the same scores and every rank
writes the same logits (under FSDP2 its own shard of them).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.callbacks.pruning import find_l0
from llmshearing.pruning.score_init import DEFAULT_MARGIN, init_from_scores_
from llmshearing.pruning.scores import score_rows

log = logging.getLogger(__name__)


def _llama(model: torch.nn.Module):
    m = model
    while not hasattr(m, "l0") and hasattr(m, "module"):  # DDP
        m = m.module
    return m.model


class ScoreInitCallback(Callback):
    def __init__(self, n_batches: int, global_batch_size: int, microbatch_size: int, seed: int,
                 margin: float = DEFAULT_MARGIN) -> None:
        if n_batches < 1:
            raise ValueError(f"score init needs >= 1 calibration batch, got {n_batches}")
        self.n_batches, self.global_batch_size = int(n_batches), int(global_batch_size)
        self.microbatch_size, self.seed, self.margin = int(microbatch_size), int(seed), float(margin)
        self.done = False
        self.scores = None  # kept for tests and reports

    def fit_start(self, state: State, logger: Logger) -> None:
        self._init(state, logger)

    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        self._init(state, logger)

    def _init(self, state: State, logger: Logger) -> None:
        if self.done:
            return
        self.done = True
        if int(state.timestamp.batch) > 0:
            log.info("score init skipped: resumed at batch %d (masks come from the checkpoint)",
                     int(state.timestamp.batch))
            return
        model = _llama(state.model)
        scores = score_rows(model, state.train_dataloader.dataset, self.n_batches, self.global_batch_size,
                            self.microbatch_size, self.seed, dist.get_global_rank(), dist.get_world_size(),
                            progress=dist.get_global_rank() == 0)
        _, l0 = find_l0(state.model)
        init_from_scores_(l0, scores, margin=self.margin)
        self.scores = scores
        log.info("score init: L0 masks start from importance scores over %d calibration batches (%d tokens), "
                 "margin %.2f", self.n_batches, scores.tokens, self.margin)
        logger.log_metrics({"pruning/score_init_tokens": scores.tokens})

    def state_dict(self) -> dict[str, Any]:
        return {}
