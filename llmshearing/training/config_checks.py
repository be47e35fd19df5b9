"""Semantic checks of a run config that OmegaConf's typing cannot express, run before any model is
built: paths exist, domains match the data folders and their shards are whole, the target shape fits
the source, batch sizes divide, the teacher fits the student. Each failure is a ConfigError naming
the key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmshearing.convert.checkpoint import CheckpointError
from llmshearing.convert.model_source import (
    check_weight_files,
    describe_expected,
    is_model_source,
    source_config,
)
from llmshearing.data.integrity import DataIntegrityError, check_shards
from llmshearing.data.manifest import check_manifest, load_manifest
from llmshearing.data.remote import RemoteError, check_remote_shards, fetch_manifest, list_sizes, parse_remote
from llmshearing.data.sampler import validate_proportions
from llmshearing.models.config import ModelConfig
from llmshearing.models.shape import ShapeError
from llmshearing.pruning.target import validate_target
from llmshearing.training.config import (
    FROM_MODEL,
    ConfigError,
    TrainConfig,
    build_model_config,
    pruning_target,
    resolve_proportions,
    resolve_teacher,
    time_in_batches,
)

log = logging.getLogger(__name__)


def validate(cfg: TrainConfig, world_size: int = 1, check_paths: bool = True) -> None:
    """Semantic checks that OmegaConf's typing cannot express. Raises ConfigError naming the key."""
    model_cfg = _check_model(cfg, check_paths)  # read once; None: model.path not there (check_paths=False)
    _check_batches(cfg, world_size)
    _check_data(cfg, check_paths, model_cfg)
    max_ba = time_in_batches(cfg.max_duration, "max_duration")
    if max_ba <= 0:
        raise ConfigError("config key 'max_duration': must be > 0 batches")
    for key in ("eval_interval", "save_interval"):
        if time_in_batches(getattr(cfg, key), key) <= 0:
            raise ConfigError(f"config key '{key}': must be > 0 batches")
    time_in_batches(cfg.scheduler.warmup, "scheduler.warmup", max_ba)
    if cfg.optimizer.lr <= 0:
        raise ConfigError("config key 'optimizer.lr': must be > 0")
    if cfg.loss_chunk_tokens < 1:
        raise ConfigError(f"config key 'loss_chunk_tokens': must be >= 1 token, got {cfg.loss_chunk_tokens}")
    if cfg.compile and cfg.compile_backend not in _compile_backends():
        raise ConfigError(f"config key 'compile_backend': {cfg.compile_backend!r} is not a torch.compile backend "
                          f"(available: {', '.join(_compile_backends())})")
    if cfg.pruning is not None:
        _check_pruning(cfg, max_ba, model_cfg)
    if cfg.distill is not None:
        _check_distill(cfg, check_paths, model_cfg)


def _compile_backends() -> list[str]:
    import torch._dynamo  # only when compile is asked for (dynamo is slow to import)

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def _check_model(cfg: TrainConfig, check_paths: bool) -> ModelConfig | None:
    m = cfg.model
    if (m.path is None) == (m.init is None):
        raise ConfigError("config key 'model': set exactly one of 'model.path' (a model dir) "
                          "or 'model.init' (random init from a shape)")
    if m.path is not None and check_paths:
        if not is_model_source(m.path):
            raise ConfigError(f"config key 'model.path': {m.path} is not {describe_expected()}; convert other "
                              "formats (e.g. GGUF) with `llmshearing convert hf-to-composer SRC OUT`")
        try:
            check_weight_files(m.path)
        except CheckpointError as e:
            raise ConfigError(f"config key 'model.path': {e}") from e
    return build_model_config(cfg, check_paths=check_paths)


def _check_batches(cfg: TrainConfig, world_size: int) -> None:
    g, mb = cfg.global_train_batch_size, cfg.device_train_microbatch_size
    if g <= 0 or mb <= 0 or cfg.device_eval_batch_size <= 0:
        raise ConfigError("config keys 'global_train_batch_size', 'device_train_microbatch_size', "
                          "'device_eval_batch_size' must be > 0")
    if g % world_size:
        raise ConfigError(f"config key 'global_train_batch_size': {g} is not divisible by the world size {world_size}")
    per_device = g // world_size
    if per_device % mb:
        raise ConfigError(f"config key 'device_train_microbatch_size': {mb} does not divide the per-device batch "
                          f"{per_device} (= global_train_batch_size {g} / world size {world_size})")


