"""Host memory per rank of a 2-rank run, DDP vs FSDP2, from `model.path` to after an optimizer step.
Prints JSON.

    python benchmarks/rank_memory.py [--d-model 768 --layers 12 --ffn 3072 --vocab 32000] [--out F.json]

Writes a random model of that shape (default 162M parameters, 649 MB in fp32) as an llmshearing model
dir in bf16 (as released checkpoints are; training upcasts to fp32 on load), then starts 2 real
processes (torch.multiprocessing, gloo on CPU) that run what `train.py` runs, stage by stage:

    build   `init_distributed`, `train.build_model` (rank 0 reads the weights, the others build on the
            meta device; `every_rank_loads`: every rank reads them, the behaviour before)
    wrap    DDP (`DistributedDataParallel`: every rank a full replica, rank 0's weights broadcast) or
            FSDP2 (`train.shard_model`: each rank keeps its shard of rank 0's weights)
    step    one forward/backward on 1 x 128 tokens and a DecoupledAdamW step (the Adam moments exist)

Per rank and stage: the peak RSS above the rank's baseline after imports (VmHWM, which counts
memory-mapped file pages that were read), the RSS at the end of the stage (VmRSS: what the rank keeps),
and the exact bytes of the parameters and optimizer state the rank holds (a DTensor counts its shard).
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


def _status(key: str) -> int:
    """VmHWM (peak resident set; unlike ru_maxrss not inherited) or VmRSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1]) * 1024


def _rank(rank: int, world: int, port: int, model_dir: str, mode: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from composer.optim import DecoupledAdamW
    from torch.nn.parallel import DistributedDataParallel

    from llmshearing.models.sharding import local_bytes
    from llmshearing.training.config import FSDPSection, ModelSection, TrainConfig
    from llmshearing.training.trainer import build_model, init_distributed, shard_model

    base = _status("VmHWM")
    rec: dict = {"baseline": base}

    def stage(name: str, model=None, opt=None) -> None:
        rec[name] = {"peak": _status("VmHWM") - base, "rss": _status("VmRSS") - base}
        if model is not None:
            rec[name]["param_bytes"] = local_bytes(model.parameters())
        if opt is not None:
            rec[name]["optimizer_bytes"] = local_bytes(v for s in opt.state.values() for v in s.values())

    world_size, r = init_distributed("cpu", 600)
    fsdp = mode == "fsdp2"
    cfg = TrainConfig(run_name="mem", model=ModelSection(path=model_dir), max_duration="1ba",
                      fsdp=FSDPSection(activation_checkpointing=False) if fsdp else None)
    model = build_model(cfg, rank=0 if mode == "every_rank_loads" else r, world_size=world_size, sharded=fsdp)
    stage("build")
    if fsdp:
        shard_model(cfg, model, "cpu", "fp32", r)
        run = model
    else:
        run = DistributedDataParallel(model)
    stage("wrap", model)
    opt = DecoupledAdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.shape.vocab_size, (1, 128), generator=torch.Generator().manual_seed(r))
    out = run({"input_ids": ids})
    (out["ce_sum"] / out["n_tokens"]).backward()
    opt.step()
    stage("step", model, opt)
    Path(out, f"rank{r}.json").write_text(json.dumps(rec))
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
    ap.add_argument("--modes", default="every_rank_loads,ddp,fsdp2")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    from llmshearing.convert.checkpoint import save_model_dir
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.models.shape import ModelShape

    shape = ModelShape(d_model=a.d_model, n_heads=a.heads, n_kv_heads=a.heads, head_dim=a.d_model // a.heads,
                       n_layers=a.layers, intermediate_size=a.ffn, vocab_size=a.vocab)
    fp32 = shape.n_params() * 4
    result: dict = {"benchmark": "rank_memory", "world_size": 2, "backend": "gloo (CPU)",
                    "model": {**shape.to_dict(), "n_params": shape.n_params(), "fp32_bytes": fp32},
                    "host": {"python": platform.python_version(), "torch": torch.__version__,
                             "cpus": os.cpu_count()},
                    "units": "bytes above the rank's RSS after imports: 'peak' (VmHWM) and 'rss' (VmRSS) at the end "
                             "of each stage; param_bytes / optimizer_bytes: what the rank holds (its shard under "
                             "FSDP2); x_fp32 = / the model's fp32 bytes"}
    with tempfile.TemporaryDirectory(prefix="rank_memory_") as tmp:
        m = LlamaForCausalLM(ModelConfig(shape=shape))
        if a.file_dtype == "bf16":
            m = m.to(torch.bfloat16)
        save_model_dir(m.state_dict(), m.config, Path(tmp) / "model")
        result["model"]["file_dtype"] = a.file_dtype
        del m
        for i, mode in enumerate(a.modes.split(",")):
            out = Path(tmp) / mode
            out.mkdir()
            port = 20000 + (os.getpid() + 7 * i) % 20000
            mp.start_processes(_rank, args=(2, port, str(Path(tmp) / "model"), mode, str(out)), nprocs=2,
                               start_method="spawn", join=True)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
            for x in ranks:
                for st in ("build", "wrap", "step"):
                    x[st]["x_fp32"] = {k: round(v / fp32, 3) for k, v in x[st].items() if k != "x_fp32"}
            result[mode] = {f"rank{r}": x for r, x in enumerate(ranks)}
    emit_json(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
