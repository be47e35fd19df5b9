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

import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llmshearing.data.documents import (
    SPLITS,
    Task,
    init_worker,
    ordered_map,
    parse_count,
    relpaths,
    resolve_domain_files,
    tasks_for_file,
    token_dtype,
    tokenize_task,
)
from llmshearing.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MERGED_EVAL
from llmshearing.data.packing import Packer, SplitStats, mds_columns, mds_writer
from llmshearing.data.remote import delete_prefix, is_remote, join, list_sizes, upload_file
from llmshearing.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)


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


@dataclass
class _Plan:
    """Everything `prepare` decided before reading a document: what to read, in which order, with
    what budgets, and how documents are packed."""

    names: list[str]
    sources: dict[str, list[str]]
    ordered_files: dict[str, list[str]]
    tasks: dict[str, list[Task]]
    train_caps: dict[str, int | None]
    eval_caps: dict[str, int | None]
    tok: Tokenizer
    bos_id: int | None
    dtype: np.dtype
    worker_cfg: dict[str, Any]


def _plan(domains: Mapping[str, Any] | Sequence[tuple[str, Any]], tokenizer: str | os.PathLike, seq_len: int,
          text_field: str, eval_fraction: float, eval_sequences: Any, train_tokens: Any, seed: int, workers: int,
          shuffle_files: bool, chunk_bytes: int, bos: bool | None) -> _Plan:
    """Check the arguments, resolve every domain's files (seeded order) and cut them into tasks."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (input + next-token target), got {seq_len}")
    if not 0.0 <= float(eval_fraction) <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if not text_field:
        raise ValueError("text_field must be a non-empty string")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sources = _normalize_domains(domains)
    names = list(sources)
    eval_caps = _per_domain(eval_sequences, names, "eval_sequences")
    train_caps: dict[str, int | None] = {}
    for d, b in _per_domain(train_tokens, names, "train_tokens").items():
        if b is not None and b < seq_len:
            raise ValueError(f"train_tokens for domain '{d}' ({b}) is smaller than one sequence ({seq_len})")
        train_caps[d] = None if b is None else b // seq_len
    files = {d: resolve_domain_files(d, srcs) for d, srcs in sources.items()}
    tok = load_tokenizer(tokenizer)
    if bos and tok.bos_id is None:
        raise ValueError(f"bos=True but the tokenizer {tok.path} defines no BOS token")
    bos_id = tok.bos_id if (tok.adds_bos if bos is None else bos) else None
    dtype = token_dtype(tok.vocab_size)
    ordered: dict[str, list[str]] = {}
    tasks: dict[str, list[Task]] = {}
    for d in names:
        fs, rel = files[d], relpaths(files[d])
        order = list(range(len(fs)))
        if shuffle_files:
            order = list(np.random.default_rng([int(seed), zlib.crc32(d.encode())]).permutation(len(fs)))
        ordered[d] = [rel[i] for i in order]
        tasks[d] = [t for i in order for t in tasks_for_file(d, fs[i], rel[i], chunk_bytes)]
    cfg = {"text_field": text_field, "seed": int(seed), "eval_fraction": float(eval_fraction), "dtype": dtype.name,
           "bos_id": bos_id}
    return _Plan(names, sources, ordered, tasks, train_caps, eval_caps, tok, bos_id, dtype, cfg)


def _write_domain(d: str, plan: _Plan, out: Path, seq_len: int, writer_args: tuple, pool: Any, workers: int,
                  merged: Any, bar: Any) -> tuple[dict[str, SplitStats], int]:
    """Tokenize one domain's tasks in order and pack them into its train (and eval) shards until
    the budgets are met; returns the per-split statistics and the number of empty documents."""
    packers = {"train": Packer(d, seq_len, plan.dtype, [mds_writer(out / "train" / d, *writer_args)],
                               plan.train_caps[d])}
    if merged is not None:
        packers["eval"] = Packer(d, seq_len, plan.dtype, [mds_writer(out / "eval" / d, *writer_args), merged],
                                 plan.eval_caps[d])
    empty, done = 0, 0
    for res in ordered_map(pool, tokenize_task, plan.tasks[d], window=2 * workers):
        done += 1
        bar.update(1)
        empty += res.empty_docs
        for split, p in packers.items():
            p.feed(res.tokens[split], res.doc_ends[split])
        bar.set_postfix(domain=d, rows=packers["train"].stats.sequences)
        if all(p.full for p in packers.values()):
            break
    bar.update(len(plan.tasks[d]) - done)  # budget reached: the rest is skipped
    for p in packers.values():
        for w in p.writers:
            if w is not merged:
                w.finish()
    stats = {split: p.stats for split, p in packers.items()}
    if stats["train"].sequences == 0:
        raise ValueError(f"domain '{d}' produced no train sequence: its train documents hold "
                         f"{stats['train'].consumed_tokens} tokens < seq_len={seq_len}")
    for split, st in stats.items():
        if st.requested_sequences is not None and st.sequences < st.requested_sequences:
            log.warning("domain %s: only %d of the %d requested %s sequences are available",
                        d, st.sequences, st.requested_sequences, split)
        if split == "eval" and st.sequences == 0:
            log.warning("domain %s: no eval sequence (raise eval_fraction or add data)", d)
    return stats, empty


def _manifest(plan: _Plan, stats: dict[str, dict[str, SplitStats]], empty_docs: dict[str, int], seq_len: int,
              seed: int, eval_fraction: float, text_field: str, shuffle_files: bool, seconds: float) -> dict[str, Any]:
    tok = plan.tok
    m = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {"path": tok.path, "name": tok.name, "kind": tok.kind, "sha256": tokenizer_fingerprint(tok.path),
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        "packing": {"bos": plan.bos_id is not None,
                    "document": "BOS + doc + EOS" if plan.bos_id is not None else "doc + EOS",
                    "tokenizer_adds_bos": tok.adds_bos},
        "seq_len": seq_len,
        "dtype": plan.dtype.name,
        "columns": mds_columns(seq_len, plan.dtype),
        "domains": plan.names,
        "seed": int(seed),
        "eval_fraction": float(eval_fraction),
        "text_field": text_field,
        "shuffle_files": shuffle_files,
        "splits": {s: {d: st.to_json() for d, st in stats[s].items()} for s in SPLITS if stats[s]},
        "empty_documents": empty_docs,
        "files": plan.ordered_files,
        "sources": plan.sources,
        "seconds": round(seconds, 3),
    }
    if stats["eval"]:
        m["splits"][MERGED_EVAL] = {"sequences": sum(st.sequences for st in stats["eval"].values())}
    return m


# prepare() is the public entry point: most of its ~65 lines are its documented keyword arguments;
# the work is in _plan, _write_domain and _manifest.
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
        bos: start every document with the tokenizer's BOS; None (default) = when the tokenizer itself
            adds BOS to a text (Llama-2/3 tokenizers do; SmolLM2's and Qwen2's do not).
    """
    t0 = time.perf_counter()
    seq_len = int(seq_len)
    plan = _plan(domains, tokenizer, seq_len, text_field, eval_fraction, eval_sequences, train_tokens, seed,
                 workers, shuffle_files, chunk_bytes, bos)
    remote = str(out) if is_remote(out) else None
    out = _prepare_remote(remote, overwrite) if remote else Path(out).expanduser()
    if not remote:
        _prepare_output(out, overwrite)
    writer_args = (seq_len, plan.dtype, compression, shard_size_limit, (out, remote) if remote else None)
    pool = _tokenizer_pool(plan, workers)
    stats: dict[str, dict[str, SplitStats]] = {s: {} for s in SPLITS}
    empty_docs: dict[str, int] = {}
    bar = tqdm(total=sum(len(t) for t in plan.tasks.values()), unit="part", desc="prepare-data", disable=not progress)
    merged = mds_writer(out / MERGED_EVAL, *writer_args) if eval_fraction > 0 else None
    try:
        for d in plan.names:
            per_split, empty_docs[d] = _write_domain(d, plan, out, seq_len, writer_args, pool, workers, merged, bar)
            for split, st in per_split.items():
                stats[split][d] = st
    finally:
        bar.close()
        if merged is not None:
            merged.finish()
        if pool is not None:
            pool.terminate()
            pool.join()
    manifest = _manifest(plan, stats, empty_docs, seq_len, seed, eval_fraction, text_field, shuffle_files,
                         time.perf_counter() - t0)
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST_NAME)  # the manifest appears only once all shards are complete
    if remote:  # likewise in the bucket: the writers have uploaded every shard when finish() returned
        upload_file(out / MANIFEST_NAME, join(remote, MANIFEST_NAME))
        shutil.rmtree(out, ignore_errors=True)
    return manifest


def _prepare_remote(remote: str, overwrite: bool) -> Path:
    """Check the remote root (reachable, bucket exists, empty unless overwrite) before any work;
    returns a local staging folder the writers write each shard to before uploading it."""
    have = [k for k in list_sizes(remote) if k.split("/")[0] in (*SPLITS, MERGED_EVAL, MANIFEST_NAME)]
    if have and not overwrite:
        raise ValueError(f"output {remote} already holds prepared data ({have[0]}); "
                         "pass overwrite=True / --overwrite to replace it")
    if have:
        delete_prefix(remote)
    return Path(tempfile.mkdtemp(prefix="prepare-data-"))


def _tokenizer_pool(plan: _Plan, workers: int) -> Any:
    """Worker processes that tokenize tasks (None: tokenize in this process)."""
    if workers > 1:
        return multiprocessing.get_context("fork").Pool(workers, initializer=init_worker,
                                                        initargs=(plan.tok.path, plan.worker_cfg))
    init_worker(plan.tok.path, plan.worker_cfg, pool_worker=False)
    return None
