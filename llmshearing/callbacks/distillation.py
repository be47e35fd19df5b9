"""DistillationCallback: a frozen teacher's logits as extra targets (see `llmshearing.distill`).

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
- AFTER_FORWARD (every microbatch): the teacher's logits for the same rows, without gradients, in
  the run's precision.
- AFTER_LOSS: loss['kd_loss'] = T^2 KL, loss['total'] += alpha * (kd_loss - ce_loss), i.e.
  total = (1 - alpha) * CE + alpha * KD (+ the Lagrangian when pruning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from composer.core import Callback, State, get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshearing.convert.model_source import load_source_model
from llmshearing.distill import Divergence, distillation_loss
from llmshearing.models.composer_model import next_token_loss_sum, shift_targets

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
        self._logits: torch.Tensor | None = None

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
    def after_forward(self, state: State, logger: Logger) -> None:
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            self._logits = self.teacher(state.batch["input_ids"])

    def after_loss(self, state: State, logger: Logger) -> None:
        loss, outputs = state.loss, state.outputs
        if not isinstance(loss, dict) or "total" not in loss or "ce_loss" not in loss:
            raise TypeError("DistillationCallback expects the model's loss() to return {'ce_loss', 'total', ...}")
        targets = shift_targets(state.batch["input_ids"])
        kd = distillation_loss(outputs["logits"], self._logits, targets, self.temperature, self.divergence)
        self._logits = None
        loss["kd_loss"] = kd
        loss["total"] = loss["total"] + self.alpha * (kd - loss["ce_loss"])

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
                with get_precision_context(state.precision, state.precision_config):
                    logits = self.teacher(ids)
                real = max(0, min(len(ids), n_real - start))
                if real:
                    ce, n = next_token_loss_sum(logits[:real], ids[:real])
                    total[0] += ce.double()
                    total[1] += n
            dist.all_reduce(total, reduce_operation="SUM")
            out[evaluator.label] = float(total[0] / total[1])
        return out


def _vocab_size(model: torch.nn.Module) -> int:
    m = model
    while not hasattr(m, "config") and hasattr(m, "module"):
        m = m.module
    return m.config.shape.vocab_size
