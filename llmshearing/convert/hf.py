"""Conversion between Hugging Face checkpoints and llmshearing models.

Our parameter names are exactly Hugging Face's, so conversion is: translate `config.json` <->
`ModelConfig`, then copy tensors while validating every key and shape against the `ModelShape`.
The original code silently loaded with `strict=False`, took the rest of the config from a gated
Llama-2 repo and cast through fp32; here every mismatch is an error naming the file and key, the
config is carried over from the source (rms_norm_eps, rope settings, token ids, ...), and tensors
are streamed one at a time (source dtype kept unless asked otherwise), so converting a 7B model
holds at most one tensor plus whatever the source format itself keeps mapped.

Public API:
    model_config_from_hf(config_dict, source)        config.json dict -> ModelConfig
    hf_config_from_model_config(cfg, dtype)          ModelConfig -> config.json dict
    convert_hf_to_llmshearing(hf_dir, out_dir, dtype)
    export_to_hf(state_dict, cfg, out_dir, tokenizer_dir, dtype)
    convert_composer_to_hf(ckpt, out_dir, tokenizer_dir, dtype)
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from llmshearing.convert.checkpoint import (
    CONFIG_NAME,
    DCP_METADATA,
    WEIGHTS_NAME,
    is_model_dir,
    load_model_config,
    read_composer_checkpoint,
    torch_load,
)
from llmshearing.convert.safetensors_writer import ST_DTYPES, SafetensorsStreamWriter
from llmshearing.data.tokenizer import HF_TOKENIZER_FILES
from llmshearing.models.config import ARCHITECTURES, ModelConfig
from llmshearing.shape import ModelShape, ShapeError

logger = logging.getLogger(__name__)

HF_CONFIG_NAME = "config.json"
#: Weight layouts of a local HF directory, in the order transformers itself prefers them.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Files copied from `tokenizer_dir` on export (whichever exist): the tokenizer's own files plus
#: generation_config.json, which lives next to them in every HF repo and carries the generation ids.
TOKENIZER_FILES = HF_TOKENIZER_FILES + ("generation_config.json",)

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

#: transformers' class defaults for keys a config.json may omit (LlamaConfig / MistralConfig /
#: Qwen2Config in transformers 4.57). Using the HF defaults (not ours) is what makes an omitted
#: key mean the same model here as in transformers: e.g. rms_norm_eps defaults to 1e-6 there.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "initializer_range": 0.02},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096 * 32,
                "tie_word_embeddings": False, "initializer_range": 0.02, "sliding_window": 4096},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "initializer_range": 0.02, "sliding_window": 4096},
}

#: Keys that must be given explicitly: a default here would silently build a different model.
_REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")

#: Keys that ModelConfig represents (read into it, and written back from it on export).
_CONSUMED_KEYS = frozenset(_REQUIRED_KEYS) | {
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "max_position_embeddings", "initializer_range", "hidden_act", "attention_bias", "mlp_bias",
}

#: Bookkeeping keys that are regenerated on export (or would be stale after pruning, like
#: `layer_types`, one entry per layer), so they are not carried in `extra_hf`.
_DROPPED_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "layer_types", "_commit_hash", "_attn_implementation_autoset", "auto_map",
})

_SUPPORTED_ROPE = ("llama3", "linear", "default")
_ROPE_REQUIRED = {"linear": ("factor",),
                  "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


def _supported_list() -> str:
    return ", ".join(f"{v} (model_type {k!r})" for k, v in ARCHITECTURES.items())


def _family_of(config: Mapping[str, Any], source: str) -> str:
    """Family from `model_type` and/or `architectures`, which must agree when both are given."""
    by_arch = {v: k for k, v in ARCHITECTURES.items()}
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = config.get("model_type")
    if len(archs) > 1:
        raise ValueError(f"{source}: several architectures {archs}; expected exactly one of: {_supported_list()}")
    arch = archs[0] if archs else None
    if arch is not None and arch not in by_arch:
        raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: {_supported_list()}")
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {_supported_list()}")
    if arch is None and model_type is None:
        raise ValueError(f"{source}: neither 'architectures' nor 'model_type' is set; "
                         f"cannot tell the architecture (supported: {_supported_list()})")
    family = by_arch[arch] if arch is not None else model_type
    if model_type is not None and model_type != family:
        raise ValueError(f"{source}: architectures {arch!r} and model_type {model_type!r} disagree")
    return family


def _rope_scaling_from_hf(rs: Any, source: str) -> dict[str, Any] | None:
    """Keep the dict as written (for a faithful export) after checking we implement it."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"{source}: rope_scaling must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in _SUPPORTED_ROPE:
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; "
                         f"supported: {', '.join(_SUPPORTED_ROPE)} or null")
    if kind == "default":
        return None
    missing = [k for k in _ROPE_REQUIRED[kind] if rs.get(k) is None]
    if missing:
        raise ValueError(f"{source}: rope_scaling of type {kind!r} needs {missing}")
    return dict(rs)


