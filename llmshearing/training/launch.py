"""Build the launch commands for one node or a Slurm allocation (and print them with --dry-run).

Slurm layout: one `srun` task per node; each task runs `python -m llmshearing.training.launch node ...`,
which reads its own SLURM_NODEID and execs the `composer` launcher with the world size, node
rank and master address, which in turn starts one training process per GPU.

    python -m llmshearing.training.launch slurm  [--dry-run] CONFIG.yaml [key=value ...]   # inside sbatch
    python -m llmshearing.training.launch single [--dry-run] CONFIG.yaml [key=value ...]   # one machine

`--script` replaces train.py (the tests run tests/_mp_driver.py, train.py's main plus a recorder).
Outside a Slurm job `slurm` says so in one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    nnodes: int
    gpus_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist ('gpu[003-004,010],cpu1' -> 'gpu003'); `scontrol` when present."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def cluster_from_slurm(env: dict[str, str]) -> Cluster:
    def need(*names: str) -> str:
        for n in names:
            if env.get(n):
                return env[n]
        raise ValueError(f"not inside a Slurm job: none of {', '.join(names)} is set")

    nnodes = int(need("SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    gpus = env.get("GPUS_PER_NODE") or env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "8"
    gpus = int(re.sub(r"^.*:", "", gpus))  # 'a100:8' -> 8
    addr = env.get("MASTER_ADDR") or first_host(need("SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    port = int(env.get("MASTER_PORT") or 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    return Cluster(nnodes, gpus, addr, port)


def composer_command(c: Cluster, node_rank: int | str, train_args: list[str], script: str = "train.py") -> list[str]:
    return ["composer", "-n", str(c.gpus_per_node), "--world_size", str(c.world_size), "--node_rank", str(node_rank),
            "--master_addr", c.master_addr, "--master_port", str(c.master_port), script, *train_args]


def srun_command(c: Cluster, train_args: list[str], script: str = "train.py") -> list[str]:
    return ["srun", f"--nodes={c.nnodes}", "--ntasks-per-node=1", f"--gpus-per-node={c.gpus_per_node}",
            sys.executable, "-m", "llmshearing.training.launch", "node", "--nnodes", str(c.nnodes),
            "--gpus-per-node", str(c.gpus_per_node), "--master-addr", c.master_addr,
            "--master-port", str(c.master_port), *(["--script", script] if script != "train.py" else []),
            "--", *train_args]


def _gpus_here() -> int:
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except Exception:  # noqa: BLE001 - torch missing/broken: one process
        return 1


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Outside an allocation (or without srun / composer on PATH): one line on stderr, exit 2."""
    try:
        return _main(argv, env)
    except (ValueError, FileNotFoundError) as e:
        print(f"llmshearing launch: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None, env: dict[str, str] | None) -> int:
    env = dict(os.environ if env is None else env)
    p = argparse.ArgumentParser(prog="python -m llmshearing.training.launch", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("slurm", "single"):
        sp = sub.add_parser(mode)
        sp.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
        sp.add_argument("--gpus-per-node", type=int, default=None)
        sp.add_argument("--script", default="train.py", help="the training script each process runs")
        sp.add_argument("train_args", nargs=argparse.REMAINDER, help="CONFIG.yaml [key=value ...]")
    sp = sub.add_parser("node", help="(internal) one Slurm task: exec composer with this node's rank")
    sp.add_argument("--nnodes", type=int, required=True)
    sp.add_argument("--gpus-per-node", type=int, required=True)
    sp.add_argument("--master-addr", required=True)
    sp.add_argument("--master-port", type=int, required=True)
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--script", default="train.py")
    sp.add_argument("train_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    train_args = [x for x in a.train_args if x != "--"]
    if not train_args:
        p.error("give the config: CONFIG.yaml [key=value ...]")

    if a.mode == "single":
        c = Cluster(1, a.gpus_per_node or _gpus_here(), "127.0.0.1", int(env.get("MASTER_PORT", 29500)))
        cmds = [composer_command(c, 0, train_args, a.script)]
    elif a.mode == "slurm":
        if a.gpus_per_node:
            env["GPUS_PER_NODE"] = str(a.gpus_per_node)
        c = cluster_from_slurm(env)
        if a.dry_run:
            print("# srun (one task per node):")
            print(shlex.join(srun_command(c, train_args, a.script)))
            print("# each task then runs:")
            for r in range(c.nnodes):
                print(shlex.join(composer_command(c, r, train_args, a.script)))
            return 0
        cmds = [srun_command(c, train_args, a.script)]
    else:  # node
        if "SLURM_NODEID" not in env and not a.dry_run:
            raise ValueError("`node` runs inside an srun task (SLURM_NODEID is not set)")
        c = Cluster(a.nnodes, a.gpus_per_node, a.master_addr, a.master_port)
        cmds = [composer_command(c, env.get("SLURM_NODEID", "0"), train_args, a.script)]

    if a.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    if shutil.which(cmds[0][0], path=env.get("PATH")) is None:
        raise FileNotFoundError(f"{cmds[0][0]} is not on PATH" + (": run this inside a Slurm allocation (sbatch / salloc)"
                                                                  if cmds[0][0] == "srun" else ""))
    os.execvpe(cmds[0][0], cmds[0], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
