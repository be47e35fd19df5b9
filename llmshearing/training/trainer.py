"""Build a Composer Trainer from a validated TrainConfig and run it.

`composer train.py yamls/X.yaml key=value ...` (repo root) -> `main(argv)`. Everything that can
be checked cheaply is checked (config_checks.validate) before a model or a loader is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Callback, Evaluator
from composer.loggers import FileLogger, WandBLogger
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config

from llmshearing.callbacks.distillation import DistillationCallback
from llmshearing.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshearing.callbacks.gradients import FinishGradients
from llmshearing.callbacks.guard import LossGuard
from llmshearing.callbacks.model_info import ModelInfo
from llmshearing.callbacks.pruning import PruningCallback
from llmshearing.callbacks.score_init import ScoreInitCallback
from llmshearing.convert.model_source import load_source_model
from llmshearing.data.dynamic import build_eval_dataloader, build_train_dataloader
from llmshearing.models import sharding
from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.llama import LlamaForCausalLM
from llmshearing.pruning.l0 import L0Module
from llmshearing.pruning.param_groups import pruning_param_groups
from llmshearing.training.config import (
    ConfigError,
    TrainConfig,
    budget_report,
    build_model_config,
    pruning_target,
    resolve_proportions,
    resolve_teacher,
    time_in_batches,
    to_yaml,
)
from llmshearing.training.config_checks import validate
from llmshearing.training.multinode import per_node_signal_files
from llmshearing.training.resume import (
    SAVED_CONFIG,
    check_unchanged,
    repair_latest_link,
)

log = logging.getLogger("llmshearing.training.trainer")


def init_distributed(device: str, timeout: float) -> tuple[int, int]:
    """Create the process group (gloo on CPU, nccl on GPU) before any dataset or model exists, so
    that Streaming uses it instead of creating and destroying a temporary group of its own, and
    the samplers see the real world size and rank. Returns (world_size, rank). Idempotent; with no
    launcher environment it makes a 1-rank group, as the Trainer would."""
    dist.initialize_dist(device, timeout)
    per_node_signal_files()  # nodes sharing the save folder (multinode.py)
    return dist.get_world_size(), dist.get_global_rank()


def device_of(cfg: TrainConfig) -> str:
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': 'gpu' requested but CUDA is not available")
    return cfg.device.value


def build_model(cfg: TrainConfig, rank: int = 0, world_size: int = 1, sharded: bool = False):
    """ComposerLlama with source weights (model.path) or random init, plus the L0 module when pruning.

    Only rank 0 reads `model.path` or draws the random init (a 7B source is 27 GB of fp32 per copy,
    times 8 ranks per node). The other ranks build the model without weights and receive rank 0's:
    under FSDP (`sharded`) they stay on the meta device until `shard_model` gives each its shard of
    rank 0's weights; under DDP they get uninitialised storage, which DDP's construction-time
    broadcast from rank 0 overwrites. The L0 module is small and seeded: every rank builds it.
    """
    weights = rank == 0 or world_size == 1
    if cfg.model.path is not None:
        # fp32 master weights (amp computes in bf16)
        model = load_source_model(cfg.model.path, dtype=torch.float32, weights=weights)
    elif weights:
        model = LlamaForCausalLM(build_model_config(cfg))
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(build_model_config(cfg))
    if not weights and not sharded:
        model.to_empty(device="cpu")
        model.model.rotary_emb.reset_parameters()
        model.tie_weights()
    l0 = None
    if cfg.pruning is not None:
        max_ba = time_in_batches(cfg.max_duration, "max_duration")
        l0 = L0Module(
            source=model.config.shape,
            target=pruning_target(model.config.shape, cfg.pruning.target, list(cfg.pruning.modules)),
            modules=list(cfg.pruning.modules),
            lagrangian_warmup_steps=time_in_batches(cfg.pruning.lagrangian_warmup, "pruning.lagrangian_warmup", max_ba),
            eval_target_model=cfg.pruning.eval_target_model,
            seed=cfg.seed,  # mask noise is keyed by (seed, step, global microbatch): resumable, any world size
        )
    return ComposerLlama(model=model, l0=l0, loss_chunk_tokens=cfg.loss_chunk_tokens)


def shard_llama_from_rank0(cfg: TrainConfig, model: LlamaForCausalLM, device: str, precision: str,
                           rank: int) -> None:
    """FSDP2 units of one LlamaForCausalLM (the student or the teacher) in the run's mixed precision,
    filled with rank 0's weights (the other ranks built it on the meta device)."""
    f = cfg.fsdp
    full = sharding.full_state_on_rank0(model, rank)
    mesh = sharding.device_mesh(device)
    sharding.shard_llama(model, mesh, sharding.mixed_precision_policy(precision, f.mixed_precision.value),
                         reshard_after_forward=f.reshard_after_forward)
    sharding.materialize_from_rank0(model, full, torch.device("cuda", torch.cuda.current_device())
                                    if device == "gpu" else torch.device("cpu"))


