"""The script entry point (`composer train.py CONFIG.yaml key=value ...`): one line and a stated exit code
for what a user can fix (2: the config or the data; 1: training stopped), the same code from every rank."""

from __future__ import annotations

import errno
import os
import sys
import time

from composer.utils import dist

from llmshearing.callbacks.guard import NonFiniteLossError
from llmshearing.data.shared_memory import clean_stale_shared_memory
from llmshearing.logs import setup_logging
from llmshearing.training.config import ConfigError, load_config
from llmshearing.training.trainer import device_of, final_eval_losses, init_distributed, run

# How long a rank > 0 waits before exiting on an error every rank meets (a config error, a non-finite loss).
RANK0_FIRST_S = 10.0


def _exit_code(code: int) -> int:
    """The composer launcher returns rank 0's exit code, and when another rank exits first it stops rank 0
    with SIGTERM, so the job would end with 241 (-15) instead of the error's code, depending on which rank
    was faster. Every rank meets these errors, so ranks > 0 leave rank 0 a head start; the launcher then
    returns rank 0's code (and stops the waiting ranks)."""
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(RANK0_FIRST_S)
    return code


def main(argv: list[str] | None = None, extra_callbacks=()) -> int:
    """`composer -n N train.py CONFIG.yaml key=value ...`; `extra_callbacks` is for test drivers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: composer train.py CONFIG.yaml [key=value ...]   (or: python train.py ...)")
        return 0 if argv else 2
    setup_logging(timestamps=True)
    try:
        cfg = load_config(argv[0], argv[1:])
        init_distributed(device_of(cfg), cfg.dist_timeout)
        # Shared memory left by a crashed run (Streaming) would make this one hang or fail. Cleaned
        # after the process group exists (local rank 0 cleans, the others wait at a barrier), only the
        # prefixes no live process uses (other jobs on the node keep theirs), and only here at the
        # script entry point, before this process has datasets of its own.
        clean_stale_shared_memory()
        trainer = run(cfg, extra_callbacks=extra_callbacks)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return _exit_code(2)
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return _exit_code(1)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"training stopped: no space left on the device while writing {e.filename or 'a checkpoint'} "
              f"(save_folder {cfg.save_folder}); the checkpoints saved before are intact and `latest-rank0.pt` "
              "points at the newest complete one: free space, then relaunch the same command to resume",
              file=sys.stderr)
        return 1
    losses = final_eval_losses(trainer)
    if dist.get_global_rank() == 0:
        print("final eval loss per domain: " + ", ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        print(f"checkpoints: {cfg.save_folder}")
    trainer.close()
    return 0
