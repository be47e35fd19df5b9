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
