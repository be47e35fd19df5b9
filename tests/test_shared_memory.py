"""Start-up cleaning of Streaming's shared memory removes what dead processes left and nothing a live
process uses (Streaming's own clean_stale_shared_memory removes every prefix, live jobs' included)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _foreign_dataset import foreign_dataset

from llmshearing.data.shared_memory import SHM_DIR, clean_stale_shared_memory

pytestmark = pytest.mark.skipif(not (SHM_DIR.is_dir() and Path("/proc/self/maps").exists()),
                                reason="POSIX shared memory in /dev/shm and /proc (Linux)")


def _blocks(prefix: int) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(f"{prefix:06}_"))


def test_cleaning_keeps_a_live_process_blocks_and_removes_a_dead_one(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with foreign_dataset(tmp_path / "foreign") as live:
        live_blocks = _blocks(live)
        assert len(live_blocks) >= 5, live_blocks  # _locals, _barrier, _shard_states, ... of a live dataset
        # what a crashed run leaves: blocks that exist but no process maps or holds open
        dead = 999_990
        for what in ("locals", "barrier", "shard_states"):
            (SHM_DIR / f"{dead:06}_{what}").write_bytes(b"\0" * 8)
        try:
            cleaned = clean_stale_shared_memory()
            assert _blocks(live) == live_blocks, "a live process's shared memory was removed"
            assert live not in cleaned and dead in cleaned, cleaned
            assert _blocks(dead) == []
        finally:
            for n in _blocks(dead):
                os.unlink(SHM_DIR / n)
    # leaving the `with` checks that the foreign process could still read its rows (exit code)
