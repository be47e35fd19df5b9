"""Hugging Face weight files as uniform, lazy tensor sources, checked against a ModelShape.

A local HF directory holds one or several safetensors files, or `.bin` pickles (sharded or not);
a Composer checkpoint gives an in-memory state dict. Each is a `Source` opened shard by shard, so
a 7B conversion holds one tensor at a time (plus what the format itself keeps mapped); `scan`
lists every tensor with its shape and dtype, `validate_entries` checks the names and shapes against what
the ModelShape implies, and `stream_copy` writes them into one safetensors file.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from llmshearing.convert.checkpoint import torch_load
from llmshearing.convert.safetensors_writer import ST_DTYPES, SafetensorsStreamWriter
from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

#: Weight layouts of a local HF directory, in the order transformers itself prefers them.
HF_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

# ---------------------------------------------------------------------------------------------
# Tensor sources: uniform, lazy access to safetensors files, .bin pickles and in-memory dicts
# ---------------------------------------------------------------------------------------------

_ST_DTYPES_INV = {v: k for k, v in ST_DTYPES.items()}


class _Shard:
    """One opened file (or dict): key listing, metadata without loading, and tensor loading."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class _SafetensorsShard(_Shard):
    def __init__(self, f: Any) -> None:
        self._f = f

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._f.get_slice(key)
        dt = sl.get_dtype()
        if dt not in _ST_DTYPES_INV:
            raise ValueError(f"tensor {key!r} has unsupported safetensors dtype {dt}")
        return tuple(sl.get_shape()), _ST_DTYPES_INV[dt]

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


class _DictShard(_Shard):
    def __init__(self, sd: Mapping[str, Any], name: str) -> None:
        self._sd, self._name = sd, name

    def keys(self) -> list[str]:
        return list(self._sd.keys())

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._sd[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{self._name}: entry {key!r} is a {type(t).__name__}, not a tensor")
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]


@dataclass
class Source:
    """Something that can be opened as a `_Shard`: a weights file or an in-memory state dict."""
    name: str  # shown in messages (a file path, or e.g. "state dict")
    path: Path | None = None
    sd: Mapping[str, Any] | None = None

    @contextmanager
    def open(self) -> Iterator[_Shard]:
        if self.sd is not None:
            yield _DictShard(self.sd, self.name)
        elif self.path is not None and self.path.name.endswith(".safetensors"):
            with safe_open(str(self.path), framework="pt") as f:
                yield _SafetensorsShard(f)
        else:
            sd = _torch_load_weights(self.path)
            try:
                yield _DictShard(sd, self.name)
            finally:
                del sd


def _torch_load_weights(path: Path) -> dict[str, Any]:
    """A pickled state dict (`pytorch_model*.bin`), loaded safely: weights_only=True."""
    sd = torch_load(path, weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(sd).__name__}")
    return sd


