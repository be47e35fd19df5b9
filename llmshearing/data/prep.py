"""Raw documents per domain -> tokenized, packed, fixed-length MDS shards (+ a manifest).

Layout written under `out`:
    train/<domain>/        MDS shards, columns `tokens` (ndarray:uint16|uint32:<seq_len>), `domain` (str)
    eval/<domain>/         same, documents disjoint from train
    eval_merge/            every domain's eval rows, domain per row (one loader for all domains)
    manifest.json          tokenizer fingerprint, seq_len, dtype, counts per domain and split

Why this shape:
* Documents are assigned to train or eval by a seeded hash of (domain, file, position in file),
  so the split never leaks a document, does not depend on the number of workers or on chunking,
  and is reproducible.
* Per domain and split, documents are concatenated as `BOS + doc + EOS` (no BOS for tokenizers
  that define none, or with `bos=False`; Llama tokenizers define one and the original packs it, so
  per-domain losses are on the footing of the published reference losses) in a fixed order (files in a
  seeded order, documents in file order), packed and cut into `seq_len` rows; the tail shorter
  than a row is dropped and counted. Packing spans files, so short documents (e.g. one `.txt`
  file each) are not lost.
* Token budgets (train tokens, eval sequences per domain) are filled in that file order and
  stop the reading early, so a 0.4B-token sample of a huge corpus does not tokenize all of it.
* The manifest lets training refuse data made with another tokenizer or sequence length
  (`check_manifest`).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmshearing.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llmshearing-mds-v1"
SPLITS = ("train", "eval")
MERGED_EVAL = "eval_merge"
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


def _relpaths(files: Sequence[Path]) -> list[str]:
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
class _Task:
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


def iter_documents(task: _Task, text_field: str) -> Iterator[tuple[int, str]]:
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
class _TaskResult:
    """Per split: all documents' tokens ([BOS] + doc + EOS each) concatenated, and the document ends."""

    tokens: dict[str, np.ndarray]
    doc_ends: dict[str, np.ndarray]
    empty_docs: int = 0


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, cfg: dict[str, Any], pool_worker: bool = True) -> None:
    if pool_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tok"] = load_tokenizer(tokenizer_path)
    _WORKER["cfg"] = cfg


def _tokenize_task(task: _Task) -> _TaskResult:
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
    return _TaskResult(
        tokens={s: np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype) for s in SPLITS},
        doc_ends={s: np.cumsum(np.asarray(lens[s], np.int64)) for s in SPLITS},
        empty_docs=empty,
    )


def _tasks_for_file(domain: str, path: Path, relpath: str, chunk_bytes: int) -> list[_Task]:
    p = str(path)
    if p.endswith(".jsonl") and chunk_bytes > 0:
        size = path.stat().st_size
        if size > chunk_bytes:
            return [_Task(domain, p, relpath, s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)]
    return [_Task(domain, p, relpath)]


def _ordered_map(pool: Any, fn: Callable[[_Task], _TaskResult], tasks: Sequence[_Task],
                 window: int) -> Iterator[_TaskResult]:
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


class _Packer:
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


def _mds_writer(out: Path, seq_len: int, dtype: np.dtype, compression: str | None, size_limit: str | int) -> Any:
    from streaming import MDSWriter

    out.mkdir(parents=True, exist_ok=True)
    columns = {"tokens": f"ndarray:{dtype.name}:{seq_len}", "domain": "str"}
    return MDSWriter(out=str(out), columns=columns, compression=compression, size_limit=size_limit)


def _per_domain(value: int | str | Mapping[str, Any] | None, domains: Sequence[str],
                what: str) -> dict[str, int | None]:
    if value is None:
        return {d: None for d in domains}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(domains))
        if unknown:
            raise ValueError(f"{what}: unknown domain(s) {unknown}; domains are {list(domains)}")
        return {d: (parse_count(value[d]) if value.get(d) is not None else None) for d in domains}
    n = parse_count(value)
    return {d: n for d in domains}


