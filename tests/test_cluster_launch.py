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

from llmshearing.data.remote import list_sizes

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


# --------------------------------------------------------------------------------------------- Slurm
STANDINS = REPO / "tests" / "cluster_standins"  # srun and scontrol that start the tasks on this machine


def _no_slurm(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def _allocation(store, tmp_path: Path, **extra: str) -> dict:
    """The environment sbatch gives the batch script of a 2-node job, with the stand-ins first on PATH."""
    return {**_no_slurm(store.env()),
            "PATH": f"{STANDINS}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "llmshearing", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO),
            "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), **extra}


def test_slurm_script_runs_two_nodes_checkpoints_and_a_requeue_resumes(store, tmp_path):
    """launch/slurm.sbatch in a stand-in 2-node allocation (srun starts one task per node, each with its
    own node-local shard cache and /dev/shm). The job is preempted (rank 1 SIGKILLed at batch 5, after
    the checkpoint at 3) with each node's cache part filled, and requeued: the same script again,
    SLURM_RESTART_COUNT=1, on the same nodes (their caches as the kill left them). The requeued job
    resumes at batch 3 and ends at the 1-node 2-process run's ids and weights: a kill + relaunch with
    a half-filled cache resumes exactly."""
    rec, cache, save = tmp_path / "rec", tmp_path / "node_local_cache", tmp_path / "ckpt"
    args = ["--script", "tests/_mp_driver.py", str(rec), str(PRUNE),
            *store.overrides("slurm", [f"data.remote={store.remote}", f"data.root={cache}"]), f"save_folder={save}"]
    job = ["bash", "launch/slurm.sbatch", *args]
    first = subprocess.run(job, cwd=REPO, env=_allocation(store, tmp_path, STANDIN_NODE_LOCAL=str(cache),
                                                          SLURM_RESTART_COUNT="0", DRIVER_KILL_AT="5"),
                           capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert first.returncode != 0, "the first run should have been preempted (rank 1 killed)"
    assert sorted(p.name for p in save.glob("ep*-ba*")) == ["ep0-ba3-rank0.pt"], first.stderr[-3000:]
    n_remote = len([k for k in list_sizes(store.remote) if k.startswith("train/") and k.endswith(".mds")])
    for node in (0, 1):  # each node's cache holds part of the train shards, and only in its own folder
        cached = list(Path(f"{cache}.node{node}").rglob("train/*/shard.*.mds"))
        assert 0 < len(cached) < n_remote, (node, len(cached), n_remote)
    assert not cache.exists() or not any(cache.iterdir())
    requeued = subprocess.run(job, cwd=REPO, env=_allocation(store, tmp_path, STANDIN_NODE_LOCAL=str(cache),
                                                             SLURM_RESTART_COUNT="1"),
                              capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert requeued.returncode == 0, f"{requeued.stdout[-3000:]}\n{requeued.stderr[-3000:]}"
    assert (save / "ep0-ba6-rank0.pt").is_file() and (save / "latest-rank0.pt").resolve().name == "ep0-ba6-rank0.pt"
    ranks = [json.loads((rec / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(min(int(b) for b in r["ids"]) == 3 for r in ranks)  # resumed from batch 3
    _same_as_local(store, rec, load_ckpt(save / "latest-rank0.pt"))


@pytest.mark.parametrize("cmd", [["bash", "launch/slurm.sbatch"],
                                 [sys.executable, "-m", "llmshearing.training.launch", "slurm"]])
def test_outside_an_allocation_the_slurm_launch_says_so_in_one_line(cmd, tmp_path):
    p = subprocess.run([*cmd, str(PRUNE)], cwd=REPO, env=_no_slurm(dict(os.environ)), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "not inside a Slurm job" in err and "Traceback" not in err, err
