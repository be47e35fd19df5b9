"""The manifest of prepared data (`<root>/manifest.json`): what training checks the data against
(tokenizer fingerprint and special ids, packing, seq_len, domains, per-split counts)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmshearing.data.documents import SPLITS
from llmshearing.data.tokenizer import tokenizer_fingerprint

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llmshearing-mds-v1"
MERGED_EVAL = "eval_merge"  # every domain's eval rows in one folder


def load_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a prepared data root (or of its parent, if given a split folder), or None."""
    p = Path(root)
    for cand in (p / MANIFEST_NAME, p.parent / MANIFEST_NAME, p.parent.parent / MANIFEST_NAME):
        if cand.is_file():
            return json.loads(cand.read_text())
    return None


def check_manifest(
    root: str | os.PathLike,
    *,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    domains: Sequence[str] | None = None,
    split: str | None = None,
    allow_padded_vocab: bool = False,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Refuse data that does not match the run; returns the manifest.

    `vocab_size` is the model's vocabulary: it must equal the data tokenizer's (or, with
    `allow_padded_vocab`, be at least as large, for embeddings padded to a multiple of 64).
    `manifest`: the one a caller already loaded (the file lists make it large; read it once).
    The special token ids are checked against the model's config in `config_checks`.
    """
    m = dict(manifest) if manifest is not None else load_manifest(root)
    if m is None:
        raise ValueError(f"no {MANIFEST_NAME} under {root}: not data written by prepare-data")
    if m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{root}: manifest format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if seq_len is not None and int(m["seq_len"]) != int(seq_len):
        raise ValueError(f"seq_len mismatch: data at {root} has seq_len={m['seq_len']}, the run expects {seq_len}")
    tv = int(m["tokenizer"]["vocab_size"])
    if vocab_size is not None:
        if tv > vocab_size or (tv != vocab_size and not allow_padded_vocab):
            raise ValueError(f"vocab_size mismatch: data at {root} was tokenized with vocab_size={tv} "
                             f"({m['tokenizer']['name']}), the model has vocab_size={vocab_size}")
    if tokenizer is not None:
        fp = tokenizer_fingerprint(tokenizer)
        if fp != m["tokenizer"]["sha256"]:
            raise ValueError(f"tokenizer mismatch: data at {root} was made with {m['tokenizer']['path']} "
                             f"(sha256 {m['tokenizer']['sha256'][:12]}), not {tokenizer} (sha256 {fp[:12]})")
    if domains is not None:
        avail = set(m["splits"].get(split, {})) if split else set(m["domains"])
        missing = [d for d in domains if d not in avail]
        if missing:
            where = f"split '{split}'" if split else "the data"
            raise ValueError(f"domain mismatch: {missing} not in {where} at {root} (has {sorted(avail)})")
        if split:
            empty = [d for d in domains if m["splits"][split][d].get("sequences", 1) == 0]
            if empty:
                raise ValueError(f"split '{split}' at {root} has no sequences for {empty}; "
                                 "prepare more data or raise --eval-fraction")
    return m


def format_summary(manifest: Mapping[str, Any]) -> str:
    """Plain-text table: documents, tokens, sequences, dropped tail tokens per domain and split."""
    head = ("domain", "split", "documents", "tokens", "sequences", "dropped")
    rows = []
    tot: dict[str, list[int]] = {}
    for s in SPLITS:
        for d, st in manifest["splits"].get(s, {}).items():
            vals = [st["documents"], st["tokens"], st["sequences"], st["dropped_tokens"]]
            rows.append((d, s, *map(str, vals)))
            acc = tot.setdefault(s, [0, 0, 0, 0])
            for i, v in enumerate(vals):
                acc[i] += v
    for s, acc in tot.items():
        rows.append(("TOTAL", s, *map(str, acc)))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append(f"seq_len={manifest['seq_len']} dtype={manifest['dtype']} "
                 f"tokenizer={manifest['tokenizer']['name']} (vocab {manifest['tokenizer']['vocab_size']}, "
                 f"eos {manifest['tokenizer']['eos_id']}, packed as "
                 f"{manifest.get('packing', {}).get('document', 'doc + EOS')}) in {manifest.get('seconds', 0):.1f}s")
    return "\n".join(lines)
