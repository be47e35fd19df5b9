"""Our two on-disk formats, read and written here only.

The llmshearing model directory (what `model.path` points to):

    <dir>/llmshearing.json     ModelConfig (shape + rope/norm settings + family)
    <dir>/model.safetensors    weights under Hugging Face parameter names
    <dir>/domain_weights.json  optional, written by prune-export: {domain: weight} the pruning run
                               ended with; continued pre-training starts from it (`data.proportions:
                               from_model`)

Safetensors (not pickles) so that loading is safe and can be memory-mapped tensor by tensor.

Composer training checkpoints (`read_composer_checkpoint`), as the Trainer writes them:

    full     one file, `<save_folder>/ep0-ba3200-rank0.pt` (and its `latest-rank0.pt` link): a
             torch.save'd {'state': State.state_dict(), 'rng': ...}; read memory-mapped, so the
             optimizer state in it is never paged in.
    sharded  one folder per checkpoint (FSDP `state_dict_type: sharded`): torch.distributed.checkpoint
             files `__<rank>_0.distcp` + `.metadata`; only the model and ModelInfo entries are read.

Both are self-describing: the ModelInfo callback's state holds the ModelConfig (and the pruning
setup), so a checkpoint alone is enough to rebuild its model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmshearing.convert.safetensors_writer import save_state_dict
from llmshearing.models.config import ModelConfig
from llmshearing.models.llama import LlamaForCausalLM

CONFIG_NAME = "llmshearing.json"
WEIGHTS_NAME = "model.safetensors"
DOMAIN_WEIGHTS_NAME = "domain_weights.json"  # optional: the mixture a pruning run ended with (prune-export)


def save_model_dir(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path) -> Path:
    """Write weights + config. Tied lm_head weights are stored once (as embed_tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if cfg.shape.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_state_dict(sd, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def save_domain_weights(out_dir: str | Path, weights: dict[str, float], source: str,
                        source_model: str | None = None, **facts: Any) -> Path:
    """What a pruning run hands over to continued pre-training: its final mixture, the checkpoint it
    came from and the source model it pruned (the default distillation teacher); `facts` (pruning
    tokens, eval losses) go along for the model cards of what is made from it."""
    path = Path(out_dir) / DOMAIN_WEIGHTS_NAME
    doc = {"weights": weights, "source": source, "source_model": source_model, **facts}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_handover(model_dir: str | Path) -> dict[str, Any] | None:
    """The whole domain_weights.json next to a model, or None when there is none."""
    path = Path(model_dir) / DOMAIN_WEIGHTS_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("weights"), dict):
            raise ValueError("no 'weights' mapping")
        return doc
    except ValueError as e:
        raise CheckpointError(f"{path}: not a domain-weights file ({{'weights': {{domain: weight}}}}): {e}") from e


def load_domain_weights(model_dir: str | Path) -> dict[str, float] | None:
    """{domain: weight} saved next to a model by prune-export, or None when there is none."""
    doc = read_handover(model_dir)
    if doc is None:
        return None
    try:
        return {str(k): float(v) for k, v in doc["weights"].items()}
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(model_dir) / DOMAIN_WEIGHTS_NAME}: weights must be numbers: {e}") from e


