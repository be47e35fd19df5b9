#!/usr/bin/env python
"""Training-step throughput, peak memory and MFU of our model vs a Hugging Face baseline.

One process, one device. For each sequence length it measures, at the largest micro-batch that fits
(an ascending search over `--micro-batches`, OOM caught):

  cpt       continued pre-training step of our model (ComposerLlama, bf16 autocast, AdamW)
  hf        the same shape as a plain `transformers.LlamaForCausalLM` (SDPA), same micro-batch and
            precision: the baseline
  prune     pruning step: ComposerLlama + L0Module (stochastic masks on heads / MLP channels / hidden,
            Lagrangian added to the loss, one optimizer with the 3 param groups of
            `pruning_param_groups`, log_alpha clamped after the step), source 1.3B -> target 370M
  unmasked  our plain model of the pruning source shape at the pruning step's micro-batch, so that
            the ratio pruning / unmasked step time is reported

One step = zero_grad, forward + loss under autocast, backward, grad-norm clip (1.0, as train.py), optimizer
step. Step time is the median over the timed steps after warm-up; on CUDA each step is bracketed by
CUDA events and the device is synchronised only before and after the timed region.

FLOPs are model FLOPs in llm-foundry's convention (`ComposerLlama.flops_per_batch`: 6 x non-embedding
weights per token + 12 * n_layers * q_dim * S per token for attention, no causal discount, activation
recomputation not counted). MFU is reported against the GPU's dense bf16 datasheet peak (989 TFLOP/s for
an H100 SXM; by device name) and against the bf16 matmul rate measured at the start of the same run.

JSON goes to stdout (and to `--out`, rewritten after every case so a run cut short keeps what it had);
progress and a summary table go to stderr. Without CUDA (or with `--tiny`) the same code runs tiny
shapes in seconds; `--quick` takes fewer steps. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llmshearing.shape import ModelShape  # noqa: E402

# --------------------------------------------------------------------------------------------------
# shapes

#: The issue's realistic shapes (head_dim 128, vocab 32000, untied, MHA).
SHAPES: dict[str, ModelShape] = {
    "370m": ModelShape(d_model=1024, n_heads=8, n_kv_heads=8, head_dim=128, n_layers=24, intermediate_size=2816,
                       vocab_size=32000),
    "1.3b": ModelShape(d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, n_layers=24, intermediate_size=5504,
                       vocab_size=32000),
}
#: Same roles, CPU-sized (the "1.3b" prunes to the "370m" on heads, channels and hidden, as the real ones).
TINY_SHAPES: dict[str, ModelShape] = {
    "370m": ModelShape(d_model=64, n_heads=2, n_kv_heads=2, head_dim=32, n_layers=2, intermediate_size=96,
                       vocab_size=256),
    "1.3b": ModelShape(d_model=128, n_heads=4, n_kv_heads=4, head_dim=32, n_layers=2, intermediate_size=192,
                       vocab_size=256),
}
PRUNE_SOURCE, PRUNE_TARGET = "1.3b", "370m"

#: Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA datasheets. Matched on
#: torch.cuda.get_device_name() in order, first hit wins.
BF16_SPEC_TFLOPS: list[tuple[tuple[str, ...], float, str]] = [
    (("GH200",), 989.4, "GH200 (H100 SXM compute) dense bf16"),
    (("H200",), 989.4, "H200 SXM dense bf16"),
    (("H100", "PCIE"), 756.5, "H100 PCIe dense bf16"),
    (("H100", "NVL"), 835.5, "H100 NVL dense bf16"),
    (("H100",), 989.4, "H100 SXM dense bf16"),
    (("H800",), 989.4, "H800 SXM dense bf16"),
    (("B200",), 2250.0, "B200 dense bf16"),
    (("A100",), 312.0, "A100 dense bf16"),
    (("A800",), 312.0, "A800 dense bf16"),
    (("L40S",), 362.1, "L40S dense bf16"),
    (("A10G",), 70.0, "A10G dense bf16"),
    (("L4",), 121.0, "L4 dense bf16"),
]

CASES = ("cpt", "hf", "prune", "unmasked")
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None})


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spec_peak(device_name: str) -> tuple[float | None, str | None]:
    up = device_name.upper()
    for keys, tflops, what in BF16_SPEC_TFLOPS:
        if all(k in up for k in keys):
            return tflops, what
    return None, None


def composer_llama() -> tuple[type, str]:
    """`ComposerLlama`, or (if Composer cannot be imported on this machine, e.g. a torch newer than
    Composer supports) a stand-in with the same forward / loss / flops code, so the benchmark still runs."""
    try:
        from llmshearing.models.composer_model import ComposerLlama

        return ComposerLlama, "ComposerLlama"
    except Exception as e:  # noqa: BLE001
        return _StandInComposerLlama, f"stand-in (composer import failed: {type(e).__name__}: {str(e)[:120]})"


class _StandInComposerLlama(torch.nn.Module):
    """What ComposerLlama does in a training step (forward with the L0 masks, next-token CE in fp32),
    without Composer. Used only when `composer` cannot be imported."""

    def __init__(self, model: torch.nn.Module, l0: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.l0 = model, l0

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        masks, lag = self.l0() if self.l0 is not None else (None, None)
        return {"logits": self.model(batch["input_ids"], masks), "lagrangian": lag}

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, logits = batch["input_ids"], outputs["logits"]
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                               ignore_index=-100)
        return {"ce_loss": ce, "total": ce}

    def flops_per_batch(self, batch: dict[str, Any]) -> int:  # = ComposerLlama.flops_per_batch
        s = self.model.config.shape
        bsz, seq = batch["input_ids"].shape[:2]
        weights = s.n_params() - (0 if s.tie_embeddings else s.vocab_size * s.d_model)
        return int(3 * (2 * weights * seq + 4 * s.n_layers * s.q_dim * seq * seq) * bsz)


def model_flops(shape: ModelShape, micro_batch: int, seq_len: int) -> int:
    """Training FLOPs of one micro-batch, by the one definition the repo has
    (`ComposerLlama.flops_per_batch`, which only reads `self.model.config.shape`)."""
    cls, _ = composer_llama()
    holder = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(shape=shape)))
    ids = torch.empty((micro_batch, seq_len), dtype=torch.long, device="meta")
    return int(cls.flops_per_batch(holder, {"input_ids": ids}))


def is_oom(e: BaseException) -> bool:
    if OOM_ERRORS and isinstance(e, OOM_ERRORS):
        return True
    s = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in s.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in s)


def _fake_oom(msg: str) -> BaseException:
    cls = OOM_ERRORS[0] if OOM_ERRORS else RuntimeError
    return cls(f"CUDA out of memory (simulated by --fake-oom-above): {msg}")


# --------------------------------------------------------------------------------------------------
# device helpers


class Device:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.torch = torch.device("cuda" if kind == "cuda" else "cpu")
        self.is_cuda = kind == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()

    def empty_cache(self) -> None:
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.is_cuda else None

    def peak_reserved_gib(self) -> float | None:
        return torch.cuda.max_memory_reserved() / 2**30 if self.is_cuda else None

    def alloc_retries(self) -> int | None:
        return int(torch.cuda.memory_stats().get("num_alloc_retries", 0)) if self.is_cuda else None

    def time_steps(self, n: int, fn: Callable[[int], Any]) -> tuple[list[float], float]:
        """Per-step seconds of n calls (CUDA events around each call; synchronised only before and
        after the whole region) and the wall time of the region."""
        self.sync()
        t0 = time.perf_counter()
        if self.is_cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                starts[i].record()
                fn(i)
                ends[i].record()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], wall
        times = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
        return times, time.perf_counter() - t0


def measure_matmul(dev: Device, dtype: torch.dtype, sizes: list[int], reps: int) -> dict[str, Any]:
    """Rate of one large square matmul (random operands, never zeros), median over reps; the max over sizes."""
    out: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "per_size": []}
    best = 0.0
    g = torch.Generator(device=dev.torch).manual_seed(0)
    for n in sizes:
        try:
            a = torch.randn((n, n), device=dev.torch, dtype=dtype, generator=g)
            b = torch.randn((n, n), device=dev.torch, dtype=dtype, generator=g)
            c = torch.empty((n, n), device=dev.torch, dtype=dtype)
            for _ in range(3):
                torch.matmul(a, b, out=c)
            times, _ = dev.time_steps(reps, lambda i: torch.matmul(a, b, out=c))
            med = statistics.median(times)
            tf = 2 * n**3 / med / 1e12
            out["per_size"].append({"n": n, "median_s": med, "tflops": tf,
                                    "spread": [min(times), max(times)]})
            best = max(best, tf)
            del a, b, c
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            out["per_size"].append({"n": n, "error": "OOM"})
        dev.empty_cache()
    out["tflops"] = best
    return out


def sdpa_backend_probe(dev: Device, shape: ModelShape, seq: int) -> dict[str, str]:
    """Which SDPA backend torch picks for bf16 causal attention of this shape (MHA, and GQA with 4x fewer
    K/V heads through enable_gqa), via the private `torch._fused_sdp_choice` (best effort)."""
    if not dev.is_cuda:
        return {}
    res: dict[str, str] = {}
    try:
        from torch.nn.attention import SDPBackend

        for name, kv in (("mha", shape.n_heads), ("gqa", max(1, shape.n_heads // 4))):
            q = torch.randn(1, shape.n_heads, seq, shape.head_dim, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True)
            k = torch.randn(1, kv, seq, shape.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)
            for dt, (qq, kk, vv) in (("bf16", (q, k, v)), ("fp32", (q.float(), k.float(), v.float()))):
                i = torch._fused_sdp_choice(qq, kk, vv, None, 0.0, True, enable_gqa=kv != shape.n_heads)
                res[f"{name}_{dt}"] = SDPBackend(i).name
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"[:200]
    return res


def probe_sdpa_call(forward: Callable[[], Any]) -> dict[str, Any]:
    """Run `forward` once with F.scaled_dot_product_attention wrapped, and report how the model called it
    (explicit mask or is_causal, enable_gqa, dtypes, head counts): tells whether a fused kernel was possible."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    calls: list[dict[str, Any]] = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *a, **kw):
        if not calls:
            calls.append({"attn_mask": None if attn_mask is None else list(attn_mask.shape), "is_causal": bool(is_causal),
                          "enable_gqa": bool(kw.get("enable_gqa", False)), "q_dtype": str(q.dtype).replace("torch.", ""),
                          "q_heads": int(q.shape[1]), "kv_heads": int(k.shape[1])})
        return orig(q, k, v, attn_mask, dropout_p, is_causal, *a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            forward()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        F.scaled_dot_product_attention = orig
    return calls[0] if calls else {"error": "no SDPA call seen"}


# --------------------------------------------------------------------------------------------------
# models and steps


@dataclass
class Built:
    step: Callable[[torch.Tensor, int], torch.Tensor]
    optimizer: torch.optim.Optimizer
    extra: dict[str, Any] = field(default_factory=dict)
    holders: list[Any] = field(default_factory=list)  # keeps the models alive; dropped by `release`


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
        apply_activation_checkpointing as apply_ac,
        checkpoint_wrapper,
    )

    apply_ac(root, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
             check_fn=lambda m: isinstance(m, layer_cls))


