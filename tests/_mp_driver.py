"""Test driver for real multi-process runs: train.py's `main` plus a recorder callback.

    composer -n N tests/_mp_driver.py OUT_DIR CONFIG.yaml key=value ...

writes OUT_DIR/rank{r}.json per rank: the global sample ids of every batch this rank trained on,
the masks this rank sampled in step 1 (pruning), the per-domain eval losses of every evaluation,
the train sampler's proportion history, and the shape this rank holds of every parameter (its FSDP2
shard, or the whole tensor). `DRIVER_KILL_AT=N` SIGKILLs rank 1 at the start of
batch N (a node lost mid-run; the launcher then stops the other ranks). Fault injection for
tests/test_faults.py: `DRIVER_KILL_IN_SAVE=N` SIGKILLs rank 0 halfway through writing the checkpoint
of batch N; `DRIVER_ENOSPC_AT=N` makes that write fail with ENOSPC after half the bytes (disk
full); `DRIVER_NAN_AT=N` turns the model's weights into NaN at the start of batch N.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from composer.core import Callback
from composer.utils import dist

from llmshearing.data.dynamic import find_dynamic_sampler
from llmshearing.training.entry import main


class Recorder(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.kill_at = int(os.environ.get("DRIVER_KILL_AT", "-1"))
        self.nan_at = int(os.environ.get("DRIVER_NAN_AT", "-1"))
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
        if b == self.nan_at:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.fill_(float("nan"))
        self.rec["ids"][b] = state.batch["idx"].tolist()

    def batch_end(self, state, logger) -> None:
        if "params" in self.rec:
            return
        # what this rank holds of every parameter (after backward, when FSDP2 has resharded every unit):
        # FSDP2 shards are DTensors (local part, placement)
        from torch.distributed.tensor import DTensor

        self.rec["params"] = {
            n: {"full": list(p.shape), "local": list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape),
                "placements": [str(x) for x in p.placements] if isinstance(p, DTensor) else None}
            for n, p in state.model.named_parameters()}

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


def _inject_save_faults() -> None:
    """Replace Composer's checkpoint-file writer so that the save of the chosen batch stops halfway."""
    from composer.utils import checkpoint

    kill_at, enospc_at = os.environ.get("DRIVER_KILL_IN_SAVE"), os.environ.get("DRIVER_ENOSPC_AT")
    if not (kill_at or enospc_at):
        return
    at = kill_at or enospc_at
    write = checkpoint._write_checkpoint_file

    def faulty(state_dict, filename: str) -> None:
        if f"-ba{at}-" not in os.path.basename(filename):
            return write(state_dict, filename)
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        with open(filename, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        if kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    checkpoint._write_checkpoint_file = faulty


if __name__ == "__main__":
    _inject_save_faults()
    sys.exit(main(sys.argv[2:], extra_callbacks=[Recorder(Path(sys.argv[1]))]))
