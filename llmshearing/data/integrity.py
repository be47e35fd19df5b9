"""Prepared data checked before any compute: every shard that a domain's `index.json` lists is on
disk with the recorded size (and, when asked, the recorded hash).

Without this a truncated or damaged shard is found mid-run, as Streaming's "IndexError: Relative
sample index N is not present in the shard" traceback, after the model was loaded and maybe hours
of training; a size check of every shard costs one `stat` each.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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
            check_shard_sizes(dom, shard, where=lambda name: str(folder / name), size_of=lambda name: _size(folder / name),
                              read=(lambda name: (folder / name).read_bytes()) if validate_hash else None,
                              listed_in=str(index_file))
            n += 1
    return n


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def check_shard_sizes(dom: str, shard: dict, *, where: Callable[[str], str], size_of: Callable[[str], int | None],
                      read: Callable[[str], bytes] | None, listed_in: str, missing_ok: bool = False) -> None:
    """One shard of an index against its files, wherever they are (a folder, a bucket, a cache):
    `size_of(basename)` is the file's size or None, `where(basename)` its name in messages, `read`
    (when hashes are checked) its bytes. A shard is there raw, or compressed (zip_data) when
    prepared with compression; a cache may hold both, or neither (`missing_ok`)."""
    found = False
    for key in ("raw_data", "zip_data"):
        info = shard.get(key)
        if not info:
            continue
        size = size_of(info["basename"])
        if size is None:
            continue
        found = True
        if size != int(info["bytes"]):
            raise DataIntegrityError(f"domain '{dom}': shard {where(info['basename'])} is {size:,} bytes but its "
                                     f"index.json records {int(info['bytes']):,}: truncated or overwritten? "
                                     "(prepare the data again)")
        if read is not None and info.get("hashes"):
            from streaming.base.hashing import get_hash

            data = read(info["basename"])
            for algo, want in info["hashes"].items():
                if get_hash(algo, data) != want:
                    raise DataIntegrityError(f"domain '{dom}': shard {where(info['basename'])} fails its {algo} "
                                             "hash: corrupted")
        if not missing_ok:
            return
    if found or missing_ok:
        return
    names = [shard[k]["basename"] for k in ("raw_data", "zip_data") if shard.get(k)]
    raise DataIntegrityError(f"domain '{dom}': shard {where(names[0])} listed in {listed_in} is missing")
