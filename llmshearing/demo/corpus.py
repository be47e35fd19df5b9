"""The demo's corpus: three domains of text that every Python installation already has.

  code  - Python source of the standard library
  legal - license texts shipped by the installed distributions
  prose - long descriptions (READMEs) in the installed distributions' metadata

Deterministic: files and distributions sorted by name, duplicates dropped; documents cut into
pieces of about 4,000 characters; written as `<raw_dir>/<domain>/docs.jsonl`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DOMAINS = ("code", "legal", "prose")


def _dedup(docs: Iterator[str], min_chars: int = 200) -> Iterator[str]:
    seen: set[str] = set()
    for d in docs:
        d = d.strip()
        h = hashlib.sha1(" ".join(d.split()).encode()).hexdigest()
        if len(d) >= min_chars and h not in seen:
            seen.add(h)
            yield d


def _distributions() -> list[md.Distribution]:
    by_name = {}
    for d in md.distributions():
        name = (d.metadata.get("Name") or "").lower()
        if name and name not in by_name:
            by_name[name] = d
    return [by_name[k] for k in sorted(by_name)]


def code_docs() -> Iterator[str]:
    std = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(std.glob("*.py")):
        yield p.read_text(encoding="utf-8", errors="replace")


def legal_docs() -> Iterator[str]:
    for d in _distributions():
        for f in sorted(d.files or [], key=str):
            if any(k in f.name.upper() for k in ("LICENSE", "LICENCE", "COPYING")):
                try:
                    yield f.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue


def prose_docs() -> Iterator[str]:
    for d in _distributions():
        body = d.metadata.get_payload() if hasattr(d.metadata, "get_payload") else None
        body = body or d.metadata.get("Description") or ""
        if isinstance(body, str):
            yield body


SOURCES = {"code": code_docs, "legal": legal_docs, "prose": prose_docs}


def _pieces(text: str, size: int = 4000) -> Iterator[str]:
    """Split a long text at line boundaries into documents of about `size` characters, so that every
    domain has enough documents for a document-level train/eval split."""
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        n += len(line)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def build_corpus(raw_dir: Path, chars_per_domain: int) -> dict[str, dict[str, int]]:
    """Write raw/<domain>/docs.jsonl, capped at `chars_per_domain` characters per domain."""
    stats = {}
    for dom in DOMAINS:
        out = raw_dir / dom
        out.mkdir(parents=True, exist_ok=True)
        n, chars = 0, 0
        with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in _dedup(SOURCES[dom]()):
                for doc in list(_pieces(text))[:8]:  # no single source text dominates a domain
                    f.write(json.dumps({"text": doc}) + "\n")
                    n, chars = n + 1, chars + len(doc)
                if chars >= chars_per_domain:
                    break
        if n < 10:
            raise RuntimeError(f"demo corpus: only {n} '{dom}' documents found on this machine")
        stats[dom] = {"documents": n, "chars": chars}
    return stats
