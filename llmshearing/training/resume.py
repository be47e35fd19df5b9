"""Before a run resumes from its save folder: the checkpoint it resumes from is complete, and the
config has not changed in ways a resume cannot honour.

Composer resumes from the `latest-rank0.pt` link. It writes a checkpoint file (or, sharded, a folder
of per-rank files) in place and then re-points the link (remove + create), so a process killed while
saving can leave a half-written `ep*-ba*-rank0.pt` / `ep*-ba*/` (never linked) or, between the two link
operations, no link at all; the run would then start from scratch. `repair_latest_link` re-points a missing or dangling link to the
newest checkpoint that is complete (a torch zip file whose central directory was written last).

A resume with another global batch, seq_len, domain list, pruning target or seed would silently
train on different data, or fail deep inside a load; `check_unchanged` refuses it with the key and
both values, before any step.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from llmshearing.convert.checkpoint import (
    DCP_METADATA,  # written by torch.distributed.checkpoint after every shard
)

log = logging.getLogger(__name__)

LATEST = "latest-rank0.pt"
SAVED_CONFIG = "config.yaml"
#: a full checkpoint file, or the folder of a sharded one (FSDP `state_dict_type: sharded`)
_CKPT = re.compile(r"ep(\d+)-ba(\d+)(-rank0\.pt)?$")
#: keys a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("global_train_batch_size", "seed", "data.domains", "data.seq_len", "pruning.target", "pruning.modules")


def _complete(p: Path) -> bool:
    """torch.save writes a file's zip directory last; a sharded save writes its .metadata last."""
    return (p / DCP_METADATA).is_file() if p.is_dir() else p.is_file() and zipfile.is_zipfile(p)


def repair_latest_link(folder: str | Path) -> Path | None:
    """Move half-written checkpoints aside (`<name>.incomplete`: Composer would refuse to save over
    them, and they must never be resumed from), and point latest-rank0.pt at the newest complete
    checkpoint (file or sharded folder) when it is missing or dangling; returns the checkpoint it
    points to (None: nothing to resume from)."""
    folder = Path(folder)
    complete = []  # (batch, path)
    for p in folder.glob("ep*-ba*"):
        m = _CKPT.fullmatch(p.name)
        if not m or p.is_symlink() or not (p.is_file() or p.is_dir()):
            continue
        if _complete(p):
            complete.append((int(m.group(2)), p))
        else:
            p.rename(p.with_name(p.name + ".incomplete"))
            log.warning("%s is an incomplete checkpoint (a save was interrupted); moved aside as %s.incomplete",
                        p, p.name)
    link = folder / LATEST
    if link.exists() and _complete(link):
        return link.resolve()
    if not complete:
        return None
    newest = max(complete)[1]
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(newest.name)
    log.warning("%s was missing or pointed at an incomplete checkpoint (a save interrupted?); it now points at "
                "%s, the newest complete one", link, newest.name)
    return newest


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return None
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def check_unchanged(folder: str | Path, current: Any) -> list[tuple[str, Any, Any]]:
    """[(key, saved value, current value)] for the RESUME_KEYS that differ from the saved config."""
    saved_file = Path(folder) / SAVED_CONFIG
    if not saved_file.is_file():
        return []
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=True)
    now = OmegaConf.to_container(OmegaConf.structured(current), resolve=True)
    return [(k, _get(saved, k), _get(now, k)) for k in RESUME_KEYS if _get(saved, k) != _get(now, k)]
