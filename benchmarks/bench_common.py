"""Shared pieces of benchmarks/train_throughput.py: shapes, datasheet peaks, FLOP counting, the device
(timing with CUDA events), the matmul-rate and SDPA-kernel probes."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llmshearing.models.shape import ModelShape  # noqa: E402

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

CASES = ("cpt", "hf", "prune", "unmasked", "cpt_full_logits", "cpt_liger")
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
    """What ComposerLlama does in a training step (forward with the L0 masks, the chunked next-token CE in
    fp32), without Composer. Used only when `composer` cannot be imported."""

    def __init__(self, model: torch.nn.Module, l0: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.l0 = model, l0

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        from llmshearing.models.losses import shift_targets

        masks, lag = self.l0() if self.l0 is not None else (None, None)
        sums = self.model(batch["input_ids"], masks, targets=shift_targets(batch["input_ids"]))
        return {"ce_sum": sums.ce_sum, "n_tokens": sums.n_tokens, "lagrangian": lag}

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ce = outputs["ce_sum"] / outputs["n_tokens"]
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


def emit_json(result: dict[str, Any], out: str | None) -> None:
    """Every benchmark's output: the JSON on stdout, and in `--out` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
