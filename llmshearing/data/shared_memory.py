"""Streaming's shared memory, kept tidy: released when a dataset is done, and cleaned at start-up only
where no live process uses it.

Streaming gives every StreamingDataset a prefix (`000000_`, `000001_`, ...) and a set of POSIX shared
memory blocks (`/dev/shm/<prefix>_locals`, `_barrier`, `_shard_states`, ...) that live until interpreter
exit; a crashed run leaves them behind, and a new dataset over the same local folder then fails or hangs.
Streaming's own `clean_stale_shared_memory()` unlinks the blocks of *every* prefix, including those of
other live jobs on the node (two jobs sharing an 8-GPU node, a benchmark beside a run), whose datasets
then lose their shared state under them. `clean_stale_shared_memory` here unlinks only the prefixes that
no process maps or holds open.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")

_SHM_PREFIX = re.compile(r"(\d{6})_")  # Streaming names its blocks f"{prefix:06}_{what}"


def release_shared_memory(streaming_dataset: Any) -> int:
    """Close and unlink a StreamingDataset's shared-memory blocks now instead of at exit.

    Streaming keeps every block (and one fd each) alive until interpreter exit through `atexit`,
    and each new StreamingDataset opens the blocks of all live ones while picking its prefix (those
    probe handles are referenced only by `atexit`), so a process that builds many loaders (tests,
    sweeps, several trainers) runs out of file descriptors, quadratically. Call this when a dataset
    is no longer used (its DataLoader workers must be gone or idle): it closes the dataset's own
    blocks and every handle this process holds on them, and the probe handles on blocks no live
    dataset of this process uses (another process's; closed, never unlinked).
    """
    import gc
    import warnings

    from streaming import StreamingDataset
    from streaming.base.shared.memory import SharedMemory

    found: list[Any] = []

    def walk(obj: Any, depth: int) -> None:
        for v in list(vars(obj).values()):
            if isinstance(v, SharedMemory):
                found.append(v)
            elif depth > 0 and hasattr(v, "__dict__") and type(v).__module__.startswith("streaming."):
                walk(v, depth - 1)

    walk(streaming_dataset, 3)
    streaming_dataset._llmshearing_released = True
    prefix = getattr(streaming_dataset, "_shm_prefix_int", None)
    with warnings.catch_warnings():  # isinstance() on every live object wakes deprecated aliases
        warnings.simplefilter("ignore")
        live = gc.get_objects()
        in_use = {getattr(o, "_shm_prefix_int", None) for o in live if isinstance(o, StreamingDataset)
                  and not getattr(o, "_llmshearing_released", False)}
        mine = {id(s) for s in found}
        for o in live:
            if not isinstance(o, SharedMemory) or id(o) in mine:
                continue
            m = _SHM_PREFIX.search(str(getattr(getattr(o, "shm", None), "name", "")))
            if m is None:
                continue
            owner = int(m.group(1))
            # the probe handles other datasets opened on this dataset's blocks, and the opened-only probe
            # handles on blocks that no live dataset of this process uses (another process's: closing
            # our handle leaves its block alone)
            if owner == prefix or (
                    owner not in in_use and not getattr(o, "created_shms", None)):
                found.append(o)
    for shm in found:
        atexit.unregister(shm.cleanup)
        try:
            shm.cleanup()
        except (OSError, ValueError, BufferError):
            pass
    # lock files left in the temp dir would make Streaming skip this prefix forever
    barrier = getattr(streaming_dataset, "_shared_barrier", None)
    for path in (getattr(streaming_dataset, "_cache_filelock_path", None), getattr(barrier, "filelock_path", None)):
        if path:
            try:
                os.remove(path)
            except OSError:
                pass
    return len(found)


def _names_in_use() -> set[str] | None:
    """Names of the /dev/shm blocks some process maps or holds open, from /proc/*/maps and /proc/*/fd;
    None where /proc cannot tell (not Linux). A process whose /proc entries we may not read (another
    user's) cannot use our blocks: their mode is 0600."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    used: set[str] = set()
    prefix = f"{SHM_DIR}/"
    for pid in (p for p in proc.iterdir() if p.name.isdigit()):
        try:
            with open(pid / "maps") as f:
                for line in f:
                    i = line.find(prefix)
                    if i >= 0:
                        used.add(line[i + len(prefix):].split()[0])
            for fd in (pid / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    used.add(target[len(prefix):].split()[0])
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
    return used


def stale_prefixes() -> dict[int, list[str]]:
    """Streaming prefixes whose blocks no process uses: {prefix: [block names]}."""
    if not SHM_DIR.is_dir():
        return {}
    used = _names_in_use()
    if used is None:
        return {}
    blocks: dict[int, list[str]] = {}
    for entry in SHM_DIR.iterdir():
        m = _SHM_PREFIX.match(entry.name)
        if m is not None and entry.name[m.end():]:
            blocks.setdefault(int(m.group(1)), []).append(entry.name)
    return {p: sorted(names) for p, names in sorted(blocks.items()) if not any(n in used for n in names)}


def clean_stale_shared_memory() -> list[int]:
    """Unlink the Streaming blocks left by dead processes (every block of a prefix that no process maps
    or holds open); live jobs' blocks stay. Local rank 0 cleans while the node's other ranks wait at a
    barrier (with a process group). Returns the cleaned prefixes."""
    import torch.distributed as dist

    cleaned: list[int] = []
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for prefix, names in stale_prefixes().items():
            for name in names:
                try:
                    os.unlink(SHM_DIR / name)
                except FileNotFoundError:
                    pass
            cleaned.append(prefix)
        if cleaned:
            log.info("removed the shared memory of %d stale Streaming prefix(es) %s (no live process used it)",
                     len(cleaned), cleaned)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return cleaned