def _normalize_domains(domains: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> dict[str, list[str]]:
    items = list(domains.items()) if isinstance(domains, Mapping) else list(domains)
    if not items:
        raise ValueError("no domains given")
    out: dict[str, list[str]] = {}
    for name, src in items:
        name = str(name)
        if not name or "/" in name or name in (".", "..") or name == MERGED_EVAL:
            raise ValueError(f"invalid domain name {name!r} (no '/', not '{MERGED_EVAL}')")
        if name in out:
            raise ValueError(f"domain '{name}' given twice")
        out[name] = [str(s) for s in ([src] if isinstance(src, (str, os.PathLike)) else src)]
    return out


def _prepare_output(out: Path, overwrite: bool) -> None:
    existing = [out / n for n in (*SPLITS, MERGED_EVAL, MANIFEST_NAME) if (out / n).exists()]
    if existing and not overwrite:
        raise ValueError(f"output {out} already holds prepared data ({existing[0].name}); "
                         "pass overwrite=True / --overwrite to replace it")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def prepare(
    domains: Mapping[str, Any] | Sequence[tuple[str, Any]],
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    seq_len: int = 4096,
    *,
    text_field: str = "text",
    eval_fraction: float = 0.01,
    eval_sequences: int | str | Mapping[str, Any] | None = None,
    train_tokens: int | str | Mapping[str, Any] | None = None,
    seed: int = 17,
    workers: int = 1,
    shuffle_files: bool = True,
    compression: str | None = None,
    shard_size_limit: str | int = "64mb",
    chunk_bytes: int = 64 << 20,
    overwrite: bool = False,
    progress: bool = True,
    bos: bool | None = None,
) -> dict[str, Any]:
    """Tokenize, split, pack and write every domain; returns the manifest (also saved as JSON).

    Args:
        domains: {name: folder | glob | file | [those]} in the order training will use.
        tokenizer: Hugging Face tokenizer directory or SentencePiece `.model` file.
        out: output root (gets train/, eval/, eval_merge/, manifest.json).
        seq_len: tokens per packed row (>= 2: a row must hold an input and a target).
        eval_fraction: probability that a document goes to eval (decided per document).
        eval_sequences: cap on eval rows per domain (int, or {domain: int}); None = all.
        train_tokens: train token budget per domain (int, or {domain: int}); rows = budget // seq_len.
        workers: tokenizer processes (1 = in this process).
        shuffle_files: read files in a seeded random order (so budgets sample across files).
        chunk_bytes: split plain `.jsonl` files bigger than this into separately tokenized chunks.
        bos: start every document with the tokenizer's BOS; None (default) = when it defines one.
    """
    t0 = time.perf_counter()
    if int(seq_len) < 2:
        raise ValueError(f"seq_len must be >= 2 (input + next-token target), got {seq_len}")
    seq_len = int(seq_len)
    if not 0.0 <= float(eval_fraction) <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if not text_field:
        raise ValueError("text_field must be a non-empty string")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    dom_sources = _normalize_domains(domains)
    names = list(dom_sources)
    eval_caps = _per_domain(eval_sequences, names, "eval_sequences")
    train_budget = _per_domain(train_tokens, names, "train_tokens")
    train_caps: dict[str, int | None] = {}
    for d, b in train_budget.items():
        if b is not None and b < seq_len:
            raise ValueError(f"train_tokens for domain '{d}' ({b}) is smaller than one sequence ({seq_len})")
        train_caps[d] = None if b is None else b // seq_len

    files = {d: resolve_domain_files(d, srcs) for d, srcs in dom_sources.items()}
    tok = load_tokenizer(tokenizer)
    if bos and tok.bos_id is None:
        raise ValueError(f"bos=True but the tokenizer {tok.path} defines no BOS token")
    bos_id = tok.bos_id if (bos is None or bos) else None
    dtype = token_dtype(tok.vocab_size)
    out = Path(out).expanduser()
    _prepare_output(out, overwrite)
    with_eval = eval_fraction > 0

    cfg = {"text_field": text_field, "seed": int(seed), "eval_fraction": float(eval_fraction), "dtype": dtype.name,
           "bos_id": bos_id}
    ordered_files: dict[str, list[str]] = {}
    tasks_per_domain: dict[str, list[_Task]] = {}
    for d in names:
        fs = files[d]
        rel = _relpaths(fs)
        order = list(range(len(fs)))
        if shuffle_files:
            order = list(np.random.default_rng([int(seed), zlib.crc32(d.encode())]).permutation(len(fs)))
        ordered_files[d] = [rel[i] for i in order]
        tasks_per_domain[d] = [t for i in order for t in _tasks_for_file(d, fs[i], rel[i], chunk_bytes)]

    from tqdm.auto import tqdm

    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tok.path, cfg))
    else:
        _init_worker(tok.path, cfg, pool_worker=False)
    stats: dict[str, dict[str, SplitStats]] = {s: {} for s in SPLITS}
    empty_docs: dict[str, int] = {}
    total_tasks = sum(len(t) for t in tasks_per_domain.values())
    bar = tqdm(total=total_tasks, unit="part", desc="prepare-data", disable=not progress)
    merged = _mds_writer(out / MERGED_EVAL, seq_len, dtype, compression, shard_size_limit) if with_eval else None
    try:
        for d in names:
            w_train = _mds_writer(out / "train" / d, seq_len, dtype, compression, shard_size_limit)
            packers = {"train": _Packer(d, seq_len, dtype, [w_train], train_caps[d])}
            if with_eval:
                w_eval = _mds_writer(out / "eval" / d, seq_len, dtype, compression, shard_size_limit)
                packers["eval"] = _Packer(d, seq_len, dtype, [w_eval, merged], eval_caps[d])
            empty_docs[d] = 0
            tasks = tasks_per_domain[d]
            done = 0
            for res in _ordered_map(pool, _tokenize_task, tasks, window=2 * workers):
                done += 1
                bar.update(1)
                empty_docs[d] += res.empty_docs
                for s, p in packers.items():
                    p.feed(res.tokens[s], res.doc_ends[s])
                bar.set_postfix(domain=d, rows=packers["train"].stats.sequences)
                if all(p.full for p in packers.values()):
                    break
            bar.update(len(tasks) - done)  # budget reached: the rest is skipped
            for s, p in packers.items():
                for w in p.writers:
                    if w is not merged:
                        w.finish()
                stats[s][d] = p.stats
            if stats["train"][d].sequences == 0:
                raise ValueError(f"domain '{d}' produced no train sequence: its train documents hold "
                                 f"{stats['train'][d].consumed_tokens} tokens < seq_len={seq_len}")
            for s in packers:
                st = stats[s][d]
                if st.requested_sequences is not None and st.sequences < st.requested_sequences:
                    log.warning("domain %s: only %d of the %d requested %s sequences are available",
                                d, st.sequences, st.requested_sequences, s)
                if s == "eval" and st.sequences == 0:
                    log.warning("domain %s: no eval sequence (raise eval_fraction or add data)", d)
    finally:
        bar.close()
        if merged is not None:
            merged.finish()
        if pool is not None:
            pool.terminate()
            pool.join()

    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {"path": tok.path, "name": tok.name, "kind": tok.kind, "sha256": tokenizer_fingerprint(tok.path),
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        "packing": {"bos": bos_id is not None, "document": "BOS + doc + EOS" if bos_id is not None else "doc + EOS"},
        "seq_len": seq_len,
        "dtype": dtype.name,
        "columns": {"tokens": f"ndarray:{dtype.name}:{seq_len}", "domain": "str"},
        "domains": names,
        "seed": int(seed),
        "eval_fraction": float(eval_fraction),
        "text_field": text_field,
        "shuffle_files": shuffle_files,
        "splits": {s: {d: st.to_json() for d, st in stats[s].items()} for s in SPLITS if stats[s]},
        "empty_documents": empty_docs,
        "files": ordered_files,
        "sources": dom_sources,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if with_eval:
        manifest["splits"][MERGED_EVAL] = {"sequences": sum(st.sequences for st in stats["eval"].values())}
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST_NAME)  # the manifest appears only once all shards are complete
    return manifest


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
    eos_id: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    domains: Sequence[str] | None = None,
    split: str | None = None,
    allow_padded_vocab: bool = False,
) -> dict[str, Any]:
    """Refuse data that does not match the run; returns the manifest.

    `vocab_size` is the model's vocabulary: it must equal the data tokenizer's (or, with
    `allow_padded_vocab`, be at least as large, for embeddings padded to a multiple of 64).
    """
    m = load_manifest(root)
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
    if eos_id is not None and int(m["tokenizer"]["eos_id"]) != int(eos_id):
        raise ValueError(f"eos_id mismatch: data at {root} uses eos_id={m['tokenizer']['eos_id']}, expected {eos_id}")
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


