"""The cases of benchmarks/train_throughput.py: building each model + optimizer (ours, the HF baseline,
pruning with masks, the unmasked source) and running one case at the largest micro-batch that fits."""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    PRUNE_TARGET,
    Device,
    _fake_oom,
    composer_llama,
    is_oom,
    log,
    model_flops,
    probe_sdpa_call,
)

from llmshearing.models.shape import ModelShape  # noqa: E402

# --------------------------------------------------------------------------------------------------
# models and steps


@dataclass
class Built:
    step: Callable[[torch.Tensor, int], torch.Tensor]
    optimizer: torch.optim.Optimizer
    extra: dict[str, Any] = field(default_factory=dict)
    holders: list[Any] = field(default_factory=list)  # keeps the models alive; cleared by run_case


def make_optimizer(groups: list[dict[str, Any]], args: argparse.Namespace) -> tuple[torch.optim.Optimizer, str]:
    kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)
    if args.optimizer == "decoupled_adamw":
        from composer.optim import DecoupledAdamW

        return DecoupledAdamW(groups, **kw), "composer DecoupledAdamW (as train.py)"
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "torch AdamW fused"
    except (RuntimeError, TypeError, ValueError) as e:
        log(f"fused AdamW unavailable ({e}); using foreach")
        return torch.optim.AdamW(groups, foreach=True, **kw), "torch AdamW foreach"


def make_hf_model(shape: ModelShape, seq: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=max(seq, 4096), rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_embeddings, attention_bias=shape.qkv_bias, mlp_bias=False, use_cache=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg)  # fp32 weights on the current default device
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
        impl = getattr(model.config, "_attn_implementation", None)
    return model, impl