def check_safetensors_file(path: str | Path) -> None:
    """Refuse a truncated or foreign `.safetensors` file from its header alone (no tensor is read):
    the file must hold exactly the 8-byte header length, the JSON header and the data it indexes."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file: {e}") from e
    if 8 + n + end != size:
        raise CheckpointError(f"{p}: {size:,} bytes, but its header indexes {8 + n + end:,}: truncated?")


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def load_model_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    f = p / CONFIG_NAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no llmshearing model config (expected {CONFIG_NAME} in the model directory)")
    try:
        return ModelConfig.from_dict(json.loads(f.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f}: invalid model config: {e}") from e


def load_model_dir(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load config + state dict (tensor by tensor, optionally cast)."""
    p = Path(path)
    cfg = load_model_config(p)
    wf = p / WEIGHTS_NAME
    if not wf.is_file():
        raise FileNotFoundError(f"{wf}: missing weights file")
    sd: dict[str, torch.Tensor] = {}
    with safe_open(str(wf), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if cfg.shape.tie_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return cfg, sd


def load_model(path: str | Path, dtype: torch.dtype | None = None, weights: bool = True):
    """Build an `LlamaForCausalLM` from a model directory, refusing missing/unexpected/misshaped keys.

    The model is built on the meta device and the loaded tensors are assigned, so a 7B model is
    neither randomly initialised first nor held twice. Parameters get `dtype` (default: the file's).
    `weights=False` reads only the config and returns the model on the meta device (ranks that
    receive the weights from rank 0).
    """
    if not weights:
        with torch.device("meta"):
            return LlamaForCausalLM(load_model_config(path))
    cfg, sd = load_model_dir(path, dtype)
    return model_from_state_dict(cfg, sd, source=str(path))


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str):
    """An `LlamaForCausalLM` that takes over `sd`'s tensors (no random init, no copy: memory-mapped
    tensors stay mapped), refusing missing/unexpected/misshaped keys with a message naming `source`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    load_state_dict_strict(model, sd, source=source, assign=True)
    model.model.rotary_emb.to_empty(device="cpu")
    model.model.rotary_emb.reset_parameters()
    return model


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with an error that names the file and every bad key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if bad:
            parts.append("shape mismatches: " + "; ".join(bad[:8]))
        raise ValueError(f"{source}: weights do not match the model config: " + " | ".join(parts))
    model.load_state_dict(sd, strict=True, assign=assign)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ------------------------------------------------------------------------- Composer checkpoints
class CheckpointError(ValueError):
    """A file or folder that is not (or no longer) the checkpoint it was given as; names it."""


#: Wrapper names that DDP, FSDP, activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file in a sharded checkpoint folder
#: Where Composer keeps our ModelInfo callback's state in a checkpoint (Composer's key names).
_MODEL_INFO = ("state", "callbacks", "ModelInfo")
_DYNAMIC_LOADING = "DynamicLoadingCallback"  # its state keeps the last per-domain eval losses


def unwrap_key(key: str) -> str:
    """A parameter name as the unwrapped ComposerLlama names it (`model.*`, `l0.*`)."""
    for frag in _WRAPPER_FRAGMENTS:
        key = key.replace(frag, "")
    return key.removeprefix("module.")


@dataclass
class ComposerCheckpoint:
    """What the tools need from a training checkpoint; never the optimizer state.

    model_state: ComposerLlama state dict with unwrapped keys (`model.*`, and `l0.*` when pruning);
        memory-mapped tensors for full checkpoints. model_config / pruning: from ModelInfo.
    dataset_state: the train loader's state (domain weights, cursors), or None.
    """

    path: Path
    model_state: dict[str, torch.Tensor]
    model_config: ModelConfig
    pruning: dict[str, Any] | None
    dataset_state: dict[str, Any] | None
    source_path: str | None = None  # the run's model.path (ModelInfo), e.g. the source a pruning run pruned
    tokens: int | None = None  # tokens trained so far (Composer's timestamp), for the model card
    eval_losses: dict[str, float] | None = None  # per-domain eval losses of the run's last evaluation


def torch_load(path: str | Path, weights_only: bool) -> Any:
    """torch.load on CPU, memory-mapped where the format allows (zip serialization), so a file costs
    no RAM until its tensors are read; any failure becomes one CheckpointError line naming the file."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)  # legacy format
    except Exception as e:  # noqa: BLE001 - unpickling raises many types; report them all the same way
        kind = "a weights-only state dict" if weights_only else "a torch checkpoint"
        raise CheckpointError(f"{path}: cannot be loaded as {kind}: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}") from e