# --------------------------------------------------------------------------------------------
# CLI: `llmshearing prepare-data ...`
# --------------------------------------------------------------------------------------------

def _parse_kv(items: Iterable[str], what: str) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if "=" not in it:
            raise ValueError(f"{what} expects NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def _parse_budget(items: list[str] | None, what: str) -> int | dict[str, str] | None:
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return parse_count(items[0])
    return dict(_parse_kv(items, what))


def _load_domains_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if isinstance(data, Mapping) and "domains" in data and isinstance(data["domains"], Mapping):
        data = data["domains"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping domain -> folder/pattern (or a 'domains:' key)")
    return dict(data)


def _run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    domains: dict[str, Any] = {}
    if args.domains_file:
        domains.update(_load_domains_file(args.domains_file))
    for k, v in _parse_kv(args.domain or [], "--domain"):
        if k in domains:
            raise ValueError(f"domain '{k}' given twice")
        domains[k] = v
    if not domains:
        raise ValueError("give at least one --domain NAME=PATH or --domains-file")
    manifest = prepare(
        domains, args.tokenizer, args.out, args.seq_len, text_field=args.text_field,
        eval_fraction=args.eval_fraction, eval_sequences=_parse_budget(args.eval_sequences, "--eval-sequences"),
        train_tokens=_parse_budget(args.train_tokens, "--train-tokens"), seed=args.seed, workers=args.workers,
        shuffle_files=not args.no_shuffle_files, compression=args.compression, shard_size_limit=args.shard_size,
        chunk_bytes=int(args.chunk_mb * (1 << 20)), overwrite=args.overwrite, progress=not args.quiet,
        bos={"auto": None, "on": True, "off": False}[args.bos],
    )
    print(format_summary(manifest))
    print(f"wrote {Path(args.out) / MANIFEST_NAME}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", action="append", metavar="NAME=PATH",
                   help="domain and its folder / glob / file (repeatable; order = domain order)")
    p.add_argument("--domains-file", help="yaml/json mapping domain -> folder/pattern (or list)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer dir or SentencePiece .model")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--text-field", default="text", help="jsonl field holding the document text")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="probability a document goes to eval")
    p.add_argument("--eval-sequences", action="append", metavar="N|NAME=N",
                   help="eval rows per domain (one number for all, or NAME=N repeatable)")
    p.add_argument("--train-tokens", action="append", metavar="N|NAME=N",
                   help="train token budget per domain, e.g. 0.4B or cc=268M (repeatable)")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--no-shuffle-files", action="store_true", help="read files in sorted order")
    p.add_argument("--compression", default=None, help="MDS compression, e.g. zstd (default: none)")
    p.add_argument("--shard-size", default="64mb", help="MDS shard size limit")
    p.add_argument("--chunk-mb", type=float, default=64.0, help="tokenize big .jsonl files in chunks of this size")
    p.add_argument("--overwrite", action="store_true", help="replace existing prepared data under --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--bos", choices=("auto", "on", "off"), default="auto",
                   help="start each document with the tokenizer's BOS (auto: when it defines one, as Llama's do)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare-data", help="tokenize raw documents per domain into MDS shards",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_run_cli)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (`python data_prep/prepare.py ...`), same options as the sub-command."""
    import sys

    parser = argparse.ArgumentParser(prog="prepare-data", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run_cli(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 2
