"""Host memory per rank while a 2-rank run builds its model from `model.path`. Prints JSON.

    python benchmarks/rank_memory.py [--d-model 768 --layers 12 --ffn 3072 --vocab 32000] [--out F.json]

Writes a random model of that shape (default 162M parameters, 649 MB in fp32) as an llmshearing
model dir in bf16 (as released checkpoints are; training upcasts to fp32 on load), then starts 2 real processes (torch.multiprocessing, gloo on CPU) that run what `train.py` runs
before training: `init_distributed`, then `train.build_model` (rank 0 reads the weights, the
others build on the meta device), then the DDP wrap Composer applies on CPU (its construction-time
broadcast is how ranks > 0 get rank 0's weights). Each rank reports its peak RSS (VmHWM, which
counts memory-mapped file pages that were read) above its baseline after imports, after each
stage. The same is measured for `--every-rank-loads` (the behaviour before: every rank read the
file), so one run shows the difference.

Under FSDP on GPUs the ranks > 0 stay on the meta device until FSDP materialises each unit on
the GPU (sync_module_states), so their host memory ends at the "build" figure; under DDP (CPU,
or GPU without FSDP) every rank holds a full replica by design, which the "ddp" figure shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from bench_common import emit_json

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _hwm() -> int:
    """Peak resident set of this process in bytes (VmHWM; unlike ru_maxrss it is not inherited)."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) * 1024


def _rank(rank: int, world: int, port: int, model_dir: str, every_rank_loads: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch.nn.parallel import DistributedDataParallel

    from llmshearing.config import ModelSection, TrainConfig
    from llmshearing.train import build_model, init_distributed

    base = _hwm()
    world_size, r = init_distributed("cpu", 600)
    cfg = TrainConfig(run_name="mem", model=ModelSection(path=model_dir), max_duration="1ba")
    model = build_model(cfg, rank=0 if every_rank_loads else r, world_size=world_size, sharded=False)
    built = _hwm()
    DistributedDataParallel(model)
    ddp = _hwm()
    Path(out, f"rank{r}.json").write_text(json.dumps({"baseline": base, "build": built - base, "ddp": ddp - base}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--file-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="dtype of the weights on disk (released checkpoints are bf16; training upcasts to fp32)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    from llmshearing.convert.checkpoint import save_model_dir
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.shape import ModelShape

    shape = ModelShape(d_model=a.d_model, n_heads=a.heads, n_kv_heads=a.heads, head_dim=a.d_model // a.heads,
                       n_layers=a.layers, intermediate_size=a.ffn, vocab_size=a.vocab)
    fp32 = shape.n_params() * 4
    result: dict = {"benchmark": "rank_memory", "world_size": 2, "backend": "gloo (CPU)",
                    "model": {**shape.to_dict(), "n_params": shape.n_params(), "fp32_bytes": fp32},
                    "host": {"python": platform.python_version(), "torch": torch.__version__,
                             "cpus": os.cpu_count()},
                    "units": "bytes of peak RSS above the rank's baseline after imports"}
    with tempfile.TemporaryDirectory(prefix="rank_memory_") as tmp:
        m = LlamaForCausalLM(ModelConfig(shape=shape))
        if a.file_dtype == "bf16":
            m = m.to(torch.bfloat16)
        save_model_dir(m.state_dict(), m.config, Path(tmp) / "model")
        result["model"]["file_dtype"] = a.file_dtype
        del m
        for mode, every in (("rank0_loads", False), ("every_rank_loads", True)):
            out = Path(tmp) / mode
            out.mkdir()
            port = 20000 + (os.getpid() + (7 if every else 0)) % 20000
            mp.start_processes(_rank, args=(2, port, str(Path(tmp) / "model"), every, str(out)), nprocs=2,
                               start_method="spawn", join=True)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
            result[mode] = {f"rank{r}": {**x, "build_x_fp32": round(x["build"] / fp32, 3),
                                         "ddp_x_fp32": round(x["ddp"] / fp32, 3)} for r, x in enumerate(ranks)}
    emit_json(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
