"""What a demo run is given (DemoPlan: corpus size, steps, yaml overrides) and what its stages share
(Run: output folder, data, the common overrides, the step printer)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoPlan:
    chars_per_domain: int
    vocab_size: int
    source_steps: int
    prune_steps: int
    cpt_steps: int
    eval_seqs_per_domain: int
    # overrides of the tiny yamls for a real source (sequence length, batch, learning rates, device)
    overrides: tuple[str, ...] = ()
    prune_overrides: tuple[str, ...] = ()  # for the pruning run only


@dataclass
class Run:
    """What every stage needs: where, how long, the data, the step printer."""

    out: Path
    plan: DemoPlan
    t0: float
    data_root: Path | None = None
    seq_len: int = 0
    common: tuple[str, ...] = ()
    prune_extra: tuple[str, ...] = ()  # the target shape of a real source
    prune_init: str = "uniform"  # the pruning run's `pruning.init` (reported with the after-cut loss)

    def step(self, msg: str) -> None:
        print(f"[demo {time.time() - self.t0:6.1f}s] {msg}", flush=True)
