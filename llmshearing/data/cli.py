"""`llmshearing prepare-data ...` (and `python data_prep/prepare.py ...`): the command line of
`llmshearing.data.prep.prepare`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from llmshearing.data.documents import parse_count
from llmshearing.data.manifest import MANIFEST_NAME, format_summary
from llmshearing.data.prep import prepare
from llmshearing.data.remote import is_remote, join
from llmshearing.logs import setup_logging


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
        data = yaml.safe_load(text)
    if isinstance(data, Mapping) and "domains" in data and isinstance(data["domains"], Mapping):
        data = data["domains"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping domain -> folder/pattern (or a 'domains:' key)")
    return dict(data)


def _run_cli(args: argparse.Namespace) -> int:
    setup_logging()
    # a list of (name, source): prepare() refuses a domain given twice (file and flag, or two flags)
    domains = list((_load_domains_file(args.domains_file) if args.domains_file else {}).items())
    domains += _parse_kv(args.domain or [], "--domain")
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
    print(f"wrote {join(args.out, MANIFEST_NAME) if is_remote(args.out) else Path(args.out) / MANIFEST_NAME}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", action="append", metavar="NAME=PATH",
                   help="domain and its folder / glob / file (repeatable; order = domain order)")
    p.add_argument("--domains-file", help="yaml/json mapping domain -> folder/pattern (or list)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer dir or SentencePiece .model")
    p.add_argument("--out", required=True, help="output root: a folder, or s3://bucket/prefix (uploaded as it is "
                   "written; endpoint and credentials from S3_ENDPOINT_URL / AWS_* in the environment)")
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
                   help="start each document with the tokenizer's BOS (auto: when the tokenizer adds BOS itself, as Llama's do)")


DESCRIPTION = ("Tokenize raw documents per domain (.jsonl, .jsonl.gz or .txt; folders, globs or file lists) into "
               "packed MDS shards with a manifest, split into train and eval; --out may be s3://bucket/prefix.")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare-data", help="tokenize raw documents per domain into MDS shards",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_run_cli)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (`python data_prep/prepare.py ...`), same options as the sub-command."""
    parser = argparse.ArgumentParser(prog="prepare-data", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run_cli(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 2