def shard_model(cfg: TrainConfig, composer_model: ComposerLlama, device: str, precision: str, rank: int) -> None:
    """FSDP2 (see `llmshearing.models.sharding`): the model's units in the run's mixed precision, the L0 module
    in fp32, rank 0's weights scattered to every rank's shard. Composer then finds the model sharded:
    its own FSDP2 pass is told to wrap nothing more (`_fsdp_wrap = False` on the two children, the
    attribute its wrap policy reads first), and only saves, loads and skips DDP."""
    model = composer_model.model
    if cfg.fsdp.activation_checkpointing:
        model.set_activation_checkpointing(True)
    shard_llama_from_rank0(cfg, model, device, precision, rank)
    model._fsdp_wrap = False
    if composer_model.l0 is not None:
        sharding.shard_fp32(composer_model.l0, sharding.device_mesh(device))
        composer_model.l0._fsdp_wrap = False


def composer_fsdp_config(cfg: TrainConfig) -> FSDP2Config:
    """What Composer needs to know of our sharding: how to save (full or sharded checkpoints). The
    wrapping, precision and activation checkpointing are ours (`shard_model`)."""
    return FSDP2Config(state_dict_type=cfg.fsdp.state_dict_type.value, activation_checkpointing=False,
                       mixed_precision="FULL")


def build_optimizer(cfg: TrainConfig, composer_model) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if cfg.pruning is not None:
        groups = pruning_param_groups(composer_model, lr=o.lr, lag_lr=cfg.pruning.lag_lr, weight_decay=o.weight_decay,
                                      lag_betas=cfg.pruning.lag_betas)
    else:
        groups = [{"params": [p for p in composer_model.parameters() if p.requires_grad]}]
    return DecoupledAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_dataloaders(cfg: TrainConfig, world_size: int, rank: int):
    d = cfg.data
    # with data.remote, Streaming downloads the shards into data.root (the node-local cache)
    where = ({"root": d.remote, "local_cache": d.root, "cache_limit": d.cache_limit} if d.remote
             else {"root": d.root})
    train_dl = build_train_dataloader(
        **where, domains=list(d.domains), proportions=resolve_proportions(cfg),
        global_batch_size=cfg.global_train_batch_size, seq_len=d.seq_len, seed=cfg.seed,
        rank=rank, world_size=world_size, num_workers=d.num_workers, on_exhausted=d.on_exhausted.value,
        split=d.train_split,
    )
    evaluators = [
        Evaluator(
            label=dom,
            dataloader=build_eval_dataloader(**where, domain=dom, batch_size=cfg.device_eval_batch_size,
                                             seq_len=d.seq_len, rank=rank, world_size=world_size, split=d.eval_split,
                                             max_samples=d.eval_rows_per_domain),
            metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
        )
        for dom in d.domains
    ]
    return train_dl, evaluators


