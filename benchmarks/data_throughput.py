"""Data pipeline throughput on CPU: prepare-data tokens/s and dynamic-loader samples/s.

Prints one JSON object. Everything is generated in a temporary folder (random-word corpus, a small
byte-level BPE tokenizer trained offline, random-token MDS shards for the loader), so it runs
anywhere in well under a minute with the defaults:

    python benchmarks/data_throughput.py [--seq-len 2048] [--prep-mb 4] [--loader-seconds 4]

`loader_over_step_consumption` divides the slowest loader rate measured (tokens/s, mixture updates
included) by what one GPU's training step consumes at the paper's published speeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on with as by at from that this it be are or an which one had "
         "def return class import self lambda yield None True print value index data model train").split()


def _make_corpus(root: Path, mb: float, domains: int, files: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    per_file = int(mb * 1e6 / (domains * files))
    sample: list[str] = []
    for d in range(domains):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(files):
            size = 0
            with open(root / f"d{d}" / f"{f}.jsonl", "w") as fh:
                while size < per_file:
                    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 800)))
                    fh.write(json.dumps({"text": text}) + "\n")
                    size += len(text)
                    if len(sample) < 300:
                        sample.append(text)
    return sample


def _write_random_mds(root: Path, domains: int, rows: int, seq_len: int, vocab: int) -> None:
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    for d in range(domains):
        with MDSWriter(out=str(root / "train" / f"d{d}"), columns={"tokens": f"ndarray:uint16:{seq_len}",
                                                                   "domain": "str"}) as w:
            for _ in range(rows):
                w.write({"tokens": rng.integers(0, vocab, seq_len, dtype=np.uint16), "domain": f"d{d}"})


def _bench_loader(root: Path, domains: int, seq_len: int, batch: int, workers: int, seconds: float,
                  update_every: int = 0) -> dict:
    """Samples/s the loader delivers; with `update_every`, the mixture changes every that many batches
    from the next batch on, as the dynamic-loading callback does after an eval (the prefetched
    batches are redrawn, so this measures that cost too)."""
    from llmshearing.data.dynamic import build_train_dataloader

    names = [f"d{d}" for d in range(domains)]
    dl = build_train_dataloader(root, names, [1.0 / domains] * domains, batch, seq_len, seed=0,
                                num_workers=workers, on_exhausted="repeat")
    it = iter(dl)
    for _ in range(3 if workers == 0 else 2 * workers + 1):  # warm up (workers start, first shards open)
        next(it)
    rng = np.random.default_rng(0)
    n, b, updates, t0 = 0, 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["input_ids"].shape[0]
        b += 1
        if update_every and b % update_every == 0:
            dl.batch_sampler.set_proportions(rng.dirichlet(np.ones(domains)), from_batch=dl.batch_sampler.delivered)
            updates += 1
    dt = time.perf_counter() - t0
    del it, dl
    return {"num_workers": workers, "batch_size": batch, "update_every": update_every, "updates": updates,
            "samples_per_s": round(n / dt, 1), "tokens_per_s": round(n * seq_len / dt, 1), "samples": n,
            "seconds": round(dt, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--prep-mb", type=float, default=4.0, help="raw corpus size for prepare-data")
    ap.add_argument("--prep-workers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048, help="benchmark tokenizer vocabulary")
    ap.add_argument("--loader-rows", type=int, default=600, help="MDS rows per domain for the loader")
    ap.add_argument("--loader-seconds", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--update-every", type=int, nargs="+", default=[0, 10],
                    help="also measure with a mixture change every N batches (0: none)")
    args = ap.parse_args(argv)
    logging.getLogger("llmshearing").setLevel(logging.ERROR)  # the random loader data has no manifest

    from llmshearing.data.prep import prepare
    from llmshearing.data.tokenizer import load_tokenizer, train_tokenizer

    result: dict = {"host": {"python": platform.python_version(), "cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="llmshearing-bench-") as tmp:
        tmp_p = Path(tmp)
        sample = _make_corpus(tmp_p / "raw", args.prep_mb, domains=2, files=4)
        t0 = time.perf_counter()
        tok_dir = train_tokenizer(sample, args.vocab, tmp_p / "tok")
        tok_s = time.perf_counter() - t0
        load_tokenizer(tok_dir)  # one-time transformers import (seconds) is not tokenization throughput
        t0 = time.perf_counter()
        m = prepare({"d0": tmp_p / "raw" / "d0", "d1": tmp_p / "raw" / "d1"}, tok_dir, tmp_p / "prep",
                    args.seq_len, eval_fraction=0.01, workers=args.prep_workers, progress=False)
        dt = time.perf_counter() - t0
        consumed = sum(st["tokens"] + st["dropped_tokens"] for s in ("train", "eval") for st in m["splits"][s].values())
        rows = sum(st["sequences"] for s in ("train", "eval") for st in m["splits"][s].values())
        result["prepare_data"] = {"raw_mb": args.prep_mb, "workers": args.prep_workers, "seq_len": args.seq_len,
                                  "tokens": consumed, "sequences": rows, "seconds": round(dt, 2),
                                  "tokens_per_s": round(consumed / dt, 1), "tokenizer_train_s": round(tok_s, 2)}
        _write_random_mds(tmp_p / "mds", 3, args.loader_rows, args.seq_len, args.vocab)
        result["loader"] = [_bench_loader(tmp_p / "mds", 3, args.seq_len, args.batch_size, w, args.loader_seconds, u)
                            for w in args.workers for u in args.update_every]
    result["loader_seq_len"] = args.seq_len
    # What a training step consumes, per GPU, at the published speeds of this method (A100):
    # pruning 7B ~1,844 tokens/s, continued pre-training 1.3B ~8,684 tokens/s.
    need = {"pruning_7b": 1844.0, "cpt_1.3b": 8684.0}
    worst = min(r["tokens_per_s"] for r in result["loader"])
    result["step_consumption_tokens_per_s_per_gpu"] = need
    result["loader_over_step_consumption"] = {k: round(worst / v, 1) for k, v in need.items()}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