def _check_data(cfg: TrainConfig, check_paths: bool, model_cfg: ModelConfig | None) -> None:
    d = cfg.data
    if not d.domains:
        raise ConfigError("config key 'data.domains': list at least one domain")
    if len(set(d.domains)) != len(d.domains):
        raise ConfigError(f"config key 'data.domains': duplicate domain names in {d.domains}")
    if d.remote is not None or d.cache_limit is not None or "://" in d.root:
        _check_remote_keys(d)
    if check_paths and d.remote is not None:  # first: fetches the manifest into the cache (stratified reads it)
        _check_remote_data(d)
    if check_paths or d.proportions != FROM_MODEL:
        try:
            validate_proportions(resolve_proportions(cfg), list(d.domains))
        except ValueError as e:
            raise ConfigError(f"config key 'data.proportions': {e}") from e
    if d.seq_len < 2:
        raise ConfigError("config key 'data.seq_len': must be >= 2")
    if d.num_workers < 0:
        raise ConfigError("config key 'data.num_workers': must be >= 0")
    if d.eval_rows_per_domain is not None and d.eval_rows_per_domain < 1:
        raise ConfigError("config key 'data.eval_rows_per_domain': must be >= 1 (or null for the whole eval split)")
    dl = cfg.dynamic_loading
    if dl is not None:
        if dl.update == "doremi" and len(dl.target_losses) != len(d.domains):
            raise ConfigError(f"config key 'dynamic_loading.target_losses': {len(dl.target_losses)} values for "
                              f"{len(d.domains)} domains {d.domains} (give one reference loss per domain)")
        if dl.target_offsets and len(dl.target_offsets) != len(d.domains):
            raise ConfigError(f"config key 'dynamic_loading.target_offsets': {len(dl.target_offsets)} values for "
                              f"{len(d.domains)} domains {d.domains}")
        if dl.update == "teacher_gap" and cfg.distill is None:
            raise ConfigError("config key 'dynamic_loading.update': teacher_gap takes its reference losses from the "
                              "distillation teacher: add a distill: section (distill.alpha may be 0)")
    root = Path(d.root)
    if check_paths and d.remote is None:
        if not root.is_dir():
            raise ConfigError(f"config key 'data.root': {root} does not exist (prepare data with `llmshearing prepare-data`)")
        for split in (d.train_split, d.eval_split):
            missing = [dom for dom in d.domains if not (root / split / dom).is_dir()]
            if missing:
                have = sorted(p.name for p in (root / split).iterdir()) if (root / split).is_dir() else []
                raise ConfigError(f"config key 'data.domains': no folder {root / split}/<domain> for {missing}; "
                                  f"found domains {have}")
        for split in (d.train_split, d.eval_split):
            try:
                check_shards(root, split, list(d.domains), validate_hash=d.validate_hash)
            except DataIntegrityError as e:
                raise ConfigError(f"config key 'data.root': {e}") from e
    if check_paths:
        manifest = load_manifest(root)
        if manifest is not None:
            for split in (d.train_split, d.eval_split):
                try:
                    check_manifest(root, seq_len=d.seq_len, domains=list(d.domains), split=split, manifest=manifest)
                except ValueError as e:
                    key = "data.seq_len" if "seq_len" in str(e) else "data.domains"
                    raise ConfigError(f"config key '{key}': {e}") from e
            _check_special_tokens(model_cfg, manifest, root)


def _check_remote_keys(d) -> None:
    """data.remote is an s3:// URL without credentials, data.root a local folder (the cache)."""
    if "://" in d.root:
        raise ConfigError(f"config key 'data.root': {d.root} is a URL; put it in data.remote and set data.root "
                          "to a node-local folder for the cache")
    if d.remote is None:
        raise ConfigError("config key 'data.cache_limit': only used with data.remote (shards streamed into data.root)")
    try:
        parse_remote(d.remote)
    except RemoteError as e:
        raise ConfigError(f"config key 'data.remote': {e}") from e
    if d.cache_limit is not None:
        from streaming.base.util import bytes_to_int

        try:
            ok = bytes_to_int(d.cache_limit) > 0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(f"config key 'data.cache_limit': a size like '20gb', got {d.cache_limit!r}")


def _check_remote_data(d) -> None:
    """The remote answers, has every domain of both splits, and every shard has its recorded size (and
    hash, with data.validate_hash) before the model is built; the cache holds the same indexes."""
    try:
        sizes = list_sizes(d.remote)
        Path(d.root).mkdir(parents=True, exist_ok=True)
        fetch_manifest(d.remote, d.root, sizes)
        for split in (d.train_split, d.eval_split):
            check_remote_shards(d.remote, split, list(d.domains), d.root, d.validate_hash, sizes=sizes)
    except (RemoteError, DataIntegrityError) as e:
        raise ConfigError(f"config key 'data.remote': {e}") from e
    except OSError as e:
        raise ConfigError(f"config key 'data.root': cannot use {d.root} as the cache of data.remote: {e}") from e


