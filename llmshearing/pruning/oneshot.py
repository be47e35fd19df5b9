"""`llmshearing prune-oneshot`: the baseline the learned masks must beat. Cut a source model to the target
shape by importance scores alone (no training): score the calibration rows of the train data
(`scores.py`), keep the top-scoring units of every structure at the target counts as hard 0/1 masks
(`score_init.oneshot_masks`, the same selection score init starts from), cut (`cut.py`) and write
what `prune-export` writes (`export.write_cut`): our model dir, `domain_weights.json` (the mixture
given, by default every domain's share of the train rows), optionally an HF dir.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmshearing.convert.checkpoint import load_model
from llmshearing.convert.model_card import CardFacts, inherited, invocation
from llmshearing.data.manifest import load_manifest
from llmshearing.models.shape import ShapeError
from llmshearing.pruning import budget
from llmshearing.pruning.cut import cut_model, cut_report
from llmshearing.pruning.export import format_report, write_cut
from llmshearing.pruning.mask_set import DEFAULT_MODULES
from llmshearing.pruning.score_init import oneshot_masks
from llmshearing.pruning.scores import score_rows

log = logging.getLogger(__name__)


def train_rows(data_root: str | Path, domains: list[str], seq_len: int, split: str = "train"):
    """The map-style dataset of every domain's train rows (what a run's loader draws from)."""
    from llmshearing.data.dynamic import build_train_dataloader

    dl = build_train_dataloader(data_root, domains, [1.0 / len(domains)] * len(domains), global_batch_size=1,
                                seq_len=seq_len, split=split)
    return dl.dataset


def prune_oneshot(source: str | Path, out_dir: str | Path, data_root: str | Path, domains: list[str],
                  target: dict[str, Any], modules: list[str] = list(DEFAULT_MODULES), batches: int = 8,
                  batch_size: int = 8, seed: int = 17, proportions: list[float] | None = None,
                  hf_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Score, cut, write; returns the cut report (+ 'scores_tokens')."""
    model = load_model(source, dtype=torch.float32).eval()
    src = model.config.shape
    tgt = budget.resolve_target(src, target, modules)
    if budget.is_budget(target):
        print(budget.describe(src, target, tgt), flush=True)
    manifest = load_manifest(data_root) or {}
    if "seq_len" not in manifest:
        raise ValueError(f"{data_root}: no manifest.json with seq_len (data from `llmshearing prepare-data`)")
    ds = train_rows(data_root, domains, int(manifest["seq_len"]))
    try:
        scores = score_rows(model, ds, batches, batch_size, batch_size, seed, progress=progress)
        sizes = np.asarray(ds.sizes, dtype=np.float64)
    finally:
        ds.close()
    masks = oneshot_masks(src, tgt, modules, scores)
    report = cut_report(src, masks)
    cut = cut_model(model, masks)
    if cut.config.shape != tgt:
        raise ShapeError(f"the one-shot cut has {cut.config.shape.summary()}, the target is {tgt.summary()}")
    if proportions is None:
        w = sizes / sizes.sum()
    else:
        if len(proportions) != len(domains):
            raise ValueError(f"{len(proportions)} proportions for {len(domains)} domains")
        w = np.asarray(proportions, dtype=np.float64) / sum(proportions)
    weights = {d: float(x) for d, x in zip(domains, w)}
    card = CardFacts(config=cut.config, source_model=str(source), source_shape=src, pruning_tokens=scores.tokens,
                     mixture_note="domain weights handed to continued pre-training (one-shot pruning: no training; "
                     "'pruning' tokens = calibration tokens scored)", commands=[invocation()], **inherited(str(source)))
    report = write_cut(cut, report, out_dir, hf_dir, tokenizer_dir, weights, source=f"prune-oneshot of {source}",
                       source_model=str(source), card=card)
    report["scores_tokens"] = scores.tokens
    return report


def _parse_target(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise ValueError(f"--target takes KEY=VALUE pairs, got {it!r}")
        out[k.strip()] = float(v) if k.strip() in budget.BUDGET_KEYS else int(v)
    return out


def _run(args: argparse.Namespace) -> int:
    report = prune_oneshot(args.source, args.out, args.data, args.domains, _parse_target(args.target),
                           modules=args.modules, batches=args.batches, batch_size=args.batch_size, seed=args.seed,
                           proportions=args.proportions, hf_dir=args.hf, tokenizer_dir=args.tokenizer)
    print(format_report(report))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prune-oneshot", help="cut a model to the target shape by importance scores alone (no training)",
        description="The one-shot baseline: score heads, KV groups, MLP channels, hidden channels and layers on "
                    "calibration rows of the train data, keep the top-scoring units at the target counts, cut, "
                    "and write what prune-export writes.")
    p.add_argument("source", help="source llmshearing model dir")
    p.add_argument("out", help="output llmshearing model directory")
    p.add_argument("--data", required=True, help="prepared data root (train split: the calibration rows)")
    p.add_argument("--domains", nargs="+", required=True, help="domains of the data to score on")
    p.add_argument("--target", nargs="+", required=True, metavar="KEY=VALUE",
                   help="target shape keys (d_model=2560 n_heads=20 ...) or a budget (params=1.3e9 or "
                        "params_fraction=0.4)")
    p.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), help="structures that may be pruned")
    p.add_argument("--batches", type=int, default=8, help="calibration batches (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per calibration batch (default 8)")
    p.add_argument("--seed", type=int, default=17, help="seed of the calibration rows' permutation")
    p.add_argument("--proportions", type=float, nargs="+", default=None,
                   help="domain weights written to domain_weights.json (default: the domains' row shares)")
    p.add_argument("--hf", metavar="OUT_DIR", default=None, help="also write a Hugging Face model directory")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory copied into the HF export")
    p.set_defaults(func=_run)
