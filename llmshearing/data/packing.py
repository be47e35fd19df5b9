"""Packing tokenized documents into fixed-length rows and writing them as MDS shards.

Documents of one domain and split arrive in order; `Packer` concatenates them, cuts `seq_len`
rows, stops at a row budget and keeps the statistics the manifest records (documents, tokens,
rows, the dropped tail shorter than a row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Streaming's MDSWriter is imported in `mds_writer`: `llmshearing --help` imports this module (via
# prepare-data) and `import streaming` costs seconds (it imports transformers).

# --------------------------------------------------------------------------------------------
# Packing and writing (main process)
# --------------------------------------------------------------------------------------------

@dataclass
class SplitStats:
    documents: int = 0
    consumed_tokens: int = 0  # tokens of the documents taken in (doc + EOS)
    sequences: int = 0
    seq_len: int = 0
    requested_sequences: int | None = None

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len

    @property
    def dropped_tokens(self) -> int:
        return self.consumed_tokens - self.tokens

    def to_json(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "sequences": self.sequences,
                "dropped_tokens": self.dropped_tokens, "requested_sequences": self.requested_sequences}


class Packer:
    """Concatenate token streams, write full `seq_len` rows, stop at an optional row budget."""

    def __init__(self, domain: str, seq_len: int, dtype: np.dtype, writers: list[Any],
                 max_sequences: int | None) -> None:
        self.domain = domain
        self.seq_len = seq_len
        self.writers = writers
        self.max_sequences = max_sequences
        self.buf = np.zeros(0, dtype)
        self.stats = SplitStats(seq_len=seq_len, requested_sequences=max_sequences)

    @property
    def full(self) -> bool:
        return self.max_sequences is not None and self.stats.sequences >= self.max_sequences

    def feed(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        if self.full or len(tokens) == 0:
            return
        buffered = len(self.buf)
        arr = np.concatenate([self.buf, tokens]) if buffered else tokens
        n_rows = len(arr) // self.seq_len
        if self.max_sequences is not None:
            n_rows = min(n_rows, self.max_sequences - self.stats.sequences)
        rows = arr[: n_rows * self.seq_len].reshape(n_rows, self.seq_len)
        for row in rows:
            sample = {"tokens": row, "domain": self.domain}
            for w in self.writers:
                w.write(sample)
        self.stats.sequences += n_rows
        if self.full:  # only documents that started before the cut were taken in
            used = n_rows * self.seq_len - buffered
            starts = np.concatenate([[0], doc_ends[:-1]])
            n_docs = int(np.searchsorted(starts, used, side="left"))
            self.stats.documents += n_docs
            self.stats.consumed_tokens += int(doc_ends[n_docs - 1]) if n_docs else 0
            self.buf = np.zeros(0, tokens.dtype)
        else:
            self.stats.documents += len(doc_ends)
            self.stats.consumed_tokens += len(tokens)
            self.buf = arr[n_rows * self.seq_len:].copy()


def mds_columns(seq_len: int, dtype: np.dtype) -> dict[str, str]:
    """The MDS columns of a prepared row (written into the shards and recorded in the manifest)."""
    return {"tokens": f"ndarray:{dtype.name}:{seq_len}", "domain": "str"}


def mds_writer(out: Path, seq_len: int, dtype: np.dtype, compression: str | None, size_limit: str | int,
               upload: tuple[Path, str] | None = None) -> Any:
    """An MDSWriter into `out`; with `upload` = (local root, remote root URL), every shard is uploaded to
    the same place under the remote root as soon as it is complete, and removed locally after `finish`."""
    from streaming import MDSWriter

    out.mkdir(parents=True, exist_ok=True)
    columns = mds_columns(seq_len, dtype)
    target: Any = str(out)
    if upload is not None:
        target = (str(out), upload[1].rstrip("/") + "/" + out.relative_to(upload[0]).as_posix())
    # xxh64 per shard (fast): `data.validate_hash: true` checks it before training
    return MDSWriter(out=target, columns=columns, compression=compression, size_limit=size_limit, hashes=["xxh64"],
                     keep_local=False)