def _check_special_tokens(model_cfg, manifest: dict[str, Any], root: Path) -> None:
    """The data was packed with the model's EOS, and with its BOS when the data has one (the ids
    a converted Hugging Face model carries in its config); a model with a BOS trained on data
    packed without it only gets a warning (it works, on a different footing from its pretraining)."""
    hf = model_cfg.extra_hf if model_cfg is not None else {}
    tok = manifest.get("tokenizer", {})
    eos, bos = hf.get("eos_token_id"), hf.get("bos_token_id")
    if eos is not None and tok.get("eos_id") is not None:
        allowed = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if int(tok["eos_id"]) not in [int(x) for x in allowed]:
            raise ConfigError(f"config key 'data.root': {root} was packed with eos_id={tok['eos_id']} "
                              f"({tok.get('name')}), the model's config has eos_token_id={eos}: data made with "
                              "another tokenizer?")
    packed_bos = bool(manifest.get("packing", {}).get("bos"))
    if bos is not None and packed_bos and tok.get("bos_id") is not None and int(tok["bos_id"]) != int(bos):
        raise ConfigError(f"config key 'data.root': {root} was packed with bos_id={tok['bos_id']}, the model's "
                          f"config has bos_token_id={bos}: data made with another tokenizer?")
    if bos is not None and not packed_bos and manifest.get("packing", {}).get("tokenizer_adds_bos"):
        log.warning("the model's tokenizer starts texts with BOS (id %s) but %s was packed without it "
                    "(prepare-data --bos auto adds it)", bos, root)


def _check_distill(cfg: TrainConfig, check_paths: bool, student: ModelConfig | None) -> None:
    ds = cfg.distill
    if not 0.0 <= ds.alpha <= 1.0:
        raise ConfigError(f"config key 'distill.alpha': must be in [0, 1] (1 = logits only), got {ds.alpha}")
    if ds.temperature <= 0:
        raise ConfigError(f"config key 'distill.temperature': must be > 0, got {ds.temperature}")
    if not check_paths:
        return
    teacher = resolve_teacher(cfg)
    if not is_model_source(teacher):
        raise ConfigError(f"config key 'distill.teacher': {teacher} is not {describe_expected()}")
    vocab = source_config(teacher).shape.vocab_size
    if student is not None and vocab != student.shape.vocab_size:
        raise ConfigError(f"config key 'distill.teacher': {teacher} has vocab_size {vocab}, "
                          f"the student {student.shape.vocab_size}")


def _check_pruning(cfg: TrainConfig, max_ba: int, src_cfg: ModelConfig | None) -> None:
    pr = cfg.pruning
    if pr.lag_lr <= 0:
        raise ConfigError("config key 'pruning.lag_lr': must be > 0 (the multipliers use -lag_lr for ascent)")
    if pr.lag_betas is not None and (len(pr.lag_betas) != 2 or not all(0 <= b < 1 for b in pr.lag_betas)):
        raise ConfigError(f"config key 'pruning.lag_betas': two numbers in [0, 1), got {pr.lag_betas}")
    if pr.init == "scores" and pr.init_batches < 1:
        raise ConfigError(f"config key 'pruning.init_batches': >= 1 calibration batch, got {pr.init_batches}")
    if pr.init == "scores" and not 0 < pr.init_margin <= 8.0:
        raise ConfigError(f"config key 'pruning.init_margin': in (0, 8] (log_alpha lives in [-4.6, 4.6]), "
                          f"got {pr.init_margin}")
    w = time_in_batches(pr.lagrangian_warmup, "pruning.lagrangian_warmup", max_ba)
    if w > max_ba:
        raise ConfigError(f"config key 'pruning.lagrangian_warmup': {w} batches is longer than max_duration ({max_ba})")
    if src_cfg is None:
        return
    src = src_cfg.shape
    try:
        target = pruning_target(src, pr.target, list(pr.modules))
    except (ShapeError, TypeError) as e:
        raise ConfigError(f"config key 'pruning.target': {e}") from e
    try:
        validate_target(src, target, list(pr.modules))
    except ShapeError as e:
        raise ConfigError(f"config key 'pruning.target': {e}") from e


