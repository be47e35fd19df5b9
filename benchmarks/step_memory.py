"""Peak host memory and time of one training step on CPU: the full-logits loss (before) vs the chunked LM
head + loss (`models/losses.py`, after), LM-only and with distillation. Prints JSON.

    python benchmarks/step_memory.py [--out benchmarks/results/step_memory_cpu.json] [--tiny]

Shapes: SmolLM2-135M's (vocabulary 49,152, tied) and a small 2-layer model with Llama-3's vocabulary
(128,256), at seq 1024 x micro-batch 2 = 2,048 tokens per step. Each case runs in its own process: build
the model (and a teacher of the same shape for distillation), one step so the Adam state exists, then
reset the peak-RSS counter (`/proc/self/clear_refs`) and time one more step. 'peak' is that step's peak
RSS above the RSS before it: activations, logits and their fp32 copies, gradients (the weights and Adam
state already exist). 'before' is the loss as it was: the model returns [B, S, V] logits, the loss casts
them to fp32; distillation adds the teacher's logits, two fp32 log-softmaxes, an exp and a product.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench_common import emit_json  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, n_layers=30, intermediate_size=1536,
                         vocab_size=49152, tie_embeddings=True),
    "llama3-vocab-2layer": dict(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, n_layers=2, intermediate_size=768,
                                vocab_size=128256, tie_embeddings=False),
}
TINY = {"tiny": dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=2, intermediate_size=128,
                     vocab_size=4096, tie_embeddings=False)}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1]) * 1024


def _case(shape_name: str, shape: dict, task: str, impl: str, chunk: int, seq: int, micro: int, out: str) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from composer.optim import DecoupledAdamW

    from llmshearing.models.composer_model import SOFT_TARGETS, ComposerLlama
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.models.losses import SoftTargets, shift_targets
    from llmshearing.models.shape import ModelShape

    torch.manual_seed(0)
    cfg = ModelConfig(shape=ModelShape(**shape), max_position_embeddings=max(seq, 4096))
    model = LlamaForCausalLM(cfg)
    cm = ComposerLlama(model=model, loss_chunk_tokens=chunk)
    teacher = LlamaForCausalLM(cfg).eval().requires_grad_(False) if task == "distill" else None
    opt = DecoupledAdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.shape.vocab_size, (micro, seq), generator=torch.Generator().manual_seed(1))
    targets = shift_targets(ids)
    T, alpha = 2.0, 0.5

    def before() -> torch.Tensor:
        logits = model(ids)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        if teacher is None:
            return ce
        with torch.no_grad():
            t_logits = teacher(ids)
        s = F.log_softmax(logits.float() / T, dim=-1)
        t = F.log_softmax(t_logits.float() / T, dim=-1)
        keep = targets != -100
        kd = (t.exp() * (t - s)).sum(-1).masked_fill(~keep, 0.0).sum() / keep.sum() * T * T
        return (1 - alpha) * ce + alpha * kd

    def after() -> torch.Tensor:
        batch = {"input_ids": ids}
        if teacher is not None:  # what DistillationCallback.before_forward does
            with torch.no_grad():
                batch[SOFT_TARGETS] = SoftTargets(teacher(ids, output="hidden"), teacher.lm_head.weight, T)
        loss = cm.loss(cm(batch), batch)
        if teacher is not None:
            return loss["total"] + alpha * (loss["kd_loss"] - loss["ce_loss"])
        return loss["total"]

    loss_fn = before if impl == "before" else after

    def step() -> float:
        opt.zero_grad(set_to_none=False)  # gradients kept allocated between steps, as in training
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss)

    step()  # the Adam state and the gradients now exist
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    loss = step()
    dt = time.perf_counter() - t0
    Path(out).write_text(json.dumps({
        "shape": shape_name, "task": task, "impl": impl, "chunk_tokens": chunk if impl == "chunked" else None,
        "tokens": seq * micro, "peak_bytes": _status("VmHWM") - rss0, "step_s": dt, "loss": loss,
        "fp32_logits_bytes": seq * micro * cfg.shape.vocab_size * 4}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, seq 128 (tests the script)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--chunks", default="1024,256", help="chunk sizes (tokens) of the 'after' rows")
    a = ap.parse_args(argv)
    shapes = TINY if a.tiny else SHAPES
    seq = 128 if a.tiny else a.seq_len
    chunks = [int(c) for c in a.chunks.split(",")] if not a.tiny else [64]
    rows = []
    ctx = mp.get_context("spawn")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in shapes.items():
            for task in ("lm", "distill"):
                for impl, chunk in [("before", 0)] + [("chunked", c) for c in chunks]:
                    out = str(Path(tmp) / f"{name}-{task}-{impl}-{chunk}.json")
                    p = ctx.Process(target=_case, args=(name, shape, task, impl, chunk, seq, a.micro_batch, out))
                    p.start()
                    p.join()
                    if p.exitcode != 0:
                        raise SystemExit(f"case {name} {task} {impl} {chunk}: exit {p.exitcode}")
                    rows.append(json.loads(Path(out).read_text()))
                    r = rows[-1]
                    print(f"[step_memory] {name:20s} {task:8s} {impl:8s} chunk {chunk:5d}: peak "
                          f"{r['peak_bytes'] / 2**20:8.0f} MiB, step {r['step_s']:6.2f} s, loss {r['loss']:.4f}",
                          file=sys.stderr, flush=True)
    summary = []
    for name in shapes:
        for task in ("lm", "distill"):
            base = next(r for r in rows if r["shape"] == name and r["task"] == task and r["impl"] == "before")
            for r in rows:
                if r["shape"] == name and r["task"] == task and r["impl"] == "chunked":
                    summary.append({"shape": name, "task": task, "chunk_tokens": r["chunk_tokens"],
                                    "peak_before_mib": round(base["peak_bytes"] / 2**20),
                                    "peak_after_mib": round(r["peak_bytes"] / 2**20),
                                    "peak_ratio": round(base["peak_bytes"] / max(r["peak_bytes"], 1), 2),
                                    "step_s_before": round(base["step_s"], 2), "step_s_after": round(r["step_s"], 2),
                                    "loss_gap": abs(base["loss"] - r["loss"])})
    emit_json({"benchmark": "step_memory", "device": "cpu", "seq_len": seq, "micro_batch": a.micro_batch,
               "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
               "units": "peak: bytes of RSS above the RSS before the measured step (weights, gradients and Adam "
                        "state already allocated)", "shapes": shapes, "rows": rows, "summary": summary}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
