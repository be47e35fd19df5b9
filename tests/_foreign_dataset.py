"""Another process on the node with a live StreamingDataset (a second job, a benchmark): it holds the
lowest free Streaming prefix until the `with` ends, and says which."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_CODE = """
import sys
from streaming import MDSWriter, StreamingDataset
with MDSWriter(out=sys.argv[1], columns={"x": "int"}) as w:
    for i in range(8):
        w.write({"x": i})
ds = StreamingDataset(local=sys.argv[1], batch_size=1)
print(ds._shm_prefix_int, flush=True)
sys.stdin.read()
assert [ds[i]["x"] for i in range(8)] == list(range(8))
"""


@contextlib.contextmanager
def foreign_dataset(folder: Path) -> Iterator[int]:
    """Yields the foreign dataset's prefix; on exit the process reads its rows once more and stops (exit 0)."""
    p = subprocess.Popen([sys.executable, "-c", _CODE, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        yield int(p.stdout.readline())
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    assert p.returncode == 0, f"the foreign process could not read its dataset any more (exit {p.returncode})"
