"""Test driver for real multi-process runs: train.py's `main` plus a recorder callback.

    composer -n N tests/_mp_driver.py OUT_DIR CONFIG.yaml key=value ...

writes OUT_DIR/rank{r}.json per rank: the global sample ids of every batch this rank trained on,
the masks this rank sampled in step 1 (pruning), the per-domain eval losses of every evaluation,
and the train sampler's proportion history. `DRIVER_KILL_AT=N` SIGKILLs rank 1 at the start of
batch N (a node lost mid-run; the launcher then stops the other ranks).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from composer.core import Callback
from composer.utils import dist

from llmshearing.data.dynamic import find_dynamic_sampler
from llmshearing.train import main


class Recorder(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.kill_at = int(os.environ.get("DRIVER_KILL_AT", "-1"))
        self.rec: dict = {"ids": {}, "masks_step1": [], "evals": [], "proportion_history": None}
        self._hooked = False

    def _hook_masks(self, state) -> None:
        from llmshearing.callbacks.pruning import find_l0

        try:
            _, l0 = find_l0(state.model)
        except ValueError:
            return

        def hook(module, args, output) -> None:
            if module.training and module.step == 1:
                masks = output[0]
                self.rec["masks_step1"].append({k: v.detach().flatten().tolist() for k, v in masks.items()})

        l0.register_forward_hook(hook)

    def fit_start(self, state, logger) -> None:
        if not self._hooked:
            self._hook_masks(state)
            self._hooked = True

    def batch_start(self, state, logger) -> None:
        b = int(state.timestamp.batch)
        if b == self.kill_at and dist.get_global_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        self.rec["ids"][b] = state.batch["idx"].tolist()

    def eval_after_all(self, state, logger) -> None:
        losses = {label: float(m["LanguageCrossEntropy"].compute()) for label, m in state.eval_metrics.items()}
        self.rec["evals"].append({"batch": int(state.timestamp.batch), "losses": losses})

    def eval_standalone_end(self, state, logger) -> None:  # eval_first
        self.eval_after_all(state, logger)

    def fit_end(self, state, logger) -> None:
        sampler = find_dynamic_sampler(state.train_dataloader)
        self.rec["proportion_history"] = sampler.proportion_history
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{dist.get_global_rank()}.json").write_text(json.dumps(self.rec))


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], extra_callbacks=[Recorder(Path(sys.argv[1]))]))
