"""Raw documents: which files a domain has, which documents go to eval, and their tokens.

A domain is a folder, glob or file list of `.jsonl`, `.jsonl.gz` or `.txt` files. Big plain `.jsonl`
files are cut into byte-range tasks; every task is tokenized in a worker process (`tokenize_task`),
which returns the tokens of each split ([BOS] + doc + EOS per document) and where documents end.
A document's split is a seeded hash of (domain, file, position), so it never depends on the
number of workers or on chunking.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmshearing.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "eval")
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")
_DOCS_PER_ENCODE = 256


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65535), else uint32: halves disk and I/O for LLaMA."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def parse_count(value: str | int | float) -> int:
    """'2048', '1e6', '50M', '0.4B' -> int (K/M/B/T suffixes, decimal)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value}")
        return int(value)
    s = str(value).strip().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(s[-1:].upper(), 1)
    if mult != 1:
        s = s[:-1]
    try:
        x = float(s) * mult
    except ValueError:
        raise ValueError(f"cannot parse a count from {value!r} (examples: 4096, 1e6, 50M, 0.4B)") from None
    if x < 0 or not math.isfinite(x):
        raise ValueError(f"count must be a non-negative number, got {value!r}")
    return int(round(x))


def _is_supported(path: str) -> bool:
    return path.endswith(SUPPORTED_SUFFIXES)


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def resolve_domain_files(domain: str, sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files of one domain from folders (searched recursively), glob patterns or single files."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError(f"domain '{domain}': no source folder or pattern given")
    files: list[Path] = []
    for src in sources:
        s = os.path.expanduser(str(src))
        if _has_magic(s):
            hits = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
            if not hits:
                raise ValueError(f"domain '{domain}': pattern {s} matches no files")
            bad = [h for h in hits if not _is_supported(h)]
            if bad:
                raise ValueError(f"domain '{domain}': pattern {s} matches unsupported files such as {bad[0]} "
                                 f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")
            files += [Path(h) for h in hits]
        elif os.path.isdir(s):
            hits = sorted(str(p) for p in Path(s).rglob("*") if p.is_file() and _is_supported(str(p)))
            if not hits:
                raise ValueError(f"domain '{domain}': folder {s} holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            files += [Path(h) for h in hits]
        elif os.path.isfile(s):
            if not _is_supported(s):
                raise ValueError(f"domain '{domain}': {s} is not a supported file "
                                 f"({', '.join(SUPPORTED_SUFFIXES)})")
            files.append(Path(s))
        else:
            raise FileNotFoundError(f"domain '{domain}': {s} does not exist")
    uniq = sorted({p.resolve() for p in files})
    return uniq


def relpaths(files: Sequence[Path]) -> list[str]:
    """Paths relative to the files' common folder: stable keys for the document split."""
    if len(files) == 1:
        return [files[0].name]
    base = os.path.commonpath([str(f.parent) for f in files])
    return [os.path.relpath(str(f), base) for f in files]


def doc_is_eval(seed: int, domain: str, relpath: str, key: int, eval_fraction: float) -> bool:
    """Seeded hash of the document's identity -> eval with probability `eval_fraction`."""
    if eval_fraction <= 0.0:
        return False
    if eval_fraction >= 1.0:
        return True
    h = hashlib.blake2b(f"{seed}\0{domain}\0{relpath}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < eval_fraction


# --------------------------------------------------------------------------------------------
# Reading documents (runs in the worker processes)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    domain: str
    path: str
    relpath: str
    start: int = 0  # byte range, only for plain .jsonl chunks
    end: int = -1


def _json_line_text(raw: bytes, text_field: str, where: str) -> str:
    """The text of one jsonl line; `where` (file and line/byte) goes into the error."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None
    return _doc_text(obj, text_field, where)


def _doc_text(obj: Any, text_field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:10])
        raise ValueError(f"{where}: no text field '{text_field}' (keys: {keys}); "
                         "choose the field with --text-field / text_field=")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
    return text


def iter_documents(task: Task, text_field: str) -> Iterator[tuple[int, str]]:
    """(key, text) per document; key = byte offset (jsonl), line number (jsonl.gz) or 0 (txt)."""
    path = task.path
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield 0, f.read()
        return
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            for lineno, raw in enumerate(f):
                if raw.strip():
                    yield lineno, _json_line_text(raw, text_field, f"{path} line {lineno + 1}")
        return
    with open(path, "rb") as f:
        pos = task.start
        if pos > 0:  # align to the first line starting at or after `start`
            f.seek(pos - 1)
            skipped = f.readline()
            pos = pos - 1 + len(skipped)
        else:
            f.seek(0)
        end = task.end if task.end >= 0 else math.inf
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            if raw.strip():
                yield pos, _json_line_text(raw, text_field, f"{path} byte {pos}")
            pos += len(raw)


@dataclass
class TaskResult:
    """Per split: all documents' tokens ([BOS] + doc + EOS each) concatenated, and the document ends."""

    tokens: dict[str, np.ndarray]
    doc_ends: dict[str, np.ndarray]
    empty_docs: int = 0


_WORKER: dict[str, Any] = {}


def init_worker(tokenizer_path: str, cfg: dict[str, Any], pool_worker: bool = True) -> None:
    if pool_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tok"] = load_tokenizer(tokenizer_path)
    _WORKER["cfg"] = cfg


def tokenize_task(task: Task) -> TaskResult:
    tok: Tokenizer = _WORKER["tok"]
    cfg = _WORKER["cfg"]
    dtype = np.dtype(cfg["dtype"])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    lens: dict[str, list[int]] = {s: [] for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    empty = 0

    bos = cfg.get("bos_id")
    head = 0 if bos is None else 1

    def flush(split: str) -> None:
        for ids in tok.encode_batch(pending[split]):
            arr = np.empty(head + len(ids) + 1, dtype=dtype)
            if head:
                arr[0] = bos
            arr[head:-1] = ids
            arr[-1] = tok.eos_id
            parts[split].append(arr)
            lens[split].append(len(arr))
        pending[split].clear()

    for key, text in iter_documents(task, cfg["text_field"]):
        if not text:
            empty += 1
            continue
        split = "eval" if doc_is_eval(cfg["seed"], task.domain, task.relpath, key, cfg["eval_fraction"]) else "train"
        pending[split].append(text)
        if len(pending[split]) >= _DOCS_PER_ENCODE:
            flush(split)
    for s in SPLITS:
        flush(s)
    return TaskResult(
        tokens={s: np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype) for s in SPLITS},
        doc_ends={s: np.cumsum(np.asarray(lens[s], np.int64)) for s in SPLITS},
        empty_docs=empty,
    )


def tasks_for_file(domain: str, path: Path, relpath: str, chunk_bytes: int) -> list[Task]:
    p = str(path)
    if p.endswith(".jsonl") and chunk_bytes > 0:
        size = path.stat().st_size
        if size > chunk_bytes:
            return [Task(domain, p, relpath, s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)]
    return [Task(domain, p, relpath)]


def ordered_map(pool: Any, fn: Callable[[Task], TaskResult], tasks: Sequence[Task],
                 window: int) -> Iterator[TaskResult]:
    """Results in task order with at most `window` tasks in flight; stopping early wastes little."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    inflight: deque = deque()
    it = iter(tasks)
    for t in it:
        inflight.append(pool.apply_async(fn, (t,)))
        if len(inflight) >= window:
            break
    while inflight:
        res = inflight.popleft().get()
        nxt = next(it, None)
        if nxt is not None:
            inflight.append(pool.apply_async(fn, (nxt,)))
        yield res
