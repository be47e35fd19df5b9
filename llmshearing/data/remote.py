"""Prepared data in object storage (`s3://bucket/prefix`, or any S3-compatible store through
`S3_ENDPOINT_URL`), laid out as a local data root: `manifest.json`, `{train,eval}/<domain>/` shards.

Training streams the shards into a node-local cache (`data.root`) with Streaming; this module does
the few things Streaming does not:

* **Up-front integrity check** (`check_remote_shards`): before any model is built, every domain's
  `index.json` is fetched and each shard it lists is compared with the object's size in one LIST
  of the prefix (and, with `data.validate_hash`, downloaded once and hashed). So a truncated or
  missing remote shard is named with its URL and domain in seconds, not found as a Streaming
  traceback in a worker hours into the run. Shards already in the cache are checked against the
  same index (a cache filled from other data is refused, not mixed in).
* **One-line errors** (`RemoteError`) for an endpoint that does not answer or a bucket that does not
  exist, with bounded requests (short connect timeout, two attempts).
* Credentials and endpoint only from the environment (boto3's `AWS_*`, Streaming's
  `S3_ENDPOINT_URL`); a URL carrying credentials is refused.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmshearing.data.integrity import DataIntegrityError, check_shard_sizes

SCHEMES = ("s3",)


class RemoteError(ValueError):
    """Object storage that cannot be used (unreachable, missing bucket, refused); names the URL."""


def is_remote(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path)


def parse_remote(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); refuses other schemes and credentials in the URL."""
    u = urllib.parse.urlparse(str(url))
    if u.scheme not in SCHEMES:
        raise RemoteError(f"{url}: only s3:// URLs are supported (any S3-compatible store: set S3_ENDPOINT_URL; "
                          "GCS through its S3 interoperability endpoint)")
    if "@" in u.netloc or u.password or u.username:
        raise RemoteError(f"{url}: credentials do not go in the URL; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                          "(and S3_ENDPOINT_URL) in the environment")
    if not u.netloc:
        raise RemoteError(f"{url}: no bucket name (expected s3://BUCKET/PREFIX)")
    return u.netloc, u.path.strip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *[p.strip("/") for p in parts if p]])


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or "AWS S3"


@lru_cache(maxsize=4)
def _client(endpoint: str | None) -> Any:
    """An S3 client from the environment, with bounded requests: a dead endpoint fails in seconds."""
    import boto3
    from botocore.config import Config

    cfg = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def client() -> Any:
    return _client(os.environ.get("S3_ENDPOINT_URL") or None)