def _sliding_window_from_hf(family: str, config: Mapping[str, Any]) -> int | None:
    """Mistral: every layer uses `sliding_window` (null = none). Qwen2: only with use_sliding_window.
    Our model refuses sequences longer than the window (it does not implement the window), which
    is exact for shorter sequences and never silently wrong for longer ones."""
    if family == "mistral":
        return config.get("sliding_window", _HF_DEFAULTS["mistral"]["sliding_window"])
    if family == "qwen2" and config.get("use_sliding_window", False):
        return config.get("sliding_window", _HF_DEFAULTS["qwen2"]["sliding_window"])
    return None


def _check_unsupported_features(family: str, config: Mapping[str, Any], source: str) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (LLaMA-family models use 'silu')")
    if config.get("quantization_config") is not None:
        raise ValueError(f"{source}: quantized checkpoints (quantization_config) cannot be converted; "
                         "use the unquantized bf16/fp16/fp32 weights")
    if family == "llama":
        if config.get("mlp_bias", False):
            raise ValueError(f"{source}: mlp_bias=true is not supported (our MLP projections have no bias)")
        if config.get("attention_bias", False):
            raise ValueError(f"{source}: attention_bias=true is not supported for llama: transformers then puts a "
                             "bias on o_proj too, which our attention does not have (only q/k/v biases, as in qwen2)")


