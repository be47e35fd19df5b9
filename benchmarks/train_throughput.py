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
  cpt_full_logits  cpt with the loss as it was before the chunked LM head ([B, S, V] logits, fp32 CE)
  cpt_liger        cpt with Liger's fused linear cross-entropy (GPU; needs the liger-kernel package)

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
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_cases import run_case  # noqa: E402
from bench_common import (  # noqa: E402
    CASES,
    PRUNE_SOURCE,
    PRUNE_TARGET,
    SHAPES,
    TINY_SHAPES,
    Device,
    composer_llama,
    log,
    measure_matmul,
    sdpa_backend_probe,
    spec_peak,
)

# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (automatic on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer warm-up/timed steps and one matmul size")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (ours and HF)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no C compiler)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="non-reentrant activation checkpointing of every decoder layer (as the FSDP yamls)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard every model with FSDP2 on a 1-rank mesh, as train.py runs (fsdp: section): layer "
                        "units in the bf16 policy, the L0 unit in fp32; the HF baseline sharded the same way")
    p.add_argument("--cases", default="cpt,hf,prune,unmasked", help=f"comma list of {CASES}")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024,
                   help="tokens per chunk of the LM head + loss (train.py's loss_chunk_tokens)")
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
            "tiny": tiny, "quick": args.quick, "compile": args.compile and args.compile_backend,
            "activation_checkpointing": args.activation_checkpointing, "fsdp2": args.fsdp,
            "loss_chunk_tokens": args.loss_chunk_tokens,
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
        for variant in ("cpt_full_logits", "cpt_liger"):  # the loss alternatives, at cpt's micro-batch and above
            for name in models:
                if variant not in cases:
                    continue
                r_v = add(run_case(variant, name, seq, candidates, "largest", dev, shapes, args))
                base = cpt_by_model.get(name)
                if ok(r_v) and ok(base):
                    report["comparisons"].append({
                        "what": f"chunked_vs_{variant.removeprefix('cpt_')}", "model": name, "seq_len": seq,
                        "micro_batch_chunked": base["micro_batch"], f"micro_batch_{variant}": r_v["micro_batch"],
                        "tokens_per_s_ratio_chunked_over_variant": base["tokens_per_s"] / r_v["tokens_per_s"],
                        "peak_mem_gib_chunked": base.get("peak_mem_gib"), "peak_mem_gib_variant": r_v.get("peak_mem_gib")})
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
