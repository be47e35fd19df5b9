"""FSDP2 for our models: how a run is sharded, on CPU (gloo) and GPU (nccl) alike.

We shard the model ourselves with torch's `fully_shard` (torchtitan's recipe) instead of through
Composer's FSDP2 wrapping, because three things a shearing run needs do not fit Composer 0.32.1's:
- the L0 module must stay fp32 under bf16 mixed precision (mask logits and multipliers), and
  Composer passes one policy to every unit (a per-module dict goes to `fully_shard` unchanged);
- ranks > 0 must never read `model.path`: they build on the meta device and receive rank 0's
  weights. Composer's own sync reads a full state dict on rank 0 after any pre-sharded unit exists,
  which would be a collective on rank 0 alone;
- the distillation teacher is sharded the same way outside the trained model.
Composer then finds the model already sharded (it applies no further unit, see `train.py`), and
still writes the sharded or full checkpoints and resumes them.

Units: every decoder layer, then the LlamaForCausalLM root (embeddings, final norm and lm_head in
one unit, so a tied embedding stays tied), and the L0 module as its own fp32 unit. Parameters
become DTensors sharded on dim 0. Anything that reads them outside forward goes through
`full_params` (one unit's all-gather) or works on the local shards (`clamp_`, the optimizer).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from llmshearing.models.rope import RotaryEmbedding

FP32_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


@functools.cache
def device_mesh(device: str) -> DeviceMesh:
    """The 1-D mesh of all ranks (the default process group must exist): FULL_SHARD over every rank. One
    per process: the student, its L0 unit and the teacher share it."""
    world = torch.distributed.get_world_size()
    return init_device_mesh("cuda" if device == "gpu" else "cpu", (world,))


def mixed_precision_policy(precision: str, mixed_precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for the model's units, as Composer names the choices:
    DEFAULT = params gathered in the run's low precision, gradients reduced in fp32; PURE = both in
    low precision; FULL = fp32 throughout. A fp32 run is FULL whatever the choice."""
    low = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision)
    if low is None or mixed_precision == "FULL":
        return FP32_POLICY
    if mixed_precision == "DEFAULT":
        return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    if mixed_precision == "PURE":
        return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=low)
    raise ValueError(f"unknown mixed_precision {mixed_precision!r} (DEFAULT, PURE or FULL)")


def shard_llama(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                reshard_after_forward: bool = True) -> nn.Module:
    """One unit per decoder layer, then the root (embeddings, norm, lm_head; ties kept)."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def shard_fp32(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """A small module (the L0 masks and multipliers) as its own unit that never leaves fp32."""
    fully_shard(module, mesh=mesh, mp_policy=FP32_POLICY)
    return module


def materialize_from_rank0(module: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill a sharded module with rank 0's weights: rank 0 passes its full (unsharded) state dict,
    taken before `fully_shard`; the other ranks pass {} and hold meta shards, which get storage here.
    Each rank ends with only its shard. Non-persistent buffers (the rotary frequencies) are not in
    state dicts: modules that own one recompute it (`reset_parameters`)."""
    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        module.to_empty(device=device)  # keeps a tied embedding tied (one Parameter object)
        for m in module.modules():
            if isinstance(m, RotaryEmbedding):
                m.reset_parameters()
    set_model_state_dict(module, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_state_on_rank0(module: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """What `materialize_from_rank0` needs, taken before sharding (rank 0: the tensors themselves,
    no copy; others: nothing)."""
    return dict(module.state_dict()) if rank == 0 else {}


@contextlib.contextmanager
def full_params(module: nn.Module) -> Iterator[nn.Module]:
    """The module with its whole parameters in place (one unit's all-gather, a collective: every
    rank enters); a no-op for an unsharded module. For reads outside forward: mask statistics, the
    masks saved at evaluations, the L0 state dumped on a NaN loss."""
    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global 2-norm of all gradients to `max_norm` (plain tensors or DTensor shards alike:
    the norm of sharded gradients is reduced over the ranks). Returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@torch.no_grad()
def average_summed_grads_(parameters: Iterable[torch.Tensor], world_size: int) -> None:
    """Divide gradients that a collective summed where it should have averaged over `world_size`
    ranks (FSDP2 on gloo, see callbacks/gradients.py)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and world_size > 1:
        torch._foreach_div_(grads, float(world_size))


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this rank holds for these tensors (a DTensor counts its local shard only)."""
    n = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    return n
