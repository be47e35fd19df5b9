"""Run configuration: schema (dataclasses), loading (yaml + `key=value` overrides), and the values
resolved from it (model config, target shape, initial mixture, teacher).

OmegaConf structured configs reject unknown keys and wrong types with the full key path; the
semantic checks (`config_checks.validate`: paths exist, domains match data folders, target shape fits
the source, batch sizes divide) run before any model is built, so a bad config fails in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from composer.core import Time, TimeUnit
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmshearing.convert.checkpoint import (
    DOMAIN_WEIGHTS_NAME,
    CheckpointError,
    load_domain_weights,
    read_handover,
)
from llmshearing.convert.model_source import source_config
from llmshearing.data.manifest import load_manifest
from llmshearing.models.config import ModelConfig
from llmshearing.models.losses import DEFAULT_CHUNK_TOKENS, Divergence
from llmshearing.models.shape import ModelShape, ShapeError
from llmshearing.pruning import budget


class ConfigError(ValueError):
    """A run config that cannot work; the message names the key."""


# String choices, typed: OmegaConf refuses any other value when the config is loaded, naming the key
# and the allowed values ("Invalid value 'bf16', expected one of [amp_bf16, amp_fp16, fp32]"). Each
# member's name is its value, and the members are strings, so they compare and pass on as plain str.
class Precision(str, Enum):
    amp_bf16 = "amp_bf16"
    amp_fp16 = "amp_fp16"
    fp32 = "fp32"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class MixedPrecision(str, Enum):
    DEFAULT = "DEFAULT"  # params gathered in bf16/fp16, gradients reduced in fp32
    PURE = "PURE"  # both in bf16/fp16
    FULL = "FULL"  # fp32 throughout


class StateDictType(str, Enum):
    full = "full"  # one checkpoint file, gathered on rank 0
    sharded = "sharded"  # one folder per checkpoint, every rank writes its shard (torch.distributed.checkpoint)


class PruningInit(str, Enum):
    uniform = "uniform"  # the paper's: every log_alpha from N(5, 0.01), clamped
    scores = "scores"  # from importance scores of the run's train data (pruning/score_init.py)


class OnExhausted(str, Enum):
    stop = "stop"
    repeat = "repeat"


class MixtureUpdate(str, Enum):
    doremi = "doremi"  # exponentiated gradient against dynamic_loading.target_losses
    teacher_gap = "teacher_gap"  # the same against the teacher's eval losses (needs distill:)
    constant = "constant"  # baseline: the yaml's mixture, fixed
    stratified = "stratified"  # baseline: the domains' token shares, fixed


@dataclass
class ModelInitConfig:
    """Random initialisation from a shape (tests, the demo, from-scratch baselines)."""
    shape: dict[str, Any] = field(default_factory=dict)
    family: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 4096


@dataclass
class ModelSection:
    path: Optional[str] = None  # an llmshearing model dir (convert hf-to-composer / prune-export output)
    init: Optional[ModelInitConfig] = None


@dataclass
class PruningSection:
    target: dict[str, Any] = field(default_factory=dict)  # ModelShape keys; missing ones copy the source
    modules: list[str] = field(default_factory=lambda: ["layer", "head", "intermediate", "hidden"])
    lagrangian_warmup: str = "640ba"
    lag_lr: float = 1.0
    lag_betas: Optional[list[float]] = None  # Adam betas of masks + multipliers (None: optimizer.betas)
    eval_target_model: bool = False
    init: PruningInit = PruningInit.uniform  # scores: the step-0 masks keep the top-scoring units
    init_batches: int = 8  # calibration global batches of the train data (init: scores)
    init_margin: float = 2.0  # log_alpha gap between the lowest kept and highest dropped unit (init: scores)


@dataclass
class DataSection:
    # the prepared data folder; with `remote`, the node-local cache the shards are streamed into
    root: str = "???"
    # prepared data in object storage (s3://bucket/prefix, same layout as a local root); credentials and
    # endpoint come from the environment (AWS_*, S3_ENDPOINT_URL), never from the yaml
    remote: Optional[str] = None
    cache_limit: Optional[str] = None  # with remote: bytes of shards kept in the cache per dataset ("20gb")
    domains: list[str] = field(default_factory=list)
    # initial domain weights: a list (one per domain), or "from_model": the mixture the pruning run
    # ended with, saved next to model.path by prune-export (domain_weights.json)
    proportions: Any = field(default_factory=list)
    seq_len: int = 4096
    train_split: str = "train"
    eval_split: str = "eval"
    num_workers: int = 8
    on_exhausted: OnExhausted = OnExhausted.stop
    # rows of every domain's eval split used per evaluation (the first N, all ranks together, so the
    # same rows whatever the world size); None: the whole split
    eval_rows_per_domain: Optional[int] = None
    validate_hash: bool = False  # also check every shard's recorded hash before training (reads all data)


@dataclass
class DynamicLoadingSection:
    update: MixtureUpdate = MixtureUpdate.doremi
    target_losses: list[float] = field(default_factory=list)
    target_offsets: list[float] = field(default_factory=list)  # teacher_gap: added to the teacher's losses
    eta: float = 1.0
    smoothing: float = 1e-4
    clip_negative: bool = True


@dataclass
class DistillSection:
    """Distillation from a frozen teacher (`callbacks.distillation`), for pruning and continued pre-training."""
    teacher: Optional[str] = None  # model dir or HF dir; default: the pruning run's source (see resolve_teacher)
    alpha: float = 0.5  # weight of the distillation term; 1.0 = logits only
    temperature: float = 1.0
    divergence: Divergence = Divergence.forward_kl


@dataclass
class OptimizerSection:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerSection:
    warmup: str = "0.1dur"
    alpha_f: float = 0.1


@dataclass
class FSDPSection:
    """FSDP2 (`llmshearing.models.sharding`): every decoder layer and the L0 module (always fp32) their own
    units, parameters sharded over all ranks. On CPU (gloo) as on GPU (nccl). Setting any `fsdp.*` key
    on the command line turns it on with these defaults for the others."""
    reshard_after_forward: bool = True  # True: FULL_SHARD; False: keep gathered until backward (SHARD_GRAD_OP)
    mixed_precision: MixedPrecision = MixedPrecision.DEFAULT  # with precision amp_bf16 / amp_fp16
    activation_checkpointing: bool = True
    state_dict_type: StateDictType = StateDictType.full


@dataclass
class LoggersSection:
    console: bool = True
    console_interval: str = "10ba"
    file: bool = True
    wandb: Optional[dict[str, Any]] = None  # e.g. {project: llmshearing, entity: null, tags: []}


@dataclass
class TrainConfig:
    run_name: str = "???"
    seed: int = 17
    model: ModelSection = field(default_factory=ModelSection)
    pruning: Optional[PruningSection] = None
    data: DataSection = field(default_factory=DataSection)
    dynamic_loading: Optional[DynamicLoadingSection] = None
    distill: Optional[DistillSection] = None
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    max_duration: str = "???"
    global_train_batch_size: int = 32
    device_train_microbatch_size: int = 4
    device_eval_batch_size: int = 8
    eval_interval: str = "50ba"
    eval_first: bool = False  # evaluate (and update the mixture) once before the first step, as the original
    save_folder: str = "runs/{run_name}"
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = 1
    autoresume: bool = True
    precision: Precision = Precision.amp_bf16
    device: Device = Device.auto
    dist_timeout: float = 1800.0  # seconds a collective may wait (rank 0 loading a 7B source, slow saves)
    fsdp: Optional[FSDPSection] = field(default_factory=FSDPSection)
    # tokens per chunk of the LM head + loss (models/losses.py): bounds the logits held at once
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    compile: bool = False  # torch.compile each decoder layer (models/llama.py: compile_layers)
    compile_backend: str = "inductor"  # torch.compile backend ('aot_eager' needs no C compiler)
    grad_clip_norm: Optional[float] = 1.0
    loggers: LoggersSection = field(default_factory=LoggersSection)


def load_config(yaml_path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """yaml + dotlist overrides -> a typed TrainConfig (unknown keys and wrong types raise)."""
    p = Path(yaml_path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        schema = OmegaConf.structured(TrainConfig)
        merged = OmegaConf.merge(schema, OmegaConf.load(p), OmegaConf.from_dotlist(list(overrides or [])))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{p}: required key(s) not set: {', '.join(missing)}")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{p}: config key '{key}': {msg}" if key else f"{p}: {msg}") from e
    assert isinstance(cfg, TrainConfig)
    cfg.save_folder = cfg.save_folder.replace("{run_name}", cfg.run_name)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def time_in_batches(value: str, key: str, max_batches: int | None = None) -> int:
    """'640ba' -> 640; '0.2dur' -> 0.2 * max_batches (Composer's time strings). The pruning warm-up,
    the schedules and the intervals are counted in batches, so other units are refused."""
    try:
        t = Time.from_timestring(str(value).strip())
    except (ValueError, TypeError):
        t = None
    if t is not None and t.unit == TimeUnit.BATCH:
        return int(t.value)
    if t is not None and t.unit == TimeUnit.DURATION and max_batches is not None:
        return int(round(float(t.value) * max_batches))
    raise ConfigError(f"config key '{key}': expected a number of batches like '640ba'"
                      f"{' or a fraction like 0.2dur' if max_batches is not None else ''}, got {value!r}")


def build_model_config(cfg: TrainConfig, check_paths: bool = True):
    """The source ModelConfig of the run (from model.path or model.init)."""
    if cfg.model.path is not None:
        if not check_paths and not Path(cfg.model.path).exists():
            return None
        try:
            return source_config(cfg.model.path)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config key 'model.path': {e}") from e
    init = cfg.model.init
    try:
        shape = ModelShape.from_dict(dict(init.shape))
    except (ShapeError, TypeError) as e:
        raise ConfigError(f"config key 'model.init.shape': {e}") from e
    try:
        return ModelConfig(shape=shape, family=init.family, rms_norm_eps=init.rms_norm_eps,
                           rope_theta=init.rope_theta, rope_scaling=init.rope_scaling,
                           max_position_embeddings=init.max_position_embeddings)
    except ValueError as e:
        raise ConfigError(f"config key 'model.init': {e}") from e


FROM_MODEL = "from_model"


def resolve_proportions(cfg: TrainConfig) -> list[float]:
    """The run's initial domain weights, in `data.domains` order (reads domain_weights.json for
    `data.proportions: from_model`; the domains' token shares for `dynamic_loading.update: stratified`)."""
    d = cfg.data
    if cfg.dynamic_loading is not None and cfg.dynamic_loading.update == "stratified":
        return _token_shares(cfg)
    if not isinstance(d.proportions, str):
        try:
            return [float(x) for x in d.proportions]
        except (TypeError, ValueError):
            raise ConfigError(f"config key 'data.proportions': a list of numbers or '{FROM_MODEL}', "
                              f"got {d.proportions!r}") from None
    if d.proportions != FROM_MODEL:
        raise ConfigError(f"config key 'data.proportions': a list of numbers or '{FROM_MODEL}', got {d.proportions!r}")
    if cfg.model.path is None:
        raise ConfigError(f"config key 'data.proportions': '{FROM_MODEL}' needs model.path (a prune-export output)")
    try:
        weights = load_domain_weights(cfg.model.path)
    except CheckpointError as e:
        raise ConfigError(f"config key 'data.proportions': {e}") from e
    if weights is None:
        raise ConfigError(f"config key 'data.proportions': '{FROM_MODEL}' but {cfg.model.path} has no "
                          f"{DOMAIN_WEIGHTS_NAME} (prune-export writes it from the pruning checkpoint); "
                          "give the weights as a list instead")
    missing = [dom for dom in d.domains if dom not in weights]
    if missing:
        raise ConfigError(f"config key 'data.proportions': {cfg.model.path}/{DOMAIN_WEIGHTS_NAME} has no weight for "
                          f"{missing} (it has {sorted(weights)})")
    w = [weights[dom] for dom in d.domains]
    total = sum(w)
    return [x / total for x in w]  # renormalised: the run may use a subset of the pruning run's domains


def _token_shares(cfg: TrainConfig) -> list[float]:
    """Each domain's share of the train tokens, from the data's manifest (rows of seq_len tokens)."""
    d = cfg.data
    manifest = load_manifest(d.root) if "://" not in d.root else None  # with data.remote: fetched into the cache
    split = (manifest or {}).get("splits", {}).get(d.train_split, {})
    if not all(dom in split for dom in d.domains):
        raise ConfigError("config key 'dynamic_loading.update': stratified needs the data's manifest.json with "
                          f"the token counts of {list(d.domains)} under data.root ({d.root})")
    counts = [float(split[dom]["tokens"]) for dom in d.domains]
    return [c / sum(counts) for c in counts]


def resolve_teacher(cfg: TrainConfig) -> str:
    """distill.teacher, or by default the source of the pruning: the pruning run's own model.path, or
    for continued pre-training the source the cut model was pruned from (prune-export records it)."""
    if cfg.distill is None:
        raise ConfigError("config key 'distill': not set")
    if cfg.distill.teacher:
        return cfg.distill.teacher
    if cfg.pruning is not None and cfg.model.path is not None:
        return cfg.model.path
    handover = read_handover(cfg.model.path) if cfg.model.path is not None else None
    if handover and handover.get("source_model"):
        return str(handover["source_model"])
    raise ConfigError("config key 'distill.teacher': not set, and there is no default (the pruning run's source: "
                      "model.path of a pruning run, or the source recorded next to a prune-export output)")


def pruning_target(source, target: dict[str, Any], modules=("layer", "head", "intermediate", "hidden")):
    """Target ModelShape: keys not given copy the source (vocab, head_dim, tie flag, biases); a budget
    (`params` or `params_fraction`) resolves to a shape by its rule (`pruning/budget.py`)."""
    return budget.resolve_target(source, dict(target), modules)


def budget_report(cfg: TrainConfig) -> str | None:
    """For a budget target, the line that states the shape it resolved to and its exact parameter count
    (printed before any model is built); None for an explicit target or no pruning."""
    if cfg.pruning is None or not budget.is_budget(dict(cfg.pruning.target)):
        return None
    src = build_model_config(cfg).shape
    target = dict(cfg.pruning.target)
    return budget.describe(src, target, pruning_target(src, target, list(cfg.pruning.modules)))