def find_hf_weight_sources(hf_dir: str | Path) -> list[Source]:
    """The weight files of a local HF directory, in transformers' order of preference."""
    d = Path(hf_dir)
    for name in HF_WEIGHT_FILES:
        f = d / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [Source(name=str(f), path=f)]
        try:
            weight_map = json.loads(f.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a valid sharded-checkpoint index (needs a 'weight_map'): {e}") from e
        shards = list(dict.fromkeys(weight_map.values()))
        absent = [s for s in shards if not (d / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{f}: shard files listed in the index are missing: {absent}")
        return [Source(name=str(d / s), path=d / s) for s in shards]
    raise FileNotFoundError(f"{d}: no weights found; looked for {', '.join(HF_WEIGHT_FILES)}")


# ---------------------------------------------------------------------------------------------
# Validation against the ModelShape
# ---------------------------------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of our model with its shape, from the model itself built on the meta
    device (no memory), so validation can never drift from the model definition."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def is_dropped_buffer(key: str) -> bool:
    """Old LLaMA checkpoints carry the RoPE inverse frequencies; they are recomputed from the config."""
    return key.endswith("rotary_emb.inv_freq")


def drop_buffers(key: str) -> str | None:
    """The `scan` renamer of every HF-named source: keys unchanged, dropped buffers skipped."""
    return None if is_dropped_buffer(key) else key


@dataclass
class Entry:
    key: str  # HF/our name
    src_key: str  # name in the source
    source: int  # index into the sources list
    shape: tuple[int, ...]
    dtype: torch.dtype


def scan(sources: Sequence[Source], rename: Callable[[str], str | None]) -> dict[str, Entry]:
    """Collect name/shape/dtype of every tensor without loading any (a key mapped to None is skipped)."""
    entries: dict[str, Entry] = {}
    for i, src in enumerate(sources):
        with src.open() as shard:
            for src_key in shard.keys():
                key = rename(src_key)
                if key is None:
                    continue
                if key in entries:
                    raise ValueError(f"{src.name}: tensor {key!r} also appears in {sources[entries[key].source].name}")
                shape, dtype = shard.meta(src_key)
                entries[key] = Entry(key, src_key, i, shape, dtype)
    return entries


def validate_entries(entries: Mapping[str, Entry], sources: Sequence[Source], cfg: ModelConfig, config_source: str) -> None:
    """Refuse missing, unexpected, misshaped and non-float tensors, naming file, key and shapes."""
    want = expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.shape.tie_embeddings else set()
    missing = sorted(set(want) - set(entries) - optional)
    unexpected = sorted(set(entries) - set(want))
    problems: list[str] = []
    if missing:
        problems.append(f"missing tensors {short_list(missing)} (looked in {short_list([s.name for s in sources], 4)})")
    for k in unexpected:
        problems.append(f"{sources[entries[k].source].name}: unexpected tensor {k!r} {entries[k].shape}")
    for k, e in entries.items():
        if k in want and e.shape != want[k]:
            problems.append(f"{sources[e.source].name}: tensor {k!r} has shape {e.shape}, "
                            f"but {config_source} implies {want[k]}")
        if k in want and not e.dtype.is_floating_point:
            problems.append(f"{sources[e.source].name}: tensor {k!r} has dtype {e.dtype} (quantized checkpoints "
                            "are not supported)")
    if problems:
        head = f"weights do not match {config_source} ({cfg.family}: {cfg.shape.summary()})"
        raise ValueError(head + ":\n  " + "\n  ".join(problems[:16]) +
                         (f"\n  ... and {len(problems) - 16} more" if len(problems) > 16 else ""))


def short_list(items: Sequence[str], n: int = 8) -> str:
    return str(list(items[:n]))[:-1] + (", ...]" if len(items) > n else "]")


def load_entry(sources: Sequence[Source], e: Entry) -> torch.Tensor:
    with sources[e.source].open() as shard:
        return shard.get(e.src_key)


def drop_tied_head(entries: dict[str, Entry], sources: Sequence[Source], cfg: ModelConfig) -> None:
    """Tied models store the embedding once. A present lm_head must then equal the embedding:
    otherwise the config and the weights disagree about which model this is."""
    if not cfg.shape.tie_embeddings or "lm_head.weight" not in entries:
        return
    head = load_entry(sources, entries["lm_head.weight"])
    emb = load_entry(sources, entries["model.embed_tokens.weight"])
    if not (head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)):
        raise ValueError(f"{sources[entries['lm_head.weight'].source].name}: tie_word_embeddings is true but "
                         "lm_head.weight differs from model.embed_tokens.weight; set tie_word_embeddings=false "
                         "if the model really has a separate output layer")
    del entries["lm_head.weight"]


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------

def stream_copy(entries: Mapping[str, Entry], sources: Sequence[Source], out_file: Path,
                 dtype: torch.dtype | None, desc: str) -> None:
    """Copy the planned tensors source by source into one safetensors file, casting one tensor at
    a time (never upcasting unless asked: the output dtype is `dtype` or the source's)."""
    def out_dtype(e: Entry) -> torch.dtype:
        return dtype if dtype is not None and e.dtype.is_floating_point else e.dtype

    order = sorted(entries.values(), key=lambda e: e.source)  # stable: keeps each source's key order
    plan = [(e.key, e.shape, out_dtype(e)) for e in order]
    bar = tqdm(total=len(order), desc=desc, unit="tensor", disable=None)
    with SafetensorsStreamWriter(out_file, plan, {"format": "pt"}) as w:
        for e, t in iter_tensors(entries, sources):
            w.write(e.key, t.to(out_dtype(e)))
            del t
            bar.update(1)
    bar.close()


def iter_tensors(entries: Mapping[str, Entry], sources: Sequence[Source]) -> Iterator[tuple[Entry, torch.Tensor]]:
    """(entry, tensor) for every entry, source by source in each source's key order, opening each
    source once (a .bin source is unpickled once, not once per tensor)."""
    order = sorted(entries.values(), key=lambda e: e.source)
    for i, src in enumerate(sources):
        todo = [e for e in order if e.source == i]
        if not todo:
            continue
        with src.open() as shard:
            for e in todo:
                yield e, shard.get(e.src_key)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes and the CLI spellings (bf16, fp16, fp32, bfloat16, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32") from None
