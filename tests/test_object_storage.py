"""Prepared data in object storage, against a real S3-compatible server on 127.0.0.1 (moto's server
mode, tests/_s3.py): `prepare-data --out s3://...`, 2-rank pruning runs that stream the shards into a
node-local cache (`data.remote` + `data.root`), and what happens when the store is unreachable, the
bucket is missing or a remote shard is damaged.

The runs are made once per session by tests/_store.py (see there); this module compares them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _store import BUCKET, PRUNE, REPO, Store
from _tiny_data import DOMAINS

HANG_GUARD_S = 300

pytestmark = pytest.mark.multiprocess


def _remote_shards(store: Store) -> list[str]:
    from llmshearing.data.remote import list_sizes

    return sorted(k for k in list_sizes(store.remote) if k.startswith("train/") and k.endswith(".mds"))


def _model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in ckpt["state"]["model"].items()}


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_data_uploads_the_same_files_as_a_local_prepare(store):
    """Every object under the remote root is the byte-identical file of the local prepare (but the
    manifest, whose file list and timing differ), read back with boto3, not our code."""
    import boto3

    assert store.prep_local.returncode == 0 and store.prep_remote.returncode == 0, store.prep_remote.stderr[-2000:]
    assert f"wrote {store.remote}/manifest.json" in store.prep_remote.stdout
    c = boto3.client("s3", endpoint_url=store.s3["S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix="tiny/")["Contents"]]
    local = sorted(p.relative_to(store.local).as_posix() for p in store.local.rglob("*") if p.is_file())
    assert sorted(k.removeprefix("tiny/") for k in keys) == local
    assert len(_remote_shards(store)) >= 3 * 10  # small shards: a cache can hold part of a domain
    for k in keys:
        if not k.endswith("manifest.json"):
            assert c.get_object(Bucket=BUCKET, Key=k)["Body"].read() == (store.local / k.removeprefix("tiny/")).read_bytes(), k
    again = store.prepare(store.remote)
    assert again.returncode == 2 and "already holds prepared data" in again.stderr and "Traceback" not in again.stderr


# ------------------------------------------------------------------------------------------ training
def test_two_rank_run_from_the_store_trains_on_the_local_runs_batches(store):
    """Same sample ids batch by batch on both ranks, same eval losses (1e-6: same rows, same
    weights), same final weights, with shards evicted along the way (cache_limit)."""
    loc, rem = store.run("local"), store.run("remote")
    for r in range(2):
        assert rem["recs"][r]["ids"] == loc["recs"][r]["ids"] and len(loc["recs"][r]["ids"]) == 6
    for e_l, e_r in zip(loc["recs"][0]["evals"], rem["recs"][0]["evals"], strict=True):
        assert e_l["batch"] == e_r["batch"]
        for dom in DOMAINS:
            assert abs(e_l["losses"][dom] - e_r["losses"][dom]) <= 1e-6, (dom, e_l, e_r)
    a, b = _model_state(loc["ckpt"]), _model_state(rem["ckpt"])
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)
    cached = sorted(p.relative_to(rem["cache"]).as_posix() for p in rem["cache"].rglob("train/*/shard.*.mds"))
    assert cached and len(cached) < len(_remote_shards(store))  # evicted down to the limit, not all kept
    assert (rem["cache"] / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------ faults
def _train_1(store: Store, name: str, data: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", str(PRUNE), *store.overrides(name, data)]
    return subprocess.run(cmd, cwd=REPO, env=store.env(env), capture_output=True, text=True, timeout=HANG_GUARD_S)


def _config_error(store: Store, data: list[str]) -> str:
    from llmshearing.training.config import ConfigError, load_config
    from llmshearing.training.config_checks import validate

    with pytest.raises(ConfigError) as e:
        validate(load_config(PRUNE, store.overrides("inproc", data)))
    return str(e.value)


def _one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "config error:" in ln]
    assert len(lines) == 1, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_unreachable_store_and_missing_bucket_are_one_line_naming_the_url(store, tmp_path):
    from _s3 import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = _train_1(store, "dead", [f"data.remote={store.remote}", f"data.root={tmp_path / 'c1'}"],
                 env={"S3_ENDPOINT_URL": dead})
    _one_line(p, "data.remote", store.remote, dead, "cannot reach")
    # the same path in this process (saves a process start): the ConfigError main prints as its one line
    msg = _config_error(store, ["data.remote=s3://no-such-bucket/tiny", f"data.root={tmp_path / 'c2'}"])
    for w in ("data.remote", "s3://no-such-bucket/tiny", "does not exist"):
        assert w in msg and "\n" not in msg, msg
    p = store.prepare("s3://no-such-bucket/tiny")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "s3://no-such-bucket/tiny" in p.stderr, p.stderr


def test_damaged_remote_shard_stops_the_run_before_training_naming_url_and_domain(store, tmp_path):
    """A truncated shard object (sizes checked up front), and one of the right size with a flipped byte
    (with data.validate_hash: hashed up front), each stop with exit 2 before the model is built."""
    import boto3

    c = boto3.client("s3", endpoint_url=store.s3["S3_ENDPOINT_URL"])
    src = "tiny/train/legal/shard.00003.mds"
    body = c.get_object(Bucket=BUCKET, Key=src)["Body"].read()
    for prefix, blob in (("truncated", body[: len(body) // 2]), ("flipped", body[:-10] + bytes([body[-10] ^ 0xFF]) + body[-9:])):
        for key in (k for k in (o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix="tiny/")["Contents"])):
            c.copy_object(Bucket=BUCKET, Key=f"{prefix}/{key.removeprefix('tiny/')}",
                          CopySource={"Bucket": BUCKET, "Key": key})
        c.put_object(Bucket=BUCKET, Key=f"{prefix}/train/legal/shard.00003.mds", Body=blob)
    url = f"s3://{BUCKET}/truncated/train/legal/shard.00003.mds"
    p = _train_1(store, "trunc", [f"data.remote=s3://{BUCKET}/truncated", f"data.root={tmp_path / 'c1'}"])
    _one_line(p, "data.remote", "domain 'legal'", url, "truncated")
    assert not (store.tmp / "trunc" / "ckpt").exists()  # stopped before the Trainer was built
    url = f"s3://{BUCKET}/flipped/train/legal/shard.00003.mds"
    msg = _config_error(store, [f"data.remote=s3://{BUCKET}/flipped", f"data.root={tmp_path / 'c2'}",
                                "data.validate_hash=true"])
    for w in ("data.remote", "domain 'legal'", url, "xxh64"):
        assert w in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides,words", [
    (["data.root=s3://b/tiny"], ["data.root", "s3://b/tiny", "data.remote"]),
    (["data.root=/tmp/x", "data.cache_limit=10gb"], ["data.cache_limit", "data.remote"]),
    (["data.root=/tmp/x", "data.remote=s3://KEY:SECRET@b/tiny"], ["data.remote", "AWS_ACCESS_KEY_ID"]),
    (["data.root=/tmp/x", "data.remote=gs://b/tiny"], ["data.remote", "s3://"]),
    (["data.root=/tmp/x", "data.remote=s3://b/tiny", "data.cache_limit=lots"], ["data.cache_limit", "lots"]),
])
def test_remote_config_keys_are_checked_naming_the_key(overrides, words):
    from llmshearing.training.config import ConfigError, load_config
    from llmshearing.training.config_checks import validate

    cfg = load_config(PRUNE, overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, check_paths=False)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