def build_callbacks(cfg: TrainConfig, composer_model, sharded: bool = False, device: str = "cpu",
                    precision: str = "fp32") -> list:
    pruning_info = None
    if composer_model.l0 is not None:
        pruning_info = composer_model.l0.config_dict()
    cbs: list = [ModelInfo(composer_model.config, pruning_info, source_path=cfg.model.path),
                 SpeedMonitor(window_size=10), LRMonitor(), LossGuard(cfg.save_folder)]
    if cfg.pruning is not None:
        cbs.append(PruningCallback(save_folder=cfg.save_folder,
                                   log_interval=time_in_batches(cfg.loggers.console_interval, "loggers.console_interval")))
        if cfg.pruning.init == "scores":
            cbs.append(ScoreInitCallback(cfg.pruning.init_batches, cfg.global_train_batch_size,
                                         cfg.device_train_microbatch_size, cfg.seed, cfg.pruning.init_margin))
    mixing = None
    if cfg.dynamic_loading is not None:
        dl = cfg.dynamic_loading
        mixing = DynamicLoadingCallback(
            domains=list(cfg.data.domains), target_losses=list(dl.target_losses) or None, update=dl.update.value,
            eta=dl.eta, smoothing=dl.smoothing, clip_negative=dl.clip_negative,
            target_offsets=list(dl.target_offsets) or None,
        )
        cbs.append(mixing)
    if cfg.distill is not None:
        ds = cfg.distill
        teacher_gap = mixing if mixing is not None and mixing.update == "teacher_gap" else None
        shard = None
        if sharded:
            def shard(teacher: LlamaForCausalLM) -> None:
                shard_llama_from_rank0(cfg, teacher, device, precision, dist.get_global_rank())
        cbs.append(DistillationCallback(resolve_teacher(cfg), alpha=ds.alpha, temperature=ds.temperature,
                                        divergence=ds.divergence.value, teacher_gap=teacher_gap,
                                        eval_batch_size=cfg.device_eval_batch_size, shard=shard))
    return cbs


def build_loggers(cfg: TrainConfig) -> list:
    loggers: list = []
    if cfg.loggers.file:
        loggers.append(FileLogger(filename=str(Path(cfg.save_folder) / "logs-rank{rank}.txt"), flush_interval=10))
    if cfg.loggers.wandb is not None:
        w = dict(cfg.loggers.wandb)
        init_kwargs = dict(w.pop("init_kwargs", {}) or {})
        init_kwargs.setdefault("dir", cfg.save_folder)
        loggers.append(MetricsOnlyWandB(project=w.pop("project", "llmshearing"), name=cfg.run_name,
                                         init_kwargs=init_kwargs, **w))
    return loggers


class ReleaseDataOnClose(Callback):
    """`Trainer.close()` releases the Streaming shared memory of the run's datasets. Streaming keeps
    every block (and a file descriptor for each, which every new dataset opens again) until the
    interpreter exits, so a process that builds several trainers (the demo, recovery comparisons,
    sweeps, the test suite) would run out of file descriptors."""

    def __init__(self, loaders: list) -> None:
        self.loaders = loaders

    def post_close(self) -> None:
        for dl in self.loaders:
            close = getattr(getattr(dl, "dataset", None), "close", None)
            if close is not None:
                close()


class MetricsOnlyWandB(WandBLogger):
    """W&B for metrics only. Checkpoints live in `save_folder`; without this, autoresume asks every
    logger for the latest checkpoint and Composer's W&B logger raises in offline runs (no entity)."""

    def can_upload_files(self) -> bool:
        return False

    def download_file(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("checkpoints are not stored in W&B")


def build_scheduler(cfg: TrainConfig) -> CosineAnnealingWithWarmupScheduler:
    max_ba = time_in_batches(cfg.max_duration, "max_duration")
    warmup = time_in_batches(cfg.scheduler.warmup, "scheduler.warmup", max_ba)
    return CosineAnnealingWithWarmupScheduler(t_warmup=f"{warmup}ba", alpha_f=cfg.scheduler.alpha_f)


def _prepare_save_folder(cfg: TrainConfig, rank: int) -> None:
    """Before the Trainer autoresumes: refuse a resume under a changed config, repair the latest
    link after an interrupted save (see llmshearing.training.resume), then record this launch's config."""
    folder = Path(cfg.save_folder)
    problem = [None]
    if cfg.autoresume and rank == 0 and folder.is_dir():
        resumable = repair_latest_link(folder)
        changed = check_unchanged(folder, cfg) if resumable else []
        if changed:
            key, old, new = changed[0]
            problem[0] = (f"config key '{key}': {folder} holds a checkpoint of a run with {key}={old}, this launch "
                          f"has {key}={new}; a resume would not continue that run (use another save_folder, or "
                          "autoresume=false to start over)")
    dist.broadcast_object_list(problem, src=0)  # every rank stops, none waits for the others
    if problem[0]:
        raise ConfigError(problem[0])
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / SAVED_CONFIG).write_text(to_yaml(cfg))