def _fail(url: str, e: Exception) -> RemoteError:
    """A boto error as one line naming the URL (and the endpoint: the usual culprit)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, EndpointConnectionError):
        return RemoteError(f"{url}: cannot reach the object store at {_endpoint()} (S3_ENDPOINT_URL): {e}")
    if isinstance(e, NoCredentialsError):
        return RemoteError(f"{url}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        if code in ("NoSuchBucket", "404") and e.operation_name in ("ListObjectsV2", "HeadBucket"):
            return RemoteError(f"{url}: bucket '{parse_remote(url)[0]}' does not exist at {_endpoint()}")
        if code in ("NoSuchKey", "404"):
            return RemoteError(f"{url}: not found at {_endpoint()}")
        return RemoteError(f"{url}: refused by {_endpoint()} ({code}): {e.response.get('Error', {}).get('Message')}")
    return RemoteError(f"{url}: {type(e).__name__}: {e}")


def _call(url: str, fn, /, **kw: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kw)
    except (BotoCoreError, ClientError) as e:
        raise _fail(url, e) from e


def list_sizes(url: str) -> dict[str, int]:
    """{path relative to url: size in bytes} of every object under the prefix (paginated LIST)."""
    bucket, prefix = parse_remote(url)
    c = client()
    _call(url, c.head_bucket, Bucket=bucket)  # a missing bucket is named as such, not as "no data"
    base = prefix + "/" if prefix else ""
    out: dict[str, int] = {}
    token = None
    while True:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": base}
        if token:
            kw["ContinuationToken"] = token
        page = _call(url, c.list_objects_v2, **kw)
        for obj in page.get("Contents", []):
            out[obj["Key"][len(base):]] = int(obj["Size"])
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def read_bytes(url: str) -> bytes:
    bucket, key = parse_remote(url)
    body = _call(url, client().get_object, Bucket=bucket, Key=key)["Body"]
    return body.read()


def upload_file(local: str | os.PathLike, url: str) -> None:
    bucket, key = parse_remote(url)
    _call(url, client().upload_file, Filename=str(local), Bucket=bucket, Key=key)


def delete_prefix(url: str) -> int:
    """Delete every object under the prefix (prepare-data --overwrite); returns how many."""
    bucket, prefix = parse_remote(url)
    keys = [join(prefix, k) if prefix else k for k in list_sizes(url)]
    for i in range(0, len(keys), 1000):
        _call(url, client().delete_objects, Bucket=bucket,
              Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
    return len(keys)


def fetch_manifest(remote: str, cache: str | os.PathLike, sizes: dict[str, int] | None = None,
                   name: str = "manifest.json") -> Path | None:
    """Copy `remote/manifest.json` into the cache root (atomically), so the checks and the loader
    read it as for local data; None when the remote has none."""
    if name not in (list_sizes(remote) if sizes is None else sizes):
        return None
    dest = Path(cache) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{name}.{os.getpid()}.tmp")
    tmp.write_bytes(read_bytes(join(remote, name)))
    tmp.replace(dest)
    return dest


def check_remote_shards(remote: str, split: str, domains: Sequence[str], cache: str | os.PathLike,
                        validate_hash: bool = False, sizes: dict[str, int] | None = None) -> int:
    """Every shard each domain's remote `index.json` lists exists with the recorded size (and hash);
    a copy of the index already in the cache must be the same index. Raises DataIntegrityError
    naming the shard's URL and the domain; returns the number of shards checked."""
    sizes = list_sizes(remote) if sizes is None else sizes
    n = 0
    for dom in domains:
        rel = f"{split}/{dom}"
        index_url = join(remote, rel, "index.json")
        if f"{rel}/index.json" not in sizes:
            raise DataIntegrityError(f"domain '{dom}': no MDS data at {join(remote, rel)} (missing index.json); "
                                     "prepare it with `llmshearing prepare-data --out " + remote + "`")
        raw = read_bytes(index_url)
        try:
            shards = json.loads(raw)["shards"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataIntegrityError(f"domain '{dom}': {index_url} cannot be read as a Streaming index: {e}") from e
        cached = Path(cache) / rel / "index.json"
        if cached.is_file() and cached.read_bytes() != raw:
            raise DataIntegrityError(f"domain '{dom}': the cache {cached} holds another index than {index_url} "
                                     f"(the remote data was prepared again?): empty the cache folder {cache}")
        for shard in shards:
            check_shard_sizes(
                dom, shard, where=lambda name: join(remote, rel, name),
                size_of=lambda name: sizes.get(f"{rel}/{name}"),
                read=(lambda name: read_bytes(join(remote, rel, name))) if validate_hash else None,
                listed_in=index_url)
            # what an earlier run left in the cache must be whole too (Streaming trusts a file by its name)
            check_shard_sizes(
                dom, shard, where=lambda name: str(Path(cache) / rel / name),
                size_of=lambda name: _size_or_none(Path(cache) / rel / name), read=None,
                listed_in=str(cached), missing_ok=True)
            n += 1
    return n


def _size_or_none(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return None


__all__ = ["RemoteError", "check_remote_shards", "delete_prefix", "fetch_manifest", "is_remote", "join",
           "list_sizes", "parse_remote", "read_bytes", "upload_file"]
