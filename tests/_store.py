"""The S3-compatible test server with the tiny data prepared into it (and into a local folder, by the
same `prepare-data` command), and the tiny 2-rank pruning runs made from them; one per session,
shared by tests/test_object_storage.py and tests/test_cluster_launch.py (fixture `store`, registered
in conftest.py).

Runs (`composer ... tests/_mp_driver.py ...`, 2 gloo ranks, global batch 16, 6 batches, checkpoint
at 3; shards of ~2 KB, so every domain has ~20 shards and a cache can be half full):

    local     1 node x 2 processes, data.root = the local folder: the reference every other run equals
    remote    1 node x 2 processes, data.remote = s3://bucket/tiny, data.root = an empty cache,
              data.cache_limit small enough that Streaming evicts shards during the run

(A kill + relaunch with a half-filled cache: tests/test_cluster_launch.py, through the Slurm script.)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from _s3 import s3_server
from _tiny_data import DOMAINS, driver_env, make_tiny_data

REPO = Path(__file__).resolve().parents[1]
PRUNE = REPO / "yamls/tiny/prune.yaml"
COMPOSER = Path(sys.executable).parent / "composer"
HANG_GUARD_S = 300
BUCKET = "shear-data"
SHARD = "2kb"  # ~7 rows of 128 uint16 tokens: ~20 train shards per domain


class Store:
    """The server, the data (local and remote, from the same prepare-data command) and the runs."""

    def __init__(self, tmp: Path, env: dict) -> None:
        self.tmp, self.s3 = tmp, env
        tiny = make_tiny_data(tmp / "tiny")  # raw documents + tokenizer (its own data is not used here)
        self.raw, self.tok = tiny.parent / "raw", tiny.parent / "tokenizer"
        self.remote = f"s3://{BUCKET}/tiny"
        # not tmp / "local": that is the "local" run's folder (its checkpoints would land in the data root)
        self.local = tmp / "data_local"
        self.prep_local = self.prepare(str(self.local))
        self.prep_remote = self.prepare(self.remote)
        self._runs: dict[str, dict] = {}

    def env(self, extra: dict | None = None) -> dict:
        return driver_env({**self.s3, "OMP_NUM_THREADS": "1", **(extra or {})})

    def prepare(self, out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "llmshearing.cli", "prepare-data", "--tokenizer", str(self.tok), "--out", out,
               "--seq-len", "128", "--eval-fraction", "0.15", "--eval-sequences", "8", "--seed", "0", "--workers", "1",
               "--shard-size", SHARD, "--quiet", *[f"--domain={d}={self.raw / d}" for d in DOMAINS], *extra]
        return subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=HANG_GUARD_S)

    def overrides(self, name: str, data: list[str]) -> list[str]:
        return [*data, "max_duration=6ba", "save_interval=3ba", "eval_interval=3ba", "global_train_batch_size=16",
                "device_train_microbatch_size=8", "data.num_workers=1", "data.eval_rows_per_domain=5",
                "device_eval_batch_size=4", "eval_first=true", "loggers.file=false", "loggers.console_interval=3ba",
                f"save_folder={self.tmp / name / 'ckpt'}"]

    def launch(self, name: str, data: list[str], env: dict | None = None, nproc: int = 2):
        out = self.tmp / name / "rec"
        cmd = [str(COMPOSER), "-n", str(nproc), "tests/_mp_driver.py", str(out), str(PRUNE),
               *self.overrides(name, data)]
        p = subprocess.run(cmd, cwd=REPO, env=self.env(env), capture_output=True, text=True, timeout=HANG_GUARD_S)
        return p, out

    def run(self, name: str) -> dict:
        if name in self._runs:
            return self._runs[name]
        cache = self.tmp / name / "cache"
        data = {"local": [f"data.root={self.local}"],
                "remote": [f"data.remote={self.remote}", f"data.root={cache}", "data.cache_limit=24kb"]}[name]
        r: dict = {"cache": cache}
        p, out = self.launch(name, data)
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        r.update(proc=p, recs=[json.loads((out / f"rank{i}.json").read_text()) for i in range(2)],
                 ckpt=load_ckpt(self.tmp / name / "ckpt" / "latest-rank0.pt"))
        self._runs[name] = r
        return r


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's access log
    with s3_server(BUCKET) as env:
        yield Store(tmp_path_factory.mktemp("s3"), env)


def load_ckpt(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
