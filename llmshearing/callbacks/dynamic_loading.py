"""Dynamic batch loading (Sheared-LLaMA §6): move data toward domains whose loss lags its reference.

After each evaluation the per-domain eval losses (one Composer Evaluator per domain, label = the
domain name) update the domain weights with an exponentiated-gradient step:

    Delta_i = max(loss_i - ref_i, 0)        (paper; raw difference if clip_negative=False, as the ref code)
    alpha   = softmax(log w + eta * Delta)
    w_new   = (1 - c) * alpha + c / n        (c = smoothing), renormalised in float64

The new weights are pushed to the `DynamicBatchSampler` in the main process for the first batch
after the evaluation: an evaluation after b trained batches changes the mixture from batch index b
on (lag 0), whatever num_workers and prefetch_factor are (the loader redraws prefetched batches), and
the switch is recorded in the sampler's proportion history. The sampler is the single
source of truth for the weights (it is checkpointed via the train dataset's state), so after a
resume the callback simply reads them back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger

from llmshearing.data.dynamic import find_dynamic_sampler
from llmshearing.data.sampler import DynamicBatchSampler, per_domain

log = logging.getLogger(__name__)

#: doremi: exponentiated gradient against the given reference losses; teacher_gap: the same rule with
#: the teacher's own eval losses (+ offsets) as the references (set by the distillation callback);
#: constant: the yaml's mixture, fixed; stratified: fixed at the domains' token shares (the loader is
#: built with them). The last two are the baselines every mixing method should be compared with.
UPDATES = ("doremi", "teacher_gap", "constant", "stratified")
_FIXED = ("constant", "stratified")


def doremi_update(weights: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray,
                  ref_losses: Sequence[float] | np.ndarray, eta: float = 1.0, smoothing: float = 1e-4,
                  clip_negative: bool = True) -> np.ndarray:
    """One exponentiated-gradient step on the domain weights (pure; float64 in and out)."""
    w = np.asarray(weights, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    ref = np.asarray(ref_losses, dtype=np.float64)
    if not (w.shape == loss.shape == ref.shape) or w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights, losses and ref_losses need one value per domain, got shapes "
                         f"{w.shape}, {loss.shape}, {ref.shape}")
    if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(ref))):
        raise ValueError(f"losses must be finite, got losses={loss.tolist()} ref_losses={ref.tolist()}")
    if np.any(w < 0) or not np.isclose(w.sum(), 1.0, atol=1e-6):
        raise ValueError(f"weights must be >= 0 and sum to 1, got {w.tolist()}")
    delta = loss - ref
    if clip_negative:
        delta = np.maximum(delta, 0.0)
    with np.errstate(divide="ignore"):
        z = np.log(w) + eta * delta  # a zero weight stays zero unless smoothing > 0
    z = z - z.max()
    alpha = np.exp(z)
    alpha /= alpha.sum()
    new = (1.0 - smoothing) * alpha + smoothing / w.size
    return new / new.sum()


class DynamicLoadingCallback(Callback):
    """Updates the train sampler's domain proportions from per-domain eval losses.

    Args:
        domains: domain names, in the loader's order; each must be an Evaluator label.
        target_losses: reference loss per domain (sequence in `domains` order, or {domain: loss});
            may be None with update='constant' (the logged gaps are then the losses themselves).
        update: 'doremi' (exponentiated gradient) or 'constant' (log losses, keep weights).
        eta: step size (> 0). smoothing: c in [0, 1). clip_negative: use max(gap, 0) (paper).
        metric_name: eval metric read per domain.
    """

    def __init__(self, domains: Sequence[str], target_losses: Sequence[float] | Mapping[str, float] | None,
                 update: str = "doremi", eta: float = 1.0, smoothing: float = 1e-4, clip_negative: bool = True,
                 metric_name: str = "LanguageCrossEntropy",
                 target_offsets: Sequence[float] | Mapping[str, float] | None = None) -> None:
        domains = [str(d) for d in domains]
        if not domains:
            raise ValueError("domains: need at least one domain")
        dup = sorted({d for d in domains if domains.count(d) > 1})
        if dup:
            raise ValueError(f"domains: names must be unique, repeated: {dup}")
        if target_losses is None:
            # the fixed mixtures only log the per-domain losses; teacher_gap gets its references later
            if update not in (*_FIXED, "teacher_gap"):
                raise ValueError(f"target_losses: required for update={update!r} (one reference loss per domain)")
            target_losses = [0.0] * len(domains)
        targets = per_domain(target_losses, domains, "target_losses")
        try:
            targets = [float(t) for t in targets]
        except (TypeError, ValueError):
            raise ValueError(f"target_losses: must be numbers, got {targets}") from None
        if not all(math.isfinite(t) for t in targets):
            raise ValueError(f"target_losses: must be finite, got {targets}")
        if update not in UPDATES:
            raise ValueError(f"update: must be one of {UPDATES}, got {update!r}")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta: must be > 0, got {eta!r}")
        if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
            raise ValueError(f"smoothing: must be in [0, 1), got {smoothing!r}")
        self.domains = domains
        self.target_losses = np.asarray(targets, dtype=np.float64)
        offsets = per_domain(target_offsets, domains, "target_offsets") if target_offsets else [0.0] * len(domains)
        self.target_offsets = np.asarray([float(x) for x in offsets], dtype=np.float64)
        self.teacher_losses: dict[str, float] | None = None  # teacher_gap: set once, kept in the checkpoint
        self.update = update
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.clip_negative = bool(clip_negative)
        self.metric_name = metric_name
        self.num_updates = 0
        self.last_losses: dict[str, float] = {}
        self._losses: dict[str, float] = {}
        self._sampler: DynamicBatchSampler | None = None

    # ------------------------------------------------------------------ helpers
    def _get_sampler(self, state: State) -> DynamicBatchSampler:
        if self._sampler is None:
            sampler = find_dynamic_sampler(state.train_dataloader)
            if sampler is None:
                raise RuntimeError("DynamicLoadingCallback needs a train dataloader built by "
                                   "llmshearing.data.dynamic.build_train_dataloader (no DynamicBatchSampler found)")
            if list(sampler.domains) != self.domains:
                raise ValueError(f"domains: callback has {self.domains} but the train loader has {sampler.domains}")
            self._sampler = sampler
        return self._sampler

    @property
    def has_reference_losses(self) -> bool:
        return self.update != "teacher_gap" or self.teacher_losses is not None

    def set_reference_losses(self, losses: Mapping[str, float]) -> None:
        """teacher_gap: the teacher's per-domain eval losses (+ target_offsets) become the references."""
        self.teacher_losses = {d: float(losses[d]) for d in self.domains}
        self.target_losses = np.asarray([self.teacher_losses[d] for d in self.domains]) + self.target_offsets

    @property
    def weights(self) -> np.ndarray | None:
        """Current weights (read from the sampler, the single source of truth)."""
        return None if self._sampler is None else self._sampler.proportions

    # ------------------------------------------------------------------ events
    def fit_start(self, state: State, logger: Logger) -> None:
        self._get_sampler(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        sampler = self._get_sampler(state)
        # weights in effect for the batch just trained (timestamp already counts it)
        w = sampler.proportions_at(max(int(state.timestamp.batch) - 1, 0))
        logger.log_metrics({f"data/weight/{d}": float(x) for d, x in zip(self.domains, w)})

    def eval_before_all(self, state: State, logger: Logger) -> None:
        self._losses = {}

    def eval_end(self, state: State, logger: Logger) -> None:
        label = state.dataloader_label
        if label not in self.domains:
            return
        metrics = state.eval_metrics.get(label, {})
        if self.metric_name not in metrics:
            raise ValueError(f"metric_name: evaluator '{label}' has no metric {self.metric_name!r} "
                             f"(has {sorted(metrics)})")
        self._losses[label] = float(metrics[self.metric_name].compute())

    def eval_after_all(self, state: State, logger: Logger) -> None:
        missing = [d for d in self.domains if d not in self._losses]
        if missing:
            if self._losses:
                log.warning("dynamic loading: no eval loss for %s this round; weights unchanged", missing)
            return
        sampler = self._get_sampler(state)
        losses = np.array([self._losses[d] for d in self.domains])
        gaps = losses - self.target_losses
        old = sampler.proportions
        metrics: dict[str, float] = {}
        for d, l, g in zip(self.domains, losses, gaps):
            metrics[f"data/eval_loss/{d}"] = float(l)
            metrics[f"data/loss_gap/{d}"] = float(g)
        self.last_losses = {d: float(l) for d, l in zip(self.domains, losses)}
        if not np.all(np.isfinite(losses)):
            log.warning("dynamic loading: non-finite eval loss %s; weights unchanged", self.last_losses)
            logger.log_metrics(metrics)
            return
        if self.update not in _FIXED:
            if not self.has_reference_losses:
                raise RuntimeError("teacher_gap: no teacher eval losses yet (the distillation callback sets them "
                                   "at fit start)")
            new = doremi_update(old, losses, self.target_losses, self.eta, self.smoothing, self.clip_negative)
            at = int(state.timestamp.batch)
            from_batch = sampler.set_proportions(new, from_batch=at)
            self.num_updates += 1
            metrics["data/update/from_batch"] = float(from_batch)
            metrics["data/update/lag"] = float(from_batch - at)
            log.info("dynamic loading update %d at batch %d (applies from batch %d): %s", self.num_updates,
                     int(state.timestamp.batch), from_batch,
                     ", ".join(f"{d}: loss {l:.4f} gap {g:+.4f} w {a:.4f}->{b:.4f}"
                               for d, l, g, a, b in zip(self.domains, losses, gaps, old, new)))
        logger.log_metrics(metrics)

    # `Trainer.eval()` (run config `eval_first`) fires the standalone events instead of the *_all ones
    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        self.eval_before_all(state, logger)

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        self.eval_after_all(state, logger)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # The weights live in the sampler state (train dataset checkpoint); only bookkeeping here.
        return {"num_updates": self.num_updates, "last_losses": dict(self.last_losses),
                "teacher_losses": self.teacher_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state.get("num_updates", 0))
        self.last_losses = dict(state.get("last_losses", {}))
        if state.get("teacher_losses") is not None:  # a resumed teacher_gap run keeps its references
            self.set_reference_losses(state["teacher_losses"])