def read_model_info(state: dict[str, Any], source: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, the whole ModelInfo dict: pruning, source_path, ...) from a checkpoint's `state`."""
    _, callbacks, name = _MODEL_INFO
    info = (state.get(callbacks) or {}).get(name)
    if not isinstance(info, dict) or "model_config" not in info:
        raise CheckpointError(f"{source}: no ModelInfo callback state in the checkpoint; was it written by "
                              "llmshearing's train.py?")
    try:
        return ModelConfig.from_dict(info["model_config"]), info
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: invalid model config in ModelInfo: {e}") from e


def read_composer_checkpoint(path: str | Path) -> ComposerCheckpoint:
    """The model weights, ModelInfo and loader state of a full or sharded Composer checkpoint."""
    p = Path(path)
    expected = ("a Composer checkpoint: a file such as latest-rank0.pt, or the folder of a sharded "
                "checkpoint (with .metadata)")
    if p.is_dir():
        if not (p / DCP_METADATA).is_file():
            raise CheckpointError(f"{p}: is a folder without {DCP_METADATA}; expected {expected}")
        state = _read_sharded_state(p)
    elif p.is_file():
        ckpt = torch_load(p, weights_only=False)
        state = ckpt.get("state") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{p}: a torch file without ['state']; expected {expected}")
    else:
        raise CheckpointError(f"{p}: not found; expected {expected}")
    model = state.get("model")
    if not isinstance(model, dict) or not model:
        raise CheckpointError(f"{p}: no model weights under ['state']['model']; expected {expected}")
    cfg, info = read_model_info(state, str(p))
    ds = (state.get("dataset_state") or {}).get("train")
    return ComposerCheckpoint(path=p, model_state={unwrap_key(k): v for k, v in model.items()}, model_config=cfg,
                              pruning=info.get("pruning") or None, dataset_state=ds if isinstance(ds, dict) else None,
                              source_path=info.get("source_path"), tokens=_tokens(state),
                              eval_losses=_last_eval_losses(state))


def _tokens(state: dict[str, Any]) -> int | None:
    ts = (state.get("timestamp") or {}).get("Timestamp") or {}
    tok = ts.get("token")
    return int(tok) if isinstance(tok, int | torch.Tensor) else None


def _last_eval_losses(state: dict[str, Any]) -> dict[str, float] | None:
    """What the dynamic-loading callback measured at the run's last evaluation (None without it)."""
    dl = (state.get("callbacks") or {}).get(_DYNAMIC_LOADING) or {}
    losses = dl.get("last_losses")
    return {str(k): float(v) for k, v in losses.items()} if isinstance(losses, dict) and losses else None


def _read_sharded_state(folder: Path) -> dict[str, Any]:
    """`state` of a sharded (torch.distributed.checkpoint) save, restricted to model, ModelInfo and
    loader state: every saved leaf has its object path in the metadata's planner data, so a nested
    dict of just those leaves (empty tensors of the saved shapes) is what `dcp.load` fills in."""
    # imported here: torch.distributed.checkpoint pulls in FSDP and dynamo (~3.5 s measured), and
    # this module is on the import path of `llmshearing --help` and of every model load
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    wanted = (("state", "model"), _MODEL_INFO, ("state", "dataset_state", "train"), ("state", "timestamp"),
              ("state", "callbacks", _DYNAMIC_LOADING))
    try:
        reader = dcp.FileSystemReader(str(folder))
        meta = reader.read_metadata()
        target: dict[str, Any] = {}
        for fqn, obj_path in (meta.planner_data or {}).items():
            obj_path = tuple(obj_path)
            if not any(obj_path[:len(w)] == w for w in wanted):
                continue
            m = meta.state_dict_metadata[fqn]
            leaf = (torch.empty(tuple(m.size), dtype=m.properties.dtype)
                    if isinstance(m, TensorStorageMetadata) else None)
            node = target
            for part in obj_path[:-1]:
                node = node.setdefault(part, {})
            node[obj_path[-1]] = leaf
        if not target:
            raise CheckpointError(f"{folder}: the sharded checkpoint holds no ['state']['model'] entries")
        dcp.load(target, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - missing/truncated shard files fail in many ways
        raise CheckpointError(f"{folder}: cannot be read as a sharded Composer checkpoint: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}") from e
    return target["state"]