def model_config_from_hf(config_dict: Mapping[str, Any], source: str = HF_CONFIG_NAME) -> ModelConfig:
    """Translate a Hugging Face `config.json` (as a dict) into our ModelConfig.

    Omitted optional keys take transformers' class defaults so the result describes the model that
    transformers would build from the same file. Keys we do not model (bos/eos/pad ids, use_cache,
    max_window_layers, ...) are kept in `extra_hf` and written back on export. `source` names the
    file in error messages.
    """
    family = _family_of(config_dict, source)
    _check_unsupported_features(family, config_dict, source)
    missing = [k for k in _REQUIRED_KEYS if config_dict.get(k) is None]
    if family != "llama" and config_dict.get("num_key_value_heads") is None:
        # MistralConfig / Qwen2Config default to 8 / 32 KV heads whatever num_attention_heads is;
        # a file that omits the key almost certainly meant something else, so ask for it.
        missing.append("num_key_value_heads")
    if missing:
        raise ValueError(f"{source}: missing required keys {missing}")
    defaults = _HF_DEFAULTS[family]

    def get(key: str) -> Any:
        v = config_dict.get(key)
        return defaults[key] if v is None else v

    d, heads = config_dict["hidden_size"], config_dict["num_attention_heads"]
    head_dim = config_dict.get("head_dim")
    if head_dim is None:
        if not isinstance(d, int) or not isinstance(heads, int) or heads <= 0 or d % heads:
            raise ValueError(f"{source}: hidden_size {d} is not divisible by num_attention_heads {heads} "
                             "and head_dim is not set")
        head_dim = d // heads
    try:
        shape = ModelShape(
            d_model=d, n_heads=heads,
            n_kv_heads=config_dict.get("num_key_value_heads") or heads,
            head_dim=head_dim, n_layers=config_dict["num_hidden_layers"],
            intermediate_size=config_dict["intermediate_size"], vocab_size=config_dict["vocab_size"],
            tie_embeddings=bool(get("tie_word_embeddings")),
            qkv_bias=family == "qwen2",
        )
        extra = {k: v for k, v in config_dict.items() if k not in _CONSUMED_KEYS and k not in _DROPPED_KEYS}
        if family == "mistral" or (family == "qwen2" and config_dict.get("use_sliding_window", False)):
            extra.pop("sliding_window", None)  # represented by ModelConfig.sliding_window
        extra.pop("use_sliding_window", None)  # regenerated from ModelConfig.sliding_window
        return ModelConfig(
            shape=shape, family=family,
            rms_norm_eps=float(get("rms_norm_eps")), rope_theta=float(get("rope_theta")),
            rope_scaling=_rope_scaling_from_hf(config_dict.get("rope_scaling"), source),
            max_position_embeddings=int(get("max_position_embeddings")),
            sliding_window=_sliding_window_from_hf(family, config_dict),
            initializer_range=float(get("initializer_range")),
            extra_hf=json.loads(json.dumps(extra)),  # a JSON-clean copy: it goes into llmshearing.json
        )
    except (ShapeError, TypeError) as e:
        raise ValueError(f"{source}: invalid model dimensions: {e}") from e


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A `config.json` dict for the family's transformers class (inverse of `model_config_from_hf`).

    `extra_hf` is written first and the keys we own override it, so a stale extra key can never
    contradict the (possibly pruned) shape. `dtype` becomes `torch_dtype`/`dtype`: both are
    written because transformers < 4.56 reads only the former and newer versions prefer the latter.
    """
    s, family = cfg.shape, cfg.family
    if family not in ARCHITECTURES:
        raise ValueError(f"cannot export family {family!r}; supported: {_supported_list()}")
    if family == "qwen2" and not s.qkv_bias:
        raise ValueError("a qwen2 model without q/k/v biases cannot be exported: Qwen2ForCausalLM always has them")
    if family != "qwen2" and s.qkv_bias:
        raise ValueError(f"a {family} model with q/k/v biases cannot be exported: {ARCHITECTURES[family]} "
                         "has no q/k/v-only bias (use family 'qwen2')")
    out: dict[str, Any] = dict(cfg.extra_hf)
    out.update(
        architectures=[ARCHITECTURES[family]], model_type=family,
        hidden_size=s.d_model, intermediate_size=s.intermediate_size,
        num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
        num_hidden_layers=s.n_layers, vocab_size=s.vocab_size, tie_word_embeddings=s.tie_embeddings,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
        torch_dtype=_dtype_name(dtype), dtype=_dtype_name(dtype),
    )
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    else:  # null = the class default for llama/qwen2; MistralConfig has no such attribute at all
        out.pop("rope_scaling", None)
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif family == "qwen2":
        out["use_sliding_window"] = cfg.sliding_window is not None
        if cfg.sliding_window is not None:
            out["sliding_window"] = cfg.sliding_window
        else:
            out.setdefault("sliding_window", None)
    return dict(sorted(out.items()))


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    """ModelConfig of a local HF directory (its config.json)."""
    f = Path(hf_dir) / HF_CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found; a Hugging Face model directory needs {HF_CONFIG_NAME}")
    try:
        config = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e
    return model_config_from_hf(config, source=str(f))


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
class _Source:
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


def find_hf_weight_sources(hf_dir: str | Path) -> list[_Source]:
    """The weight files of a local HF directory, in transformers' order of preference."""
    d = Path(hf_dir)
    for name in HF_WEIGHT_FILES:
        f = d / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [_Source(name=str(f), path=f)]
        try:
            weight_map = json.loads(f.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{f}: not a valid sharded-checkpoint index (needs a 'weight_map'): {e}") from e
        shards = list(dict.fromkeys(weight_map.values()))
        absent = [s for s in shards if not (d / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{f}: shard files listed in the index are missing: {absent}")
        return [_Source(name=str(d / s), path=d / s) for s in shards]
    raise FileNotFoundError(f"{d}: no weights found; looked for {', '.join(HF_WEIGHT_FILES)}")


# ---------------------------------------------------------------------------------------------
# Validation against the ModelShape
# ---------------------------------------------------------------------------------------------

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of our model with its shape, from the model itself built on the meta
    device (no memory), so validation can never drift from the model definition."""
    from llmshearing.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_dropped_buffer(key: str) -> bool:
    """Old LLaMA checkpoints carry the RoPE inverse frequencies; they are recomputed from the config."""
    return key.endswith("rotary_emb.inv_freq")


@dataclass
class _Entry:
    key: str  # HF/our name
    src_key: str  # name in the source
    source: int  # index into the sources list
    shape: tuple[int, ...]
    dtype: torch.dtype


def _scan(sources: Sequence[_Source], rename: Callable[[str], str | None]) -> dict[str, _Entry]:
    """Collect name/shape/dtype of every tensor without loading any (a key mapped to None is skipped)."""
    entries: dict[str, _Entry] = {}
    for i, src in enumerate(sources):
        with src.open() as shard:
            for src_key in shard.keys():
                key = rename(src_key)
                if key is None:
                    continue
                if key in entries:
                    raise ValueError(f"{src.name}: tensor {key!r} also appears in {sources[entries[key].source].name}")
                shape, dtype = shard.meta(src_key)
                entries[key] = _Entry(key, src_key, i, shape, dtype)
    return entries


def _validate(entries: Mapping[str, _Entry], sources: Sequence[_Source], cfg: ModelConfig, config_source: str) -> None:
    """Refuse missing, unexpected, misshaped and non-float tensors, naming file, key and shapes."""
    want = expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.shape.tie_embeddings else set()
    missing = sorted(set(want) - set(entries) - optional)
    unexpected = sorted(set(entries) - set(want))
    problems: list[str] = []
    if missing:
        problems.append(f"missing tensors {_short(missing)} (looked in {_short([s.name for s in sources], 4)})")
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


def _short(items: Sequence[str], n: int = 8) -> str:
    return str(list(items[:n]))[:-1] + (", ...]" if len(items) > n else "]")


def _load_entry(sources: Sequence[_Source], e: _Entry) -> torch.Tensor:
    with sources[e.source].open() as shard:
        return shard.get(e.src_key)


def _drop_tied_head(entries: dict[str, _Entry], sources: Sequence[_Source], cfg: ModelConfig) -> None:
    """Tied models store the embedding once. A present lm_head must then equal the embedding:
    otherwise the config and the weights disagree about which model this is."""
    if not cfg.shape.tie_embeddings or "lm_head.weight" not in entries:
        return
    head = _load_entry(sources, entries["lm_head.weight"])
    emb = _load_entry(sources, entries["model.embed_tokens.weight"])
    if not (head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)):
        raise ValueError(f"{sources[entries['lm_head.weight'].source].name}: tie_word_embeddings is true but "
                         "lm_head.weight differs from model.embed_tokens.weight; set tie_word_embeddings=false "
                         "if the model really has a separate output layer")
    del entries["lm_head.weight"]


# ---------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ---------------------------------------------------------------------------------------------

def _stream_copy(entries: Mapping[str, _Entry], sources: Sequence[_Source], out_file: Path,
                 dtype: torch.dtype | None, desc: str) -> None:
    """Copy the planned tensors source by source into one safetensors file, casting one tensor at
    a time (never upcasting unless asked: the output dtype is `dtype` or the source's)."""
    def out_dtype(e: _Entry) -> torch.dtype:
        return dtype if dtype is not None and e.dtype.is_floating_point else e.dtype

    order = sorted(entries.values(), key=lambda e: e.source)  # stable: keeps each source's key order
    plan = [(e.key, e.shape, out_dtype(e)) for e in order]
    bar = tqdm(total=len(order), desc=desc, unit="tensor", disable=None)
    with SafetensorsStreamWriter(out_file, plan, {"format": "pt"}) as w:
        for i, src in enumerate(sources):
            todo = [e for e in order if e.source == i]
            if not todo:
                continue
            with src.open() as shard:
                for e in todo:
                    t = shard.get(e.src_key)
                    w.write(e.key, t.to(out_dtype(e)))
                    del t
                    bar.update(1)
    bar.close()


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes and the CLI spellings (bf16, fp16, fp32, bfloat16, ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32") from None


def _refuse_same_dir(src: Path, out: Path) -> None:
    if src.resolve() == out.resolve():
        raise ValueError(f"output directory {out} is the input directory; choose another one "
                         "(the input files would be overwritten while being read)")


# ---------------------------------------------------------------------------------------------
# HF -> llmshearing
# ---------------------------------------------------------------------------------------------

def convert_hf_to_llmshearing(hf_dir: str | Path, out_dir: str | Path,
                              dtype: torch.dtype | str | None = None) -> ModelConfig:
    """Convert a local Hugging Face model directory into our model directory
    (`llmshearing.json` + `model.safetensors`).

    Reads `model.safetensors`, a sharded safetensors index, `pytorch_model.bin` or a sharded .bin
    index; everything is validated against config.json before anything is written, then copied
    tensor by tensor. Returns the ModelConfig.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a directory (expected a local Hugging Face model directory "
                                f"with {HF_CONFIG_NAME} and weights)")
    dtype = resolve_dtype(dtype)
    cfg = read_hf_config(hf_dir)
    sources = find_hf_weight_sources(hf_dir)
    _refuse_same_dir(hf_dir, out)
    entries = _scan(sources, lambda k: None if _is_dropped_buffer(k) else k)
    _validate(entries, sources, cfg, str(hf_dir / HF_CONFIG_NAME))
    _drop_tied_head(entries, sources, cfg)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s (%d tensors in %d file(s)) -> %s", hf_dir, len(entries), len(sources), out)
    _stream_copy(entries, sources, out / WEIGHTS_NAME, dtype, desc="hf->llmshearing")
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg


# ---------------------------------------------------------------------------------------------
# llmshearing -> HF
# ---------------------------------------------------------------------------------------------

def _check_export_dir(out: Path) -> None:
    """transformers picks the first weights layout it finds; a stale shard index or .bin left in
    the directory could shadow the new model.safetensors, so refuse rather than guess."""
    stale = [p.name for p in out.glob("*") if p.name != "model.safetensors" and
             (p.name in HF_WEIGHT_FILES or (p.name.startswith(("model-", "pytorch_model-"))))]
    if stale:
        raise ValueError(f"{out}: already contains other weight files {sorted(stale)}; export into an empty directory")


def _copy_tokenizer(tokenizer_dir: str | Path, out: Path) -> list[str]:
    tok = Path(tokenizer_dir)
    if not tok.is_dir():
        raise FileNotFoundError(f"{tok}: tokenizer directory not found")
    found = [n for n in TOKENIZER_FILES if (tok / n).is_file()]
    if not any(n != "generation_config.json" for n in found):
        raise FileNotFoundError(f"{tok}: no tokenizer files; looked for {', '.join(TOKENIZER_FILES[:-1])}")
    if tok.resolve() != out.resolve():
        for n in found:
            shutil.copy2(tok / n, out / n)
    return found


def _export_sources(sources: Sequence[_Source], entries: dict[str, _Entry], cfg: ModelConfig, out: Path,
                    tokenizer_dir: str | Path | None, dtype: torch.dtype | None, config_source: str) -> Path:
    """Shared tail of every export: validate, write weights + config.json (+ tokenizer)."""
    hf_config_from_model_config(cfg)  # refuses unsupported combinations before anything is written
    _validate(entries, sources, cfg, config_source)
    _drop_tied_head(entries, sources, cfg)
    out.mkdir(parents=True, exist_ok=True)
    _check_export_dir(out)
    emb = entries["model.embed_tokens.weight"]
    hf_cfg = hf_config_from_model_config(cfg, dtype or emb.dtype)
    _stream_copy(entries, sources, out / "model.safetensors", dtype, desc="llmshearing->hf")
    (out / HF_CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tokenizer_dir is not None:
        logger.info("copied tokenizer files %s", _copy_tokenizer(tokenizer_dir, out))
    return out


def export_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                 tokenizer_dir: str | Path | None = None, dtype: torch.dtype | str | None = None) -> Path:
    """Write a Hugging Face model directory (`config.json` + `model.safetensors` [+ tokenizer])
    that `AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.

    Tied models store only `model.embed_tokens.weight` (what `save_pretrained` does); tensors keep
    their dtype unless `dtype` is given. Returns the output directory.
    """
    out = Path(out_dir)
    sources = [_Source(name="state dict", sd=state_dict)]
    entries = _scan(sources, lambda k: None if _is_dropped_buffer(k) else k)
    return _export_sources(sources, entries, cfg, out, tokenizer_dir, resolve_dtype(dtype), "the model config")


def _refuse_pruning_checkpoint(sd: Mapping[str, Any], pruning: Any, source: str) -> None:
    l0 = [k for k in sd if k.startswith("l0.")]
    if l0 or pruning:  # ModelInfo.pruning is None (or empty) outside pruning runs
        logger.warning("%s is a pruning checkpoint (%d mask parameters)", source, len(l0))
        raise ValueError(f"{source}: this is a pruning checkpoint (it carries L0 mask parameters / pruning "
                         "settings); its weights are the unpruned model. Run `llmshearing prune-export` to cut "
                         "it to the target shape first, then convert the resulting model directory")


def convert_composer_to_hf(ckpt: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                           dtype: torch.dtype | str | None = None) -> ModelConfig:
    """Export (a) an llmshearing model directory or (b) a Composer training checkpoint (a full
    `latest-rank0.pt` or a sharded checkpoint folder; config from its ModelInfo callback state) to a
    Hugging Face model directory. Pruning checkpoints are refused (prune-export them first).
    Returns the config.
    """
    path, out = Path(ckpt), Path(out_dir)
    dtype = resolve_dtype(dtype)
    if path.is_dir() and not (path / DCP_METADATA).is_file():
        if not is_model_dir(path):
            hint = " (it looks like a Hugging Face model already)" if (path / HF_CONFIG_NAME).is_file() else ""
            raise FileNotFoundError(f"{path}: not an llmshearing model directory; looked for {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}{hint}")
        _refuse_same_dir(path, out)
        cfg = load_model_config(path)
        sources = [_Source(name=str(path / WEIGHTS_NAME), path=path / WEIGHTS_NAME)]
        entries = _scan(sources, lambda k: k)
        _export_sources(sources, entries, cfg, out, tokenizer_dir, dtype, str(path / CONFIG_NAME))
        return cfg
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; expected a Composer checkpoint (e.g. latest-rank0.pt, or a "
                                f"sharded checkpoint folder) or an llmshearing model directory ({CONFIG_NAME} + "
                                f"{WEIGHTS_NAME})")
    ck = read_composer_checkpoint(path)
    sd = ck.model_state
    _refuse_pruning_checkpoint(sd, ck.pruning, str(path))
    cfg = ck.model_config
    other = sorted(k for k in sd if not k.startswith("model."))
    if other:
        raise ValueError(f"{path}: unexpected entries in the checkpoint's model state {_short(other)}")
    weights = {k.removeprefix("model."): v for k, v in sd.items()}
    del ck, sd
    sources = [_Source(name=str(path), sd=weights)]
    entries = _scan(sources, lambda k: None if _is_dropped_buffer(k) else k)
    _export_sources(sources, entries, cfg, out, tokenizer_dir, dtype, f"{path} (ModelInfo config)")
    return cfg
