"""One small tokenizer interface for data preparation.

Data preparation only needs `encode` (without BOS/EOS: data prep inserts them around documents),
the BOS and EOS ids and the vocabulary size (to pick the token dtype). Hugging Face tokenizer directories and
raw SentencePiece `.model` files both appear in practice (the LLaMA tokenizer ships as both), so
`load_tokenizer` hides the difference. Everything is local: nothing is ever downloaded.

`train_tokenizer` builds a tiny byte-level BPE tokenizer offline, for tests and the CPU demo.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

# transformers is imported where a Hugging Face tokenizer is loaded or saved: this module is on the
# import path of `llmshearing --help` (prepare-data), and transformers takes seconds to import.

#: Files that define a Hugging Face tokenizer (hashed to fingerprint it; weights are ignored).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Tokenizer:
    """Minimal tokenizer facade: `encode` never adds BOS/EOS."""

    name: str
    path: str
    eos_id: int
    vocab_size: int
    kind: str  # "hf" | "sentencepiece"
    _impl: Any = field(repr=False, default=None)
    bos_id: int | None = None  # None: the tokenizer defines no BOS
    adds_bos: bool = False  # whether the tokenizer itself starts every text with BOS (Llama's do)

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self._impl.encode(text))
        backend = getattr(self._impl, "backend_tokenizer", None)
        if backend is not None:  # fast path, also avoids the "sequence longer than max length" warning
            return backend.encode(text, add_special_tokens=False).ids
        return list(self._impl.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.kind == "sentencepiece":
            return [list(x) for x in self._impl.encode(list(texts))]
        backend = getattr(self._impl, "backend_tokenizer", None)
        if backend is not None:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.path)


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the tokenizer's defining files, so data and model can be checked to match."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        h.update(p.read_bytes())
        return h.hexdigest()
    files = [p / f for f in HF_TOKENIZER_FILES if (p / f).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(HF_TOKENIZER_FILES[:3])}, ...) in {p}")
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a Hugging Face tokenizer directory or a SentencePiece `.model` file (local only)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p}")
    if p.is_file():
        if p.suffix != ".model":
            raise ValueError(f"tokenizer file {p} is not a SentencePiece .model; pass a Hugging Face "
                             "tokenizer directory or a .model file")
        sp = spm.SentencePieceProcessor(model_file=str(p))
        eos = int(sp.eos_id())
        if eos < 0:
            raise ValueError(f"SentencePiece model {p} defines no EOS piece (eos_id = -1)")
        bos = int(sp.bos_id())
        return Tokenizer(name=p.stem, path=str(p.resolve()), eos_id=eos, vocab_size=int(sp.get_piece_size()),
                         kind="sentencepiece", _impl=sp, bos_id=bos if bos >= 0 else None,
                         adds_bos=bos >= 0)  # raw Llama SentencePiece models are used with BOS
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a Hugging Face tokenizer from {p}: {e}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {p} defines no EOS token (eos_token is None)")
    bos = None if tok.bos_token_id is None else int(tok.bos_token_id)
    adds_bos = bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return Tokenizer(name=p.name, path=str(p.resolve()), eos_id=int(tok.eos_token_id), vocab_size=len(tok),
                     kind="hf", _impl=tok, bos_id=bos, adds_bos=adds_bos)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                    eos_token: str = "</s>", bos_token: str = "<s>") -> Path:
    """Train a byte-level BPE tokenizer offline and save it as a Hugging Face tokenizer directory.

    Byte-level BPE round-trips any text exactly (`decode(encode(x)) == x`), which is what the
    data-preparation tests compare against. `vocab_size` includes the 256 byte symbols and the
    special tokens. Like Llama's tokenizers it starts every text with BOS when special tokens are
    added, so data prep packs BOS + doc + EOS with it.
    """
    from transformers import PreTrainedTokenizerFast

    specials = [bos_token, eos_token]
    min_size = 256 + len(specials)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} for byte-level BPE (256 bytes + specials), "
                         f"got {vocab_size}")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(iter(texts), trainer=trainer)
    raw.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                                       special_tokens=[(bos_token, raw.token_to_id(bos_token))])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_token, bos_token=bos_token)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