def build_trainer(cfg: TrainConfig, extra_callbacks=(), extra_loggers=()):
    """Validate, then build every component and the Trainer (does not call fit).

    World size and rank come from the process group (created here first, from the launcher's
    environment: `composer -n N train.py ...` or torchrun), never from arguments.
    """
    device = device_of(cfg)
    world_size, rank = init_distributed(device, cfg.dist_timeout)
    validate(cfg, world_size=world_size)
    if rank == 0 and (line := budget_report(cfg)):
        print(line, flush=True)
    precision = cfg.precision.value
    if device == "cpu" and precision != "fp32":
        log.warning("precision %s is not used on CPU; running in fp32", precision)
        precision = "fp32"
    sharded = cfg.fsdp is not None

    torch.manual_seed(cfg.seed)
    composer_model = build_model(cfg, rank, world_size, sharded)
    if cfg.compile:  # per decoder layer (Composer's compile_config would compile the whole model at once)
        composer_model.model.compile_layers(cfg.compile_backend)
    if sharded:
        shard_model(cfg, composer_model, device, precision, rank)
    optimizer = build_optimizer(cfg, composer_model)
    train_dl, evaluators = build_dataloaders(cfg, world_size, rank)
    _prepare_save_folder(cfg, rank)
    # gloo runs FSDP2's averaging reduce-scatter as a sum (see callbacks/gradients.py)
    gloo_sum = world_size if sharded and torch.distributed.get_backend() == "gloo" else 1
    algorithms = [FinishGradients(cfg.grad_clip_norm or None, divide_by=gloo_sum)]
    return Trainer(
        run_name=cfg.run_name,
        model=composer_model,
        train_dataloader=train_dl,
        eval_dataloader=evaluators,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=-1,  # the rows are chosen by data.eval_rows_per_domain (any world size)
        optimizers=optimizer,
        schedulers=build_scheduler(cfg),
        step_schedulers_every_batch=True,
        max_duration=cfg.max_duration,
        device=device,
        precision=precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config={"fsdp": composer_fsdp_config(cfg)} if sharded else None,
        algorithms=algorithms,
        callbacks=build_callbacks(cfg, composer_model, sharded, device, precision) + list(extra_callbacks)
        + [ReleaseDataOnClose([train_dl, *(e.dataloader.dataloader for e in evaluators)])],
        loggers=build_loggers(cfg) + list(extra_loggers),
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        autoresume=cfg.autoresume,
        seed=cfg.seed,
        dist_timeout=cfg.dist_timeout,
        progress_bar=False,
        log_to_console=cfg.loggers.console,
        console_log_interval=cfg.loggers.console_interval,
        python_log_level="info" if cfg.loggers.console else "warning",
    )


def final_eval_losses(trainer) -> dict[str, float]:
    """Per-domain eval CE from the last evaluation (evaluator label = domain)."""
    out = {}
    for label, metrics in trainer.state.eval_metrics.items():
        m = metrics.get("LanguageCrossEntropy")
        if m is not None:
            out[label] = float(m.compute())
    return out


def run(cfg: TrainConfig, **kw: Any):
    trainer = build_trainer(cfg, **kw)
    if cfg.eval_first and int(trainer.state.timestamp.batch) == 0:  # not again after an autoresume
        trainer.eval()
    trainer.fit()
    return trainer
