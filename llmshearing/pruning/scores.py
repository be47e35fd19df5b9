"""Importance scores of every prunable structure, from one forward-only pass over calibration batches.

Why: the masks' uniform init makes the Lagrangian find the structure from nothing; activation
magnitudes on a few batches of the run's own data (Minitron's recipe) rank the units at the cost of a
few forwards. The scores feed the score init of the L0 masks (`score_init.py`) and the one-shot cut.

Formulas (T = all tokens of all calibration batches on all ranks; l = layer; hooks read the activations
of the *unmasked* model, in fp64 accumulators):

- heads [L, H]:         s[l, h] = 1/T * sum_t || ctx_{l,h}(t) ||_2, the L2 norm of query head h's
                        attention output (softmax(q k^T) v, before o_proj) at token t.
- kv_groups [L, K]:     s[l, k] = sum over the G query heads of group k of heads[l, h] (h // G == k).
                        Query heads are ranked *within* their group by `heads` viewed as [L, K, G].
- intermediate [L, F]:  s[l, f] = 1/T * sum_t | silu(gate_f(x_t)) * up_f(x_t) |, the MLP activation that
                        down_proj reads.
- hidden [D]:           s[d] = 1/T * sum_t sum_n | y_n(t)_d |, over the outputs y_n of every RMSNorm
                        (2 per layer and the final one): the channels as every consumer sees them.
- layers [L]:           s[l] = 1/T * sum_t (1 - cos(x_l(t), x_{l+1}(t))), x_l the residual stream entering
                        layer l (ShortGPT's block influence: a layer that barely turns the stream matters little).

Memory: the accumulators ([L, H], [L, F], [D], [L]) and one batch's activations, whatever the number of
batches. Multi-rank: each rank scores its own batches, then sums and token counts are all-reduced (sum),
so the result equals one rank scoring all the batches. Works on an FSDP2-sharded model (hooks read
activations only; the forward gathers the parameters as in training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from llmshearing.models.llama import LlamaForCausalLM, RMSNorm


@dataclass
class ImportanceScores:
    """Per-structure scores (fp64 on CPU); larger = more important. `tokens`: T of the formulas."""

    heads: torch.Tensor  # [L, H]
    intermediate: torch.Tensor  # [L, F]
    hidden: torch.Tensor  # [D]
    layers: torch.Tensor  # [L]
    tokens: int

    def kv_groups(self, group_size: int) -> torch.Tensor:
        """[L, K]: the sum of each KV group's query-head scores."""
        L, H = self.heads.shape
        return self.heads.view(L, H // group_size, group_size).sum(-1)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Accumulator:
    """Forward hooks that add each batch's activation statistics to fp64 sums."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device) -> None:
        s = model.config.shape
        self.shape = s
        f64 = dict(dtype=torch.float64, device=device)  # on the model's device: no host sync per batch
        self.heads = torch.zeros(s.n_layers, s.n_heads, **f64)
        self.intermediate = torch.zeros(s.n_layers, s.intermediate_size, **f64)
        self.hidden = torch.zeros(s.d_model, **f64)
        self.layers = torch.zeros(s.n_layers, **f64)
        self.tokens = 0
        self.handles: list[Any] = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(i)))
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._mlp_hook(i)))
            self.handles.append(layer.register_forward_hook(self._layer_hook(i)))
        for m in model.modules():
            if isinstance(m, RMSNorm):
                self.handles.append(m.register_forward_hook(self._norm_hook))

    def _head_hook(self, i: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            ctx = args[0]  # [B, S, H * head_dim]
            b, t, _ = ctx.shape
            norms = ctx.detach().double().view(b, t, self.shape.n_heads, self.shape.head_dim).norm(dim=-1)
            self.heads[i] += norms.sum((0, 1))
        return hook

    def _mlp_hook(self, i: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            self.intermediate[i] += args[0].detach().double().abs().sum((0, 1))
        return hook

    def _layer_hook(self, i: int):
        def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x, y = args[0].detach().double(), out.detach().double()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # [B, S]
            self.layers[i] += (1 - cos).sum()
        return hook

    def _norm_hook(self, _module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        self.hidden += out.detach().double().abs().sum((0, 1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _all_reduce_sum(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Sum over ranks (one flat fp64 all-reduce); identity without a multi-rank process group."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors]).to(device)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    out, o = [], 0
    for t in tensors:
        out.append(flat[o:o + t.numel()].view_as(t))
        o += t.numel()
    return out


def _progress(it: Iterable[Any], total: int | None, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from it
        return
    from tqdm.auto import tqdm

    yield from tqdm(it, total=total, desc="importance scores", unit="batch")


@torch.no_grad()
def compute_scores(model: LlamaForCausalLM, batches: Iterable[torch.Tensor], *, total: int | None = None,
                   progress: bool = True, reduce: bool = True) -> ImportanceScores:
    """Scores of `model` (unmasked) over `batches` of token ids [B, S] (this rank's); see the module
    docstring for the formulas. `reduce`: all-reduce over the ranks of the default process group (every
    rank must call this with the same number of batches: the forwards of a sharded model are collectives).
    `total`: the number of batches, for the progress bar."""
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"compute_scores expects a LlamaForCausalLM, got {type(model).__name__}")
    device = model.model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    acc = _Accumulator(model, device)
    try:
        with _eager_layers(model):
            for ids in _progress(batches, total, progress):
                ids = ids.to(device)
                model(ids, None, output="hidden")
                acc.tokens += ids.numel()
    finally:
        acc.remove()
        model.train(was_training)
    tok = torch.tensor([float(acc.tokens)], dtype=torch.float64, device=device)
    sums = [acc.heads, acc.intermediate, acc.hidden, acc.layers, tok]
    if reduce:
        sums = _all_reduce_sum(sums, device)
    heads, inter, hidden, layers, tok = (t.cpu() for t in sums)
    t = float(tok.item())
    if t == 0:
        raise ValueError("compute_scores got no calibration tokens")
    return ImportanceScores(heads=heads / t, intermediate=inter / t, hidden=hidden / t, layers=layers / t,
                            tokens=int(t))


def calibration_ids(n_rows: int, n_batches: int, global_batch: int, seed: int, rank: int, world: int) -> list[np.ndarray]:
    """Per global batch, this rank's dataset ids (the calibration rows of score init and of
    the one-shot cut): the first n_batches * global_batch ids of a permutation of all rows seeded by `seed`,
    rank r taking rows [r * B/W, (r + 1) * B/W) of every global batch, so any world size scores the same rows."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not divide over {world} ranks")
    perm = np.random.default_rng(seed).permutation(n_rows)
    need = n_batches * global_batch
    if need > n_rows:
        raise ValueError(f"score init wants {n_batches} batches x {global_batch} rows, the train data has {n_rows}")
    per = global_batch // world
    return [perm[b * global_batch + rank * per: b * global_batch + (rank + 1) * per] for b in range(n_batches)]


