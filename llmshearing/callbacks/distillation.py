"""DistillationCallback: a frozen teacher's predictions as soft targets.

Since Sheared-LLaMA, structured pruning recovers best when the pruned student learns from the source
model's logits (Minitron; Llama-3.2 1B/3B) rather than from the LM loss alone. The student's loss is
(1 - alpha) * CE + alpha * T^2 * KL per token (`models.losses`: forward or reverse KL of the tempered
distributions). The teacher's own per-domain eval losses are the reference losses of teacher-gap mixing
(`dynamic_loading.update: teacher_gap`): the mixture steers to the domains where the student lags most.

The teacher lives in this callback, not in the trained model: it is then outside the optimizer
(no optimizer state), outside DDP (no gradient all-reduce), and outside the checkpoints (a 7B
teacher is not saved again with every student checkpoint; it is reloaded from `distill.teacher`).

- FIT_START (or the evaluation before it, `eval_first`): load the teacher (memory-mapped file, fp32
  master copy like the student's), freeze it (eval mode, requires_grad False), move it to the run's
  device; under FSDP, shard it like the student (`shard`: each decoder layer its own unit, in the
  run's mixed precision; only rank 0 reads the file, the others build on the meta device and receive
  their shards). With teacher-gap mixing, compute its per-domain eval
  losses on the run's eval rows once and hand them to the dynamic-loading callback (which keeps
  them in the checkpoint, so a resumed run does not recompute them).
- BEFORE_FORWARD (every microbatch): the teacher's final hidden states for the same rows, without
  gradients, in the run's precision, handed to the student's forward with the teacher's LM-head weight
  (`SoftTargets` in the micro-batch): the student computes both LM heads and the KL a chunk of tokens at
  a time (`models.losses`), so no [tokens, vocab] logits of the whole micro-batch exist. Under FSDP the
  teacher's root unit (embeddings, LM head) stays gathered until the student's backward is done (the
  chunks are recomputed there).
- AFTER_LOSS: loss['total'] += alpha * (kd_loss - ce_loss), i.e.
  total = (1 - alpha) * CE + alpha * KD (+ the Lagrangian when pruning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from composer.core import Callback, State, get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule

from llmshearing.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshearing.convert.model_source import load_source_model
from llmshearing.models.composer_model import SOFT_TARGETS
from llmshearing.models.losses import (
    IGNORE_INDEX,
    Divergence,
    SoftTargets,
    shift_targets,
)

log = logging.getLogger(__name__)


class DistillationCallback(Callback):
    # No checkpoint state of its own (Callback.state_dict is {}): the teacher is reloaded from
    # distill.teacher, and its eval losses live in the dynamic-loading callback's state.
    def __init__(self, teacher: str, alpha: float = 0.5, temperature: float = 1.0,
                 divergence: str = Divergence.forward_kl, teacher_gap: DynamicLoadingCallback | None = None,
                 eval_batch_size: int = 8, shard: Callable[[torch.nn.Module], None] | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher_path = str(teacher)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.divergence = Divergence(divergence)
        self.teacher_gap = teacher_gap
        self.eval_batch_size = int(eval_batch_size)
        self.shard = shard
        self.teacher: torch.nn.Module | None = None

    # ------------------------------------------------------------------ set-up
    def fit_start(self, state: State, logger: Logger) -> None:
        self._setup(state, logger)

    def eval_standalone_start(self, state: State, logger: Logger) -> None:  # eval_first runs before fit
        self._setup(state, logger)

    def _setup(self, state: State, logger: Logger) -> None:
        if self.teacher is None:
            self.teacher = self._load_teacher(state)
        if self.teacher_gap is not None and not self.teacher_gap.has_reference_losses:
            losses = self.teacher_eval_losses(state)
            log.info("teacher-gap mixing: the teacher's eval losses are the reference losses: %s",
                     ", ".join(f"{d}={v:.4f}" for d, v in losses.items()))
            self.teacher_gap.set_reference_losses(losses)
            logger.log_metrics({f"data/teacher_loss/{d}": v for d, v in losses.items()})

    def _load_teacher(self, state: State) -> torch.nn.Module:
        student = state.model
        weights = self.shard is None or dist.get_global_rank() == 0
        teacher = load_source_model(self.teacher_path, dtype=torch.float32, weights=weights)
        teacher.eval().requires_grad_(False)
        if teacher.config.shape.vocab_size != _vocab_size(student):
            raise ValueError(f"distill.teacher {self.teacher_path}: vocabulary {teacher.config.shape.vocab_size} "
                             f"differs from the student's {_vocab_size(student)}")
        if self.shard is not None:
            self.shard(teacher)
        else:
            teacher = state.device.module_to_device(teacher)
        n = teacher.config.shape.n_params()
        log.info("distillation: teacher %s (%s parameters) frozen, alpha=%s T=%s %s", self.teacher_path, f"{n:,}",
                 self.alpha, self.temperature, self.divergence.value)
        return teacher

    # ------------------------------------------------------------------ training
    def before_forward(self, state: State, logger: Logger) -> None:
        if isinstance(self.teacher, FSDPModule):
            self.teacher.unshard()  # kept until after_backward: the LM-head chunks are recomputed in backward
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            hidden = self.teacher(state.batch["input_ids"], output="hidden")
        state.batch[SOFT_TARGETS] = SoftTargets(hidden, self.teacher.lm_head.weight, self.temperature,
                                                self.divergence)

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss
        if not isinstance(loss, dict) or not {"ce_loss", "kd_loss", "total"} <= set(loss):
            raise TypeError("DistillationCallback expects the model's loss() to return {'ce_loss', 'kd_loss', "
                            "'total', ...} (the student's forward gets the teacher's soft targets)")
        loss["total"] = loss["total"] + self.alpha * (loss["kd_loss"] - loss["ce_loss"])

    def after_backward(self, state: State, logger: Logger) -> None:
        state.batch.pop(SOFT_TARGETS, None)
        if isinstance(self.teacher, FSDPModule):
            self.teacher.reshard()

    # ------------------------------------------------------------------ teacher-gap references
    @torch.no_grad()
    def teacher_eval_losses(self, state: State) -> dict[str, float]:
        """Token-mean next-token loss of the teacher on each domain's eval rows, every row once: each
        rank reads the rows its DistributedSampler deals it and the sums are all-reduced. The sampler
        pads the ranks to equal length with repeats at the end of the list: they are run (under FSDP
        every rank must make the same forwards, which are collectives) but not counted."""
        out = {}
        for evaluator in state.evaluators:
            loader = evaluator.dataloader.dataloader
            sampler, dataset = loader.sampler, loader.dataset
            world, rank = dist.get_world_size(), dist.get_global_rank()
            rows = list(sampler)
            n_real = sum(1 for i in range(len(rows)) if i * world + rank < len(dataset))  # a prefix of `rows`
            total = state.device.tensor_to_device(torch.zeros(2, dtype=torch.float64))
            for start in range(0, len(rows), self.eval_batch_size):
                ids = torch.stack([dataset[j]["input_ids"] for j in rows[start:start + self.eval_batch_size]])
                ids = state.device.tensor_to_device(ids)
                targets = shift_targets(ids)
                targets[max(0, n_real - start):] = IGNORE_INDEX  # the padding repeats
                with get_precision_context(state.precision, state.precision_config):
                    sums = self.teacher(ids, targets=targets)
                total[0] += sums.ce_sum.double()
                total[1] += sums.n_tokens
            dist.all_reduce(total, reduce_operation="SUM")
            out[evaluator.label] = float(total[0] / total[1])
        return out


def _vocab_size(model: torch.nn.Module) -> int:
    m = model
    while not hasattr(m, "config") and hasattr(m, "module"):
        m = m.module
    return m.config.shape.vocab_size
