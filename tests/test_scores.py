"""Importance scores (`llmshearing.pruning.scores`) against brute force, on 1 and 2 real processes.

The reference runs transformers' own Llama (same weights, fp64), records its activations with hooks on
*its* modules, and evaluates every formula with explicit Python loops (per head, per token), so it
shares neither the forward nor the reductions with the code under test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _hf_helpers import hf_model, ours_from_hf

from llmshearing.pruning.score_init import init_from_scores_
from llmshearing.pruning.scores import compute_scores

BATCHES = [torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(4)]


def _brute_force(hf, batches) -> dict[str, torch.Tensor]:
    cfg = hf.config
    L, H, D, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size
    hd = D // H
    K = cfg.num_key_value_heads
    rec: dict[str, list] = {"ctx": [], "act": [], "norm": [], "io": []}
    hooks = []
    for layer in hf.model.layers:
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: rec["ctx"].append(a[0])))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: rec["act"].append(a[0])))
        hooks.append(layer.register_forward_hook(
            lambda m, a, kw, out: rec["io"].append((kw.get("hidden_states", a[0] if a else None),
                                                    out[0] if isinstance(out, tuple) else out)),
            with_kwargs=True))
    for name, m in hf.named_modules():
        if name.endswith("norm"):
            hooks.append(m.register_forward_hook(lambda m, a, out: rec["norm"].append(out)))
    heads, inter, hidden, layers = (torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, F, dtype=torch.float64),
                                    torch.zeros(D, dtype=torch.float64), torch.zeros(L, dtype=torch.float64))
    T = 0
    with torch.no_grad():
        for ids in batches:
            for v in rec.values():
                v.clear()
            hf(ids)
            B, S = ids.shape
            T += B * S
            assert len(rec["ctx"]) == len(rec["act"]) == len(rec["io"]) == L and len(rec["norm"]) == 2 * L + 1
            for l in range(L):
                ctx, act, (x, y) = rec["ctx"][l], rec["act"][l], rec["io"][l]
                for b in range(B):
                    for t in range(S):
                        for h in range(H):
                            heads[l, h] += math.sqrt(sum(float(v) ** 2 for v in ctx[b, t, h * hd:(h + 1) * hd]))
                        for f in range(F):
                            inter[l, f] += abs(float(act[b, t, f]))
                        xv, yv = x[b, t], y[b, t]
                        cos = float((xv * yv).sum()) / (float(xv.norm()) * float(yv.norm()))
                        layers[l] += 1 - cos
            for out in rec["norm"]:
                for d in range(D):
                    hidden[d] += float(out[:, :, d].abs().sum())
    for h in hooks:
        h.remove()
    kv = torch.stack([heads[:, k * (H // K):(k + 1) * (H // K)].sum(-1) for k in range(K)], dim=-1)
    return {"heads": heads / T, "intermediate": inter / T, "hidden": hidden / T, "layers": layers / T,
            "kv_groups": kv / T, "tokens": T}


@pytest.fixture(scope="module")
def models():
    hf = hf_model("llama", num_key_value_heads=2).double()  # GQA: 4 query heads in 2 KV groups
    ours = ours_from_hf(hf).double()
    return hf, ours


def test_each_score_equals_brute_force(models):
    hf, ours = models
    got = compute_scores(ours, BATCHES, progress=False)
    ref = _brute_force(hf, BATCHES)
    assert got.tokens == ref["tokens"] == 4 * 2 * 12
    for name in ("heads", "intermediate", "hidden", "layers"):
        g, r = getattr(got, name), ref[name]
        print(f"{name}: max rel gap {float(((g - r).abs() / r.abs().clamp_min(1e-30)).max()):.1e}")
        # fp64 both sides, but transformers computes RoPE's angles in fp32 (its logits differ from ours by
        # ~3e-7 relative in fp64); measured gap ~4e-8
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.kv_groups(2), ref["kv_groups"], rtol=1e-6, atol=0)
    assert (got.layers > 0).all() and (got.heads > 0).all()  # non-trivial values


def test_scores_leave_the_model_unchanged_and_hookless(models):
    _, ours = models
    ours.train()
    compute_scores(ours, BATCHES[:1], progress=False)
    assert ours.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.modules())


def _l0(src):
    from llmshearing.pruning.l0 import L0Module

    return L0Module(src, src.replace(d_model=48, n_heads=1, n_kv_heads=1, n_layers=1, intermediate_size=64), seed=0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from llmshearing.models import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    hf = hf_model("llama", num_key_value_heads=2)
    ours = ours_from_hf(hf).double()
    mine = BATCHES[rank::world]  # each rank its own batches
    res = {k: v.tolist() if isinstance(v, torch.Tensor) else v
           for k, v in compute_scores(ours, mine, progress=rank == 0).state_dict().items()}
    # the same on an FSDP2-sharded copy (parameters are DTensor shards; the forward gathers them)
    sharded = ours_from_hf(hf).double()
    sharding.shard_llama(sharded, sharding.device_mesh("cpu"), sharding.MixedPrecisionPolicy(
        param_dtype=torch.float64, reduce_dtype=torch.float64))
    scores = compute_scores(sharded, mine, progress=False)
    res["fsdp"] = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in scores.state_dict().items()}
    # score init written into an FSDP2-sharded L0 unit (each rank its shard), read back whole
    l0 = _l0(ours.config.shape)
    sharding.shard_fp32(l0, sharding.device_mesh("cpu"))
    init_from_scores_(l0, scores)
    with sharding.full_params(l0):
        res["l0_masks"] = {k: v.tolist() for k, v in l0.eval().deterministic_masks(target=True).state_dict().items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank_over_the_same_batches(tmp_path):
    mp.start_processes(_worker, args=(2, 25000 + os.getpid() % 8000, str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    hf = hf_model("llama", num_key_value_heads=2)
    one = compute_scores(ours_from_hf(hf).double(), BATCHES, progress=False)
    l0 = _l0(one_shape := ours_from_hf(hf).config.shape)
    init_from_scores_(l0, one)
    ref_masks = l0.eval().deterministic_masks(target=True).state_dict()
    assert set(_l0(one_shape).specs) == {"layer", "kv_group", "query_head", "intermediate", "hidden"}
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        for res in (got, got["fsdp"]):
            assert res["tokens"] == one.tokens
            for name in ("heads", "intermediate", "hidden", "layers"):
                # fp64 sums added in another order: equal to ~1e-15 relative
                torch.testing.assert_close(torch.tensor(res[name], dtype=torch.float64), getattr(one, name),
                                           rtol=1e-12, atol=0)
        # the sharded L0 unit's step-0 masks == the unsharded one's, bit for bit
        assert got["l0_masks"].keys() == ref_masks.keys()
        for k, v in ref_masks.items():
            assert torch.equal(torch.tensor(got["l0_masks"][k]), v), k
