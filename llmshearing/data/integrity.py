"""Prepared data checked before any compute: every shard that a domain's `index.json` lists is on
disk with the recorded size (and, when asked, the recorded hash).

Without this a truncated or damaged shard is found mid-run, as Streaming's "IndexError: Relative
sample index N is not present in the shard" traceback, after the model was loaded and maybe hours
of training; a size check of every shard costs one `stat` each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# Streaming's hashing: only imported when hashes are checked (it imports streaming)


class DataIntegrityError(ValueError):
    """A shard that is missing, truncated or corrupted; the message names the file and the domain."""


def check_shards(root: str | Path, split: str, domains: Sequence[str], validate_hash: bool = False) -> int:
    """Raise DataIntegrityError for the first bad shard; returns the number of shards checked."""
    n = 0
    for dom in domains:
        folder = Path(root) / split / dom
        index_file = folder / "index.json"
        if not index_file.exists():
            continue  # no data at all: the loader names the folder when it is built (before training)
        try:
            shards = json.loads(index_file.read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataIntegrityError(f"domain '{dom}': {index_file} cannot be read as a Streaming index: {e}") from e
        for shard in shards:
            _check_shard(folder, dom, shard, validate_hash)
            n += 1
    return n


def _check_shard(folder: Path, dom: str, shard: dict, validate_hash: bool) -> None:
    # a local shard is there raw, or compressed (zip_data) when prepared with compression
    for key in ("raw_data", "zip_data"):
        info = shard.get(key)
        if not info:
            continue
        path = folder / info["basename"]
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size != int(info["bytes"]):
            raise DataIntegrityError(f"domain '{dom}': shard {path} is {size:,} bytes but its index.json records "
                                     f"{int(info['bytes']):,}: truncated or overwritten? (prepare the data again)")
        if validate_hash and info.get("hashes"):
            from streaming.base.hashing import get_hash

            data = path.read_bytes()
            for algo, want in info["hashes"].items():
                if get_hash(algo, data) != want:
                    raise DataIntegrityError(f"domain '{dom}': shard {path} fails its {algo} hash: corrupted")
        return
    names = [shard[k]["basename"] for k in ("raw_data", "zip_data") if shard.get(k)]
    raise DataIntegrityError(f"domain '{dom}': shard {folder / names[0]} listed in {folder / 'index.json'} is missing")