def compile_layers(layers: torch.nn.ModuleList) -> None:
    import torch._dynamo.config as dcfg

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(64, getattr(dcfg, name)))
    for layer in layers:
        layer.compile(dynamic=False)


def build_case(kind: str, shapes: dict[str, ModelShape], model_name: str, seq: int, dev: Device,
               args: argparse.Namespace) -> Built:
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import DecoderLayer, LlamaForCausalLM

    ComposerLlama, _ = composer_llama()
    torch.manual_seed(0)
    shape = shapes[model_name]
    amp = args.precision == "amp_bf16"
    autocast = (lambda: torch.autocast(device_type=dev.torch.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    extra: dict[str, Any] = {}

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
            compile_layers(model.model.layers)
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
        l0 = None
    else:
        l0 = None
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
            cm = ComposerLlama(model=model, l0=l0)
        cm.train()
        if args.activation_checkpointing:
            apply_activation_checkpointing(cm.model, DecoderLayer)
        if args.compile:
            compile_layers(model.model.layers)
        if l0 is not None:
            from llmshearing.pruning.l0 import pruning_param_groups

            groups = pruning_param_groups(cm, lr=args.lr, lag_lr=args.lag_lr, weight_decay=args.weight_decay)
            extra["param_groups"] = [{"n_tensors": len(g["params"]), "n_params": sum(p.numel() for p in g["params"]),
                                      "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups]
        else:
            groups = [{"params": [p for p in cm.parameters() if p.requires_grad]}]
        params = [p for g in groups for p in g["params"]]
        opt, opt_name = make_optimizer(groups, args)

        def forward_loss(ids: torch.Tensor) -> torch.Tensor:
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
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
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


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (automatic on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer warm-up/timed steps and one matmul size")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (ours and HF)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="non-reentrant activation checkpointing of every decoder layer (as the FSDP yamls)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    p.add_argument("--models", default="370m,1.3b", help="target shapes for cpt/hf (370m, 1.3b)")
    p.add_argument("--seq-lens", default=None, help="comma list (default 4096,2048; tiny 64,32)")
    p.add_argument("--micro-batches", default=None,
                   help="ascending candidates for the search (default 1,2,4,6,8,12,16,24,32,48,64; tiny 1,2,4)")
    p.add_argument("--precision", choices=("amp_bf16", "fp32"), default=None,
                   help="default amp_bf16 on CUDA, fp32 on CPU (as Composer runs on CPU)")
    p.add_argument("--optimizer", choices=("adamw", "decoupled_adamw"), default="adamw",
                   help="adamw: torch AdamW, fused where available; decoupled_adamw: Composer's (train.py)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lag-lr", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables (train.py clips at 1.0)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--search-steps", type=int, default=2,
                   help="steps per candidate micro-batch (2: the second has optimizer state allocated)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the datasheet bf16 peak")
    p.add_argument("--ab-rope", action="store_true",
                   help="also time cpt with llama.ROPE_IN_QK_DTYPE=False (RoPE promoted to fp32, as HF)")
    p.add_argument("--hf-attention-mask", choices=("ones", "none"), default="ones",
                   help="what the HF baseline gets as attention_mask (see forward_loss in build_case)")
    p.add_argument("--out", default=None, help="also write the JSON here (e.g. benchmarks/results/h100.json)")
    p.add_argument("--strict", action="store_true", help="re-raise non-OOM errors instead of recording them")
    p.add_argument("--memory-fraction", type=float, default=None,
                   help="cap this process's CUDA memory to this fraction of the GPU (emulate a smaller GPU; tests)")
    p.add_argument("--fake-oom-above", type=int, default=0, help=argparse.SUPPRESS)  # tests: exercise the OOM path
    return p.parse_args(argv)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    dev = Device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    tiny = args.tiny or not dev.is_cuda
    shapes = TINY_SHAPES if tiny else SHAPES
    args.precision = args.precision or ("amp_bf16" if dev.is_cuda else "fp32")
    seq_lens = _ints(args.seq_lens) if args.seq_lens else ([64, 32] if tiny else [4096, 2048])
    candidates = sorted(_ints(args.micro_batches)) if args.micro_batches else (
        [1, 2, 4] if tiny else [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64])
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [c for c in cases if c not in CASES] + [m for m in models if m not in shapes]
    if bad:
        print(f"unknown case/model {bad}; cases {CASES}, models {sorted(shapes)}", file=sys.stderr)
        return 2
    if args.warmup is None:
        args.warmup = (2 if args.quick else 3) + (2 if args.compile else 0)
    if args.steps is None:
        args.steps = 5 if args.quick else 10
    if dev.is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs stay fp32; bf16 autocast unaffected
        if args.memory_fraction:
            torch.cuda.set_per_process_memory_fraction(args.memory_fraction)

    import transformers

    device_name = torch.cuda.get_device_name(0) if dev.is_cuda else (platform.processor() or platform.machine() or "cpu")
    spec, spec_what = (spec_peak(device_name) if dev.is_cuda and args.precision == "amp_bf16" else (None, None))
    if args.peak_tflops:
        spec, spec_what = args.peak_tflops, "--peak-tflops"
    args.spec_tflops = spec

    mm_dtype = torch.bfloat16 if args.precision == "amp_bf16" else torch.float32
    mm_sizes = ([256] if tiny and not dev.is_cuda else [2048] if tiny else [8192] if args.quick else [4096, 8192, 16384])
    log(f"device {device_name}; measuring the {mm_dtype} matmul rate at n={mm_sizes}")
    matmul = measure_matmul(dev, mm_dtype, mm_sizes, reps=10 if args.quick else 30)
    args.matmul_tflops = matmul["tflops"]
    log(f"matmul {matmul['tflops']:.1f} TFLOP/s; datasheet {spec} ({spec_what})")

    from llmshearing.models import llama as llama_mod

    report: dict[str, Any] = {
        "meta": {
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "argv": list(sys.argv if argv is None else argv),
            "cwd": os.getcwd(),
            "device": dev.kind,
            "device_name": device_name,
            "device_count": torch.cuda.device_count() if dev.is_cuda else 0,
            "device_total_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if dev.is_cuda else None,
            "capability": list(torch.cuda.get_device_capability(0)) if dev.is_cuda else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if dev.is_cuda else None,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "hostname": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tiny": tiny, "quick": args.quick, "compile": args.compile,
            "activation_checkpointing": args.activation_checkpointing,
            "precision": args.precision, "optimizer": args.optimizer, "grad_clip": args.grad_clip,
            "hf_attention_mask": args.hf_attention_mask,
            "seq_lens": seq_lens, "micro_batch_candidates": candidates, "cases": cases, "models": models,
            "warmup_steps": args.warmup, "timed_steps": args.steps, "search_steps": args.search_steps,
            "rope_in_qk_dtype": llama_mod.ROPE_IN_QK_DTYPE,
            "composer_model": composer_llama()[1],
            "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "memory_fraction": args.memory_fraction,
            "flops_convention": "llm-foundry: 3 x (2 x non-embedding weights x tokens + 4 x n_layers x q_dim x S^2 "
                                "per sequence); no causal discount; recomputation not counted",
        },
        "peak": {"spec_tflops": spec, "spec_source": spec_what, "measured_matmul": matmul},
        "sdpa_backend": sdpa_backend_probe(dev, shapes["1.3b"], seq_lens[0]),
        "results": [],
        "comparisons": [],
        "complete": False,
    }

    def flush() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))

    def add(r: dict[str, Any]) -> dict[str, Any]:
        report["results"].append(r)
        flush()
        return r

    def ok(r: dict[str, Any] | None) -> bool:
        return r is not None and "step_time_s" in r

    def down_from(mb: int) -> list[int]:
        return [mb] + [c for c in sorted(candidates, reverse=True) if c < mb]

    for seq in seq_lens:
        log(f"=== seq_len {seq}")
        cpt_by_model: dict[str, dict[str, Any]] = {}
        for name in models:
            r_cpt = add(run_case("cpt", name, seq, candidates, "largest", dev, shapes, args)) if "cpt" in cases else None
            if ok(r_cpt):
                cpt_by_model[name] = r_cpt
            if args.ab_rope and ok(r_cpt):
                llama_mod.ROPE_IN_QK_DTYPE = False
                try:
                    r_ab = run_case("cpt", name, seq, [r_cpt["micro_batch"]], "first_fit", dev, shapes, args)
                finally:
                    llama_mod.ROPE_IN_QK_DTYPE = True
                r_ab["case"] = "cpt_rope_fp32"
                add(r_ab)
                if ok(r_ab):
                    report["comparisons"].append({
                        "what": "rope_in_qk_dtype_speedup", "model": name, "seq_len": seq,
                        "micro_batch": r_cpt["micro_batch"], "step_time_ratio_fp32rope_over_default":
                            r_ab["step_time_s"] / r_cpt["step_time_s"]})
            if "hf" in cases:
                cand = down_from(r_cpt["micro_batch"]) if ok(r_cpt) else candidates
                r_hf = add(run_case("hf", name, seq, cand, "first_fit" if ok(r_cpt) else "largest", dev, shapes, args))
                if ok(r_cpt) and ok(r_hf):
                    same = r_hf["micro_batch"] == r_cpt["micro_batch"]
                    report["comparisons"].append({
                        "what": "ours_vs_hf", "model": name, "seq_len": seq, "same_micro_batch": same,
                        "micro_batch_ours": r_cpt["micro_batch"], "micro_batch_hf": r_hf["micro_batch"],
                        "tokens_per_s_ratio_ours_over_hf": r_cpt["tokens_per_s"] / r_hf["tokens_per_s"],
                        "peak_mem_ratio_ours_over_hf": (r_cpt["peak_mem_gib"] / r_hf["peak_mem_gib"]
                                                        if r_cpt.get("peak_mem_gib") and r_hf.get("peak_mem_gib") else None),
                    })
        r_pr = None
        if "prune" in cases:
            r_pr = add(run_case("prune", PRUNE_SOURCE, seq, candidates, "largest", dev, shapes, args))
        if "unmasked" in cases:
            base = cpt_by_model.get(PRUNE_SOURCE)
            if ok(r_pr) and ok(base) and base["micro_batch"] == r_pr["micro_batch"]:
                r_un = dict(base, case="unmasked", reused_from="cpt")
                add(r_un)
            else:
                cand = down_from(r_pr["micro_batch"]) if ok(r_pr) else candidates
                r_un = add(run_case("unmasked", PRUNE_SOURCE, seq, cand, "first_fit" if ok(r_pr) else "largest",
                                    dev, shapes, args))
            if ok(r_pr) and ok(r_un):
                report["comparisons"].append({
                    "what": "prune_vs_unmasked", "model": PRUNE_SOURCE, "target": PRUNE_TARGET, "seq_len": seq,
                    "same_micro_batch": r_un["micro_batch"] == r_pr["micro_batch"],
                    "micro_batch_prune": r_pr["micro_batch"], "micro_batch_unmasked": r_un["micro_batch"],
                    "step_time_ratio_prune_over_unmasked": r_pr["step_time_s"] / r_un["step_time_s"],
                    "tokens_per_s_ratio_prune_over_unmasked": r_pr["tokens_per_s"] / r_un["tokens_per_s"],
                })

    report["complete"] = True
    flush()
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    sys.stdout.flush()
    print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    m = report["meta"]
    lines = [f"{m['device_name']} | torch {m['torch']} | transformers {m['transformers']} | {m['precision']}"
             f"{' | compile' if m['compile'] else ''}{' | act-ckpt' if m['activation_checkpointing'] else ''}",
             f"matmul {report['peak']['measured_matmul']['tflops']:.1f} TFLOP/s measured; "
             f"spec {report['peak']['spec_tflops']}",
             f"{'case':14s} {'model':5s} {'S':>5s} {'mb':>3s} {'step ms':>9s} {'tok/s':>10s} {'GiB':>6s} "
             f"{'TFLOP/s':>8s} {'MFU':>6s} {'MFUmm':>6s}"]
    for r in report["results"]:
        if "step_time_s" not in r:
            lines.append(f"{r['case']:14s} {r['model']:5s} {r['seq_len']:>5d}  -- {r.get('error', '?')[:60]}")
            continue
        pk, mfu, mfumm = r.get("peak_mem_gib"), r.get("mfu_spec"), r.get("mfu_measured_matmul")
        pk_s = "-" if pk is None else f"{pk:.1f}"
        mfu_s = "-" if mfu is None else f"{mfu:.1%}"
        mfumm_s = "-" if mfumm is None else f"{mfumm:.1%}"
        lines.append(
            f"{r['case']:14s} {r['model']:5s} {r['seq_len']:>5d} {r['micro_batch']:>3d} {r['step_time_s'] * 1e3:>9.1f} "
            f"{r['tokens_per_s']:>10.0f} {pk_s:>6s} {r['achieved_tflops']:>8.2f} {mfu_s:>6s} {mfumm_s:>6s}")
    for c in report["comparisons"]:
        vals = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items() if k != "what"}
        lines.append(f"{c['what']}: {vals}")
    print("\n".join(lines), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