def apply_activation_checkpointing(root: torch.nn.Module, layer_cls: type) -> None:
    """Non-reentrant checkpointing of every decoder layer (what Composer/FSDP does with
    activation_checkpointing=true), the same mechanism for our model and the HF one."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply_ac,
    )

    apply_ac(root, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
             check_fn=lambda m: isinstance(m, layer_cls))


def fsdp2_mesh(dev: Device):
    """A 1-rank FSDP2 mesh (a process group of one is created if none exists): the units, mixed
    precision policy and gradient path of a sharded `train.py` run, measured on one device."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))
        dist.init_process_group("nccl" if dev.torch.type == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(dev.torch.type, (1,))


def shard_hf(model: torch.nn.Module, mesh, policy) -> None:
    """The HF baseline sharded like ours: one unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def compile_layers(layers: torch.nn.ModuleList, backend: str = "inductor") -> None:
    import torch._dynamo.config as dcfg

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(64, getattr(dcfg, name)))
    for layer in layers:
        layer.compile(dynamic=False, backend=backend)


def build_case(kind: str, shapes: dict[str, ModelShape], model_name: str, seq: int, dev: Device,
               args: argparse.Namespace) -> Built:
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM

    ComposerLlama, _ = composer_llama()
    torch.manual_seed(0)
    shape = shapes[model_name]
    amp = args.precision == "amp_bf16"
    autocast = (lambda: torch.autocast(device_type=dev.torch.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    extra: dict[str, Any] = {}

    l0 = None
    if kind == "hf":
        with dev.torch:
            model, impl = make_hf_model(shape, seq)
        model.train()
        extra["hf_attn_implementation"] = impl
        extra["hf_attention_mask"] = args.hf_attention_mask
        layer_cls = type(model.model.layers[0])
        if args.activation_checkpointing:
            apply_activation_checkpointing(model, layer_cls)
        if args.compile:
            compile_layers(model.model.layers, args.compile_backend)
        if args.fsdp:
            from llmshearing.models import sharding

            shard_hf(model, fsdp2_mesh(dev), sharding.mixed_precision_policy(args.precision, "DEFAULT"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt, opt_name = make_optimizer([{"params": params}], args)

        def forward_loss(ids: torch.Tensor) -> torch.Tensor:
            # An all-ones attention_mask is what a normal HF training loop passes; it lets transformers
            # drop the mask and call SDPA with is_causal=True (flash). Without it, transformers 4.5x
            # builds an explicit [B,1,S,S] mask in training (its packed-sequence detection), which
            # rules out the flash kernel (`--hf-attention-mask none` measures that).
            mask = torch.ones_like(ids) if args.hf_attention_mask == "ones" else None
            return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss

        holders: list[Any] = [model]
    else:
        if kind == "cpt_liger":
            try:  # liger-kernel: `pip download --no-deps liger-kernel -d .device-wheels` before a device session
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            except ImportError as e:
                raise RuntimeError(f"liger-kernel is not installed ({e})") from e
            liger_ce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            extra["loss"] = "liger fused linear cross-entropy"
        elif kind == "cpt_full_logits":
            extra["loss"] = "full [B, S, V] logits, fp32 cross-entropy (before the chunked LM head)"
        else:
            extra["loss"] = f"chunked LM head + loss, {args.loss_chunk_tokens} tokens per chunk"
        with dev.torch:
            mcfg = ModelConfig(shape=shape, max_position_embeddings=max(seq, 4096))
            model = LlamaForCausalLM(mcfg)
            if kind == "prune":
                from llmshearing.pruning.l0 import L0Module

                target = shapes[PRUNE_TARGET]
                modules = [m for m, dims in (("layer", ("n_layers",)), ("head", ("n_heads", "n_kv_heads")),
                                             ("intermediate", ("intermediate_size",)), ("hidden", ("d_model",)))
                           if any(getattr(shape, d) != getattr(target, d) for d in dims)]
                l0 = L0Module(shape, target, modules=modules, lagrangian_warmup_steps=100)
                extra["pruning"] = {"target": target.to_dict(), "modules": modules, "mask_types": l0.mask_types}
            cm = ComposerLlama(model=model, l0=l0, loss_chunk_tokens=args.loss_chunk_tokens)
        cm.train()
        if args.activation_checkpointing:  # what train.py does (inside each layer; names unchanged)
            cm.model.set_activation_checkpointing(True)
        if args.compile:  # what train.py does with compile: true
            import torch._dynamo.config as dcfg

            dcfg.cache_size_limit = max(64, dcfg.cache_size_limit)
            cm.model.compile_layers(args.compile_backend)
        if args.fsdp:  # the units and policies of train.shard_model
            from llmshearing.models import sharding

            mesh = fsdp2_mesh(dev)
            sharding.shard_llama(cm.model, mesh, sharding.mixed_precision_policy(args.precision, "DEFAULT"))
            if l0 is not None:
                sharding.shard_fp32(l0, mesh)
        if l0 is not None:
            from llmshearing.pruning.param_groups import pruning_param_groups

            groups = pruning_param_groups(cm, lr=args.lr, lag_lr=args.lag_lr, weight_decay=args.weight_decay)
            extra["param_groups"] = [{"n_tensors": len(g["params"]), "n_params": sum(p.numel() for p in g["params"]),
                                      "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups]
        else:
            groups = [{"params": [p for p in cm.parameters() if p.requires_grad]}]
        params = [p for g in groups for p in g["params"]]
        opt, opt_name = make_optimizer(groups, args)

        def forward_loss(ids: torch.Tensor) -> torch.Tensor:
            if kind == "cpt_full_logits":  # the loss before the chunked LM head: [B, S, V] logits, fp32 CE
                from llmshearing.models.losses import shift_targets

                logits = cm.model(ids)
                return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                         shift_targets(ids).reshape(-1), ignore_index=-100)
            if kind == "cpt_liger":  # Liger's fused linear cross-entropy on our hidden states (a GPU kernel)
                from llmshearing.models.losses import shift_targets

                h = cm.model(ids, output="hidden")
                return liger_ce(cm.model.lm_head.weight, h.reshape(-1, h.size(-1)), shift_targets(ids).reshape(-1))
            batch = {"input_ids": ids}
            out = cm(batch)
            loss = cm.loss(out, batch)["total"]
            if out.get("lagrangian") is not None:  # what PruningCallback.after_loss adds
                loss = loss + out["lagrangian"]
            return loss

        holders = [cm]

    extra["optimizer"] = opt_name
    extra["n_params"] = sum(p.numel() for p in params)
    if not args.compile:  # (a compiled layer would not call the Python-level function)
        probe_ids = torch.randint(0, shape.vocab_size, (1, seq), device=dev.torch)

        def probe() -> None:
            with autocast():
                forward_loss(probe_ids)

        extra["sdpa_call"] = probe_sdpa_call(probe)

    def step(ids: torch.Tensor, i: int) -> torch.Tensor:
        if args.fake_oom_above and ids.shape[0] > args.fake_oom_above:
            raise _fake_oom(f"micro_batch {ids.shape[0]} > {args.fake_oom_above}")
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = forward_loss(ids)
        loss.backward()
        if args.grad_clip:
            from llmshearing.models.sharding import (
                clip_grad_norm_,  # DTensor-aware, what train.py uses
            )

            clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if l0 is not None:
            l0.clamp_()
            l0.set_step(i + 1)
        return loss.detach()

    return Built(step=step, optimizer=opt, extra=extra, holders=holders)


# --------------------------------------------------------------------------------------------------
# one case: search the micro-batch, then time


def _batches(vocab: int, mb: int, seq: int, dev: Device, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator(device=dev.torch).manual_seed(1234 + mb)
    return [torch.randint(0, vocab, (mb, seq), device=dev.torch, generator=g) for _ in range(n)]


def _try(built: Built, vocab: int, mb: int, seq: int, dev: Device, n_steps: int) -> tuple[bool, float | None, str | None]:
    """Run n_steps at this micro-batch; (fits, peak GiB, error)."""
    dev.reset_peak()
    oom = None
    try:
        data = _batches(vocab, mb, seq, dev)
        for i in range(n_steps):
            loss = built.step(data[i % len(data)], i)
        dev.sync()
        if not math.isfinite(float(loss)):
            return False, dev.peak_gib(), "non-finite loss"
        del data, loss
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        oom = f"OOM: {str(e).splitlines()[0][:160]}"
    if oom is not None:  # cleanup outside the except block, so the traceback's frames are gone
        built.optimizer.zero_grad(set_to_none=True)
        dev.empty_cache()
        return False, dev.peak_gib(), oom
    return True, dev.peak_gib(), None


def run_case(kind: str, model_name: str, seq: int, candidates: list[int], mode: str, dev: Device,
             shapes: dict[str, ModelShape], args: argparse.Namespace) -> dict[str, Any]:
    """mode 'largest': ascending search, time the largest that fits; 'first_fit': try in the given
    order (e.g. [the other case's micro-batch, smaller ones...]) and time the first that fits."""
    shape = shapes[model_name]
    res: dict[str, Any] = {"case": kind, "model": model_name, "impl": "transformers" if kind == "hf" else "llmshearing",
                           "shape": shape.to_dict(), "seq_len": seq, "search": []}
    t_case = time.perf_counter()
    built = data = None
    try:
        built = build_case(kind, shapes, model_name, seq, dev, args)
        res.update(built.extra)
        best = None
        for mb in candidates:
            ok, peak, err = _try(built, shape.vocab_size, mb, seq, dev, args.search_steps)
            res["search"].append({"micro_batch": mb, "fits": ok, "peak_mem_gib": peak, **({"error": err} if err else {})})
            log(f"  {kind:8s} {model_name:5s} S={seq:<5d} mb={mb:<3d} {'fits' if ok else err} "
                f"{'' if peak is None else f'(peak {peak:.1f} GiB)'}")
            if ok:
                best = mb
                if mode == "first_fit":
                    break
            elif mode == "largest":
                break
        if best is None:
            res["error"] = "no micro-batch fits"
            return res
        res["micro_batch"] = best
        res["tokens_per_step"] = best * seq
        data = _batches(shape.vocab_size, best, seq, dev)
        losses: list[torch.Tensor] = []
        dev.reset_peak()
        for i in range(args.warmup):
            built.step(data[i % len(data)], i)
        retries0 = dev.alloc_retries()
        times, wall = dev.time_steps(args.steps, lambda i: losses.append(built.step(data[i % len(data)], args.warmup + i)))
        retries1 = dev.alloc_retries()
        med = statistics.median(times)
        flops = model_flops(shape, best, seq)
        achieved = flops / med / 1e12
        res.update({
            "step_time_s": med,
            "step_times_s": times,
            "step_time_min_max_s": [min(times), max(times)],
            "timed_wall_s": wall,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "tokens_per_s": best * seq / med,
            "peak_mem_gib": dev.peak_gib(),
            "peak_reserved_gib": dev.peak_reserved_gib(),
            "alloc_retries_in_timed_steps": None if retries0 is None else retries1 - retries0,
            "flops_per_step": flops,
            "achieved_tflops": achieved,
            "mfu_spec": None if args.spec_tflops is None else achieved / args.spec_tflops,
            "mfu_measured_matmul": achieved / args.matmul_tflops if args.matmul_tflops else None,
            "loss_first": float(losses[0]),
            "loss_last": float(losses[-1]),
        })
        log(f"  {kind:8s} {model_name:5s} S={seq:<5d} mb={best:<3d} step {med * 1e3:.1f} ms  "
            f"{res['tokens_per_s']:.0f} tok/s  {achieved:.1f} TFLOP/s"
            + (f"  MFU {res['mfu_spec']:.1%}" if res["mfu_spec"] is not None else ""))
    except Exception as e:  # noqa: BLE001  (one broken case must not lose the others)
        if not is_oom(e) and args.strict:
            raise
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  {kind} {model_name} S={seq} failed: {res['error']}")
    finally:
        res["case_wall_s"] = time.perf_counter() - t_case
        if built is not None:
            built.optimizer.state.clear()
            built.holders.clear()
        built = data = None  # drop the models before emptying the cache
        dev.empty_cache()
    return res


