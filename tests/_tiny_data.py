"""A tiny 3-domain corpus (generated, deterministic), its tokenizer and MDS shards, for end-to-end tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

DOMAINS = ("code", "legal", "prose")


def _doc(rng: random.Random, domain: str) -> str:
    if domain == "code":
        lines = [f"def f{rng.randint(0, 99)}(x, y):\n    return x {rng.choice('+-*')} y * {rng.randint(0, 9)}\n"
                 for _ in range(rng.randint(5, 15))]
        return "\n".join(lines)
    if domain == "legal":
        words = ["licensee", "shall", "warranty", "software", "permission", "granted", "copyright", "notice",
                 "liability", "damages", "provided", "conditions"]
    else:
        words = ["the", "model", "river", "quickly", "green", "learns", "small", "data", "over", "a", "bright", "day"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(80, 200))) + "."


def make_tiny_data(root: Path, docs_per_domain: int = 120, seq_len: int = 128, vocab_size: int = 1024) -> Path:
    """raw/<domain>/docs.jsonl -> tokenizer -> data/{train,eval}/<domain>; returns the data root."""
    from llmshearing.data.prep import prepare
    from llmshearing.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = []
    for dom in DOMAINS:
        d = root / "raw" / dom
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "docs.jsonl", "w") as f:
            for _ in range(docs_per_domain):
                t = _doc(rng, dom)
                texts.append(t)
                f.write(json.dumps({"text": t}) + "\n")
    tok = train_tokenizer(texts, vocab_size=vocab_size, out_dir=root / "tokenizer")
    prepare({d: str(root / "raw" / d) for d in DOMAINS}, str(tok), str(root / "data"), seq_len, eval_fraction=0.15,
            eval_sequences=8, seed=0, workers=1, progress=False)
    return root / "data"


REPO = Path(__file__).resolve().parents[1]
TINY_PRUNE = REPO / "yamls/tiny/prune.yaml"


def tiny_model_dirs(data: Path, out: Path) -> tuple[Path, Path]:
    """Random model dirs for runs on `data`: the source of yamls/tiny/prune.yaml's shape (seed 0), and a
    model of its pruning target's shape (seed 1), i.e. what prune-export would leave. (out/src, out/cut)"""
    import torch

    from llmshearing.convert.checkpoint import save_model_dir
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.training.config import (
        build_model_config,
        load_config,
        pruning_target,
    )

    cfg = load_config(TINY_PRUNE, [f"data.root={data}"])
    src = build_model_config(cfg)
    tgt = pruning_target(src.shape, dict(cfg.pruning.target))
    dirs = []
    for seed, mcfg, name in ((0, src, "src"), (1, ModelConfig.from_dict({**src.to_dict(), "shape": tgt.to_dict()}), "cut")):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(mcfg)
        dirs.append(save_model_dir(m.state_dict(), m.config, out / name))
    return dirs[0], dirs[1]


def driver_env(extra: dict | None = None) -> dict:
    """Environment of a `composer ... tests/_mp_driver.py` (or train.py) subprocess run from the repo."""
    import os

    return dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", WANDB_MODE="offline", **(extra or {}))
