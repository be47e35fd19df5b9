"""Launch dry runs print the right multi-node commands for given Slurm variables."""

import shlex

import pytest

from llmshearing.training import launch


def _dry(argv, env, capsys):
    assert launch.main(argv, env=env) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith("#")]


def test_slurm_dry_run_multi_node(capsys):
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu-[017-019,030]", "SLURM_JOB_ID": "98765",
           "SLURM_GPUS_ON_NODE": "8"}
    lines = _dry(["slurm", "--dry-run", "yamls/prune_7b_to_2.7b.yaml", "run_name=r1"], env, capsys)
    srun, nodes = shlex.split(lines[0]), [shlex.split(x) for x in lines[1:]]
    assert srun[0] == "srun" and "--nodes=4" in srun and "--ntasks-per-node=1" in srun
    assert len(nodes) == 4
    for rank, cmd in enumerate(nodes):
        opts = dict(zip(cmd[1:-3:2], cmd[2:-3:2]))
        assert cmd[0] == "composer"
        assert opts == {"-n": "8", "--world_size": "32", "--node_rank": str(rank), "--master_addr": "gpu-017",
                        "--master_port": str(29500 + 98765 % 1000)}
        assert cmd[-3:] == ["train.py", "yamls/prune_7b_to_2.7b.yaml", "run_name=r1"]


def test_slurm_master_addr_and_port_from_env(capsys):
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n1,n2", "GPUS_PER_NODE": "4", "MASTER_ADDR": "10.0.0.5",
           "MASTER_PORT": "41000"}
    lines = _dry(["slurm", "--dry-run", "c.yaml"], env, capsys)
    last = shlex.split(lines[-1])
    assert last[last.index("--master_addr") + 1] == "10.0.0.5"
    assert last[last.index("--master_port") + 1] == "41000"
    assert last[last.index("--world_size") + 1] == "8"
    assert last[last.index("--node_rank") + 1] == "1"


def test_node_task_uses_its_slurm_nodeid(capsys):
    env = {"SLURM_NODEID": "3"}
    lines = _dry(["node", "--dry-run", "--nnodes", "4", "--gpus-per-node", "8", "--master-addr", "h0",
                  "--master-port", "29600", "--", "c.yaml", "a=1"], env, capsys)
    cmd = shlex.split(lines[0])
    assert cmd[cmd.index("--node_rank") + 1] == "3" and cmd[-2:] == ["c.yaml", "a=1"]


@pytest.mark.parametrize("nodelist,first", [("gpu[003-004]", "gpu003"), ("a100-n5", "a100-n5"),
                                            ("x[7,9-12],y1", "x7")])
def test_first_host(nodelist, first, monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda _: None)
    assert launch.first_host(nodelist) == first


def test_slurm_outside_job_is_a_clear_error(capsys):
    assert launch.main(["slurm", "--dry-run", "c.yaml"], env={}) == 2
    err = capsys.readouterr().err.strip()
    assert "not inside a Slurm job" in err and len(err.splitlines()) == 1