def score_rows(model: LlamaForCausalLM, dataset: Any, n_batches: int, global_batch: int, microbatch: int,
               seed: int, rank: int = 0, world: int = 1, progress: bool = True) -> ImportanceScores:
    """`compute_scores` over the calibration rows (`calibration_ids`) of a map-style dataset of
    {'input_ids': [S]} rows (the train data's MixtureDataset), this rank's rows in micro-batches."""
    ids = calibration_ids(len(dataset), n_batches, global_batch, seed, rank, world)
    micro = [rows[i:i + microbatch] for rows in ids for i in range(0, len(rows), max(1, microbatch))]

    def batches() -> Iterator[torch.Tensor]:
        for rows in micro:
            yield torch.stack([dataset[int(i)]["input_ids"] for i in rows])

    return compute_scores(model, batches(), total=len(micro), progress=progress)


@contextlib.contextmanager
def _eager_layers(model: LlamaForCausalLM) -> Iterator[None]:
    """Run compiled decoder layers eagerly while scoring: the hooks (host copies) would break a
    `fullgraph` compile, and a few calibration forwards do not need the compiled graphs."""
    saved = [layer._impl for layer in model.model.layers]
    for layer in model.model.layers:
        layer._impl = layer._forward
    try:
        yield
    finally:
        for layer, impl in zip(model.model.layers, saved):
            layer._impl = impl
