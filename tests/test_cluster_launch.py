"""Two nodes on one machine, and the Slurm script run end to end.

A "node" here is what a separate machine would be for the run: its own `composer` launcher (node
rank, one process), its own cache folder for the shards streamed from object storage (the S3 test
server of tests/_store.py), its own /dev/shm (Streaming keeps its node-wide state in shared memory:
a private tmpfs per node, through `unshare -m`, needs root) and its own TMPDIR. The save folder is
shared, as a cluster's shared filesystem. Every result is compared with the 1-node 2-process run
from the local copy of the data (`store.run("local")`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _s3 import free_port
from _store import COMPOSER, PRUNE, REPO, load_ckpt

HANG_GUARD_S = 300
NODE = "mount -t tmpfs -o size=1g tmpfs /dev/shm && exec \"$@\""  # a private /dev/shm, then the command

pytestmark = [pytest.mark.multiprocess,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                 reason="a private /dev/shm per node needs root (unshare -m)")]


def _model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in ckpt["state"]["model"].items()}


def _same_as_local(store, rec_dir: Path, ckpt: dict) -> None:
    """Both ranks trained on the local run's sample ids, batch by batch, and end at its weights (1e-6)."""
    loc = store.run("local")
    for r in range(2):
        rec = json.loads((rec_dir / f"rank{r}.json").read_text())
        for b, ids in rec["ids"].items():
            assert ids == loc["recs"][r]["ids"][b], (r, b)
    a, b = _model_state(ckpt), _model_state(loc["ckpt"])
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)


def test_two_nodes_on_one_machine_equal_the_one_node_run(store, tmp_path):
    """`composer -n 1 --world_size 2 --node_rank 0|1 --master_addr 127.0.0.1` started twice, each node
    with its own cache, /dev/shm and TMPDIR: the ids, batch by batch, and the weights of the 1-node
    2-process run, and each node's cache holds only what its own rank read."""
    port, rec = free_port(), tmp_path / "rec"
    procs = []
    for node in (0, 1):
        (tmp_path / f"tmp{node}").mkdir()
        launcher = [str(COMPOSER), "-n", "1", "--world_size", "2", "--node_rank", str(node),
                    "--master_addr", "127.0.0.1", "--master_port", str(port)]
        data = [f"data.remote={store.remote}", f"data.root={tmp_path / f'cache{node}'}"]
        cmd = ["unshare", "-m", "bash", "-c", NODE, "_", *launcher, "tests/_mp_driver.py", str(rec), str(PRUNE),
               *store.overrides("nodes", data), f"save_folder={tmp_path / 'ckpt'}"]
        env = store.env({"TMPDIR": str(tmp_path / f"tmp{node}")})
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=HANG_GUARD_S)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}: exit {p.returncode}\n{out[-4000:]}"
    _same_as_local(store, rec, load_ckpt(tmp_path / "ckpt" / "latest-rank0.pt"))
    for node in (0, 1):
        assert list((tmp_path / f"cache{node}").rglob("train/*/shard.*.mds")), f"node {node} cached nothing"
