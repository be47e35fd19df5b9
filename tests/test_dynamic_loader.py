"""Dynamic multi-domain loader: proportions, rank slicing, exact resumption, exhaustion.

The MDS fixture encodes each sample's identity in its tokens (token 0 = domain index, token 1 =
id inside the domain), so tests can check which samples were served without trusting the loader.
"""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch

from llmshearing.data.dynamic import build_eval_dataloader, build_train_dataloader
from llmshearing.data.sampler import (
    DomainExhaustedError,
    DynamicBatchSampler,
    validate_proportions,
)

DOMAINS = ["cc", "github", "book"]
SIZES = [400, 300, 200]
SEQ = 16
G = 32
SEED = 1234
# chi-square critical value for df=2 at p=0.001 (scipy.stats.chi2.ppf(0.999, 2) = 13.8155)
CHI2_CRIT_DF2 = 13.8155


def _write_domain(out, d_idx: int, n: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"tokens": f"ndarray:uint16:{SEQ}", "domain": "str"},
                   size_limit=4096) as w:  # several shards per domain
        for i in range(n):
            t = ((np.arange(SEQ) * 7 + i) % 251).astype(np.uint16)
            t[0], t[1] = d_idx, i
            w.write({"tokens": t, "domain": DOMAINS[d_idx]})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("mds")
    for d, (name, n) in enumerate(zip(DOMAINS, SIZES)):
        _write_domain(r / "train" / name, d, n)
        _write_domain(r / "eval" / name, d, 50 + 3 * d)
    return r


_OPEN: list = []


@pytest.fixture(autouse=True)
def _release_loaders():
    """Streaming keeps shared memory (one fd per block) until exit unless released."""
    yield
    while _OPEN:
        _OPEN.pop().dataset.close()


def _track(dl):
    _OPEN.append(dl)
    return dl


def _loader(root, props=(0.5, 0.3, 0.2), **kw):
    args = dict(global_batch_size=G, seq_len=SEQ, seed=SEED, rank=0, world_size=1, num_workers=0,
                on_exhausted="repeat")
    args.update(kw)
    return _track(build_train_dataloader(root, DOMAINS, list(props), **args))


def _ident(batch) -> list[tuple[int, int]]:
    """(domain, local id) per sample, read from the tokens themselves."""
    ids = batch["input_ids"]
    assert ids.dtype == torch.long and ids.shape[1] == SEQ
    assert torch.equal(ids[:, 0], batch["domain"])  # domain field agrees with the data
    return list(zip(ids[:, 0].tolist(), ids[:, 1].tolist()))


def _chi2(counts, props) -> float:
    counts = np.asarray(counts, float)
    exp = counts.sum() * np.asarray(props, float)
    mask = exp > 0
    assert np.all(counts[~mask] == 0), "samples from a domain with proportion 0"
    return float((((counts - exp) ** 2)[mask] / exp[mask]).sum())


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- proportions
@pytest.mark.parametrize("workers", [0, 2])
def test_domain_counts_follow_proportions(root, workers):
    props = [0.6, 0.1, 0.3]
    dl = _loader(root, props, num_workers=workers)
    counts = np.zeros(3, int)
    for b in _take(iter(dl), 120):
        assert b["input_ids"].shape == (G, SEQ) and b["domain"].shape == (G,)
        for d, _ in _ident(b):
            counts[d] += 1
    assert counts.sum() == 120 * G
    assert _chi2(counts, props) < CHI2_CRIT_DF2, counts


@pytest.mark.parametrize("workers,prefetch", [(0, None), (2, 3), (4, 2)])
@pytest.mark.parametrize("lag", [0, 2])
def test_proportion_change_applies_from_the_requested_batch_with_any_workers(root, workers, prefetch, lag):
    """A change requested after 30 delivered batches for batch 30 + lag is in effect from exactly that
    batch, although the workers had prefetched batches up to 30 + workers * prefetch under the old
    proportions: the served samples equal those of a loader without workers given the same change."""
    def run(w, pf):
        dl = _loader(root, [0.5, 0.5, 0.0], num_workers=w, prefetch_factor=pf)
        it = iter(dl)
        before = _take(it, 30)
        assert dl.batch_sampler.next_batch == 30 + w * (pf or 0)  # produced ahead of consumption
        from_batch = dl.batch_sampler.set_proportions([0.0, 0.2, 0.8], from_batch=30 + lag)
        return dl.batch_sampler, from_batch, before + _take(it, 60)

    sampler, from_batch, batches = run(workers, prefetch)
    assert from_batch == 30 + lag
    assert sampler.proportion_history == [(0, [0.5, 0.5, 0.0]), (30 + lag, [0.0, 0.2, 0.8])]
    for i, b in enumerate(batches):
        doms = {d for d, _ in _ident(b)}
        assert 2 not in doms if i < from_batch else 0 not in doms, (i, doms)
    new_counts = np.bincount([d for b in batches[from_batch:] for d, _ in _ident(b)], minlength=3)
    assert _chi2(new_counts, [0.0, 0.2, 0.8]) < CHI2_CRIT_DF2, new_counts
    if workers:
        _, _, ref = run(0, None)
        assert all(_ident(a) == _ident(b) for a, b in zip(batches, ref))


def test_domain_draws_match_independent_rule():
    """Every batch's domains equal default_rng([seed, 1, b]).choice under the proportions of b."""
    s = DynamicBatchSampler(SIZES, [0.2, 0.3, 0.5], G, seed=7, domains=DOMAINS, on_exhausted="repeat")
    offs = np.cumsum([0] + SIZES[:-1])
    it = iter(s)
    for b in range(40):
        if b == 15:
            assert s.set_proportions({"cc": 0.7, "github": 0.0, "book": 0.3}) == 15
        p = [0.2, 0.3, 0.5] if b < 15 else [0.7, 0.0, 0.3]
        expect = np.random.default_rng([7, 1, b]).choice(3, size=G, p=p)
        got = np.searchsorted(offs, next(it), side="right") - 1
        assert np.array_equal(got, expect), b


# ----------------------------------------------------------------------------- ranks
def test_rank_slices_partition_global_batch():
    ref = DynamicBatchSampler(SIZES, [0.5, 0.3, 0.2], G, seed=3, on_exhausted="repeat")
    ranks = [DynamicBatchSampler(SIZES, [0.5, 0.3, 0.2], G, seed=3, rank=r, world_size=4, on_exhausted="repeat")
             for r in range(4)]
    its = [iter(s) for s in ranks]
    ref_it = iter(ref)
    for b in range(60):
        if b == 20:  # every rank applies the same change at the same batch
            for s in (ref, *ranks):
                assert s.set_proportions([0.1, 0.1, 0.8]) == 20
        glob = next(ref_it)
        parts = [next(i) for i in its]
        assert all(len(p) == G // 4 for p in parts)
        assert sum(parts, []) == glob
        if b < 5:  # no domain has finished a pass yet, so no id can repeat inside the batch
            assert len(set(sum(parts, []))) == G


def test_two_rank_loaders_split_the_batch(root):
    full = iter(_loader(root))
    r0 = iter(_loader(root, rank=0, world_size=2))
    r1 = iter(_loader(root, rank=1, world_size=2))
    for _ in range(5):
        f, a, b = next(full), next(r0), next(r1)
        assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), f["input_ids"])
        assert torch.equal(torch.cat([a["domain"], b["domain"]]), f["domain"])


# ----------------------------------------------------------------------------- resumption
@pytest.mark.parametrize("change_at", [None, 4, 8])
def test_resume_is_exact_with_prefetching_workers(root, change_at):
    k, n_after = 7, 25
    dl = _loader(root, num_workers=2, prefetch_factor=2, persistent_workers=True)
    it = iter(dl)
    seen = []
    for i in range(k):
        if change_at is not None and i == change_at:
            dl.batch_sampler.set_proportions([0.1, 0.1, 0.8])  # from batch change_at (prefetch redrawn)
        seen.append(next(it))
    assert dl.batch_sampler.next_batch == k + 4  # produced ahead of consumption
    state = dl.dataset.state_dict(num_samples=k * G, from_beginning=True)  # what Composer calls
    state = json.loads(json.dumps(state))  # plain data, small
    assert len(json.dumps(state)) < 600
    assert state["batch_idx"] == k
    rest = _take(it, n_after)

    fresh = _loader(root, props=(0.5, 0.3, 0.2), num_workers=2, prefetch_factor=2)
    fresh.dataset.load_state_dict(state)
    resumed = _take(iter(fresh), n_after)
    for a, b in zip(rest, resumed):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["domain"], b["domain"])
    assert fresh.batch_sampler.proportion_history == dl.batch_sampler.proportion_history


def test_resume_twice_and_from_beginning_false(root):
    ref = [b["input_ids"] for b in _take(iter(_loader(root)), 20)]
    a = _loader(root)
    ia = iter(a)
    _take(ia, 5)
    s1 = a.dataset.state_dict(5 * G, True)
    b = _loader(root)
    b.dataset.load_state_dict(s1)
    ib = iter(b)
    got = _take(ib, 6)
    s2 = b.dataset.state_dict(6 * G, from_beginning=False)  # samples since the resume
    assert s2["batch_idx"] == 11 and s2 == b.dataset.state_dict(11 * G, True)
    c = _loader(root)
    c.dataset.load_state_dict(pickle.loads(pickle.dumps(s2)))
    got += _take(iter(c), 9)
    assert all(torch.equal(x["input_ids"], y) for x, y in zip(got, ref[5:]))


def test_state_replay_equals_snapshots():
    fast = DynamicBatchSampler(SIZES, [0.5, 0.3, 0.2], G, seed=9, on_exhausted="repeat")
    slow = DynamicBatchSampler(SIZES, [0.5, 0.3, 0.2], G, seed=9, on_exhausted="repeat", snapshot_limit=0)
    for s in (fast, slow):
        it = iter(s)
        _take(it, 10)
        s.set_proportions([0.2, 0.2, 0.6])
        _take(it, 40)
    for k in (0, 3, 10, 31, 50):
        assert fast.state_dict(consumed_batches=k) == slow.state_dict(consumed_batches=k)
    with pytest.raises(ValueError, match="whole number of global batches"):
        fast.state_dict(num_samples=G * 3 + 1)


def test_each_pass_serves_every_sample_once_across_resume():
    sizes = [40, 30, 20]
    a = DynamicBatchSampler(sizes, [0.4, 0.3, 0.3], 8, seed=5, on_exhausted="repeat")
    ia = iter(a)
    first = [next(ia) for _ in range(4)]
    state = a.state_dict()
    b = DynamicBatchSampler(sizes, [0.4, 0.3, 0.3], 8, seed=5, on_exhausted="repeat")
    b.load_state_dict(state)
    ib = iter(b)
    stream = sum(first, []) + sum((next(ib) for _ in range(40)), [])
    offs = [0, 40, 70]
    for d, n in enumerate(sizes):
        ids = [i - offs[d] for i in stream if offs[d] <= i < offs[d] + n]
        assert len(ids) >= 2 * n
        assert sorted(ids[:n]) == list(range(n))  # pass 1: each sample exactly once
        assert sorted(ids[n:2 * n]) == list(range(n))  # pass 2 too
        assert ids[:n] != ids[n:2 * n]  # with a new permutation


# ----------------------------------------------------------------------------- exhaustion
def test_stop_raises_naming_domain():
    s = DynamicBatchSampler([20, 1000], [0.5, 0.5], 8, seed=0, domains=["tiny", "big"], on_exhausted="stop")
    it = iter(s)
    served = []
    with pytest.raises(DomainExhaustedError, match=r"domain 'tiny' is exhausted: it has 20 samples"):
        for _ in range(100):
            served += next(it)
    tiny = [i for i in served if i < 20]
    assert len(tiny) == len(set(tiny)) <= 20  # never repeated before stopping


def test_stop_raises_through_worker_loader(root):
    dl = _loader(root, [0.0, 0.0, 1.0], on_exhausted="stop", num_workers=2)
    seen = []
    with pytest.raises(DomainExhaustedError, match="'book'.*200 samples"):
        for b in dl:
            seen += _ident(b)
    assert len(seen) == len(set(seen)) and len(seen) <= 200


def test_repeat_starts_new_pass_and_logs(caplog):
    s = DynamicBatchSampler([20, 1000], [0.5, 0.5], 8, seed=0, domains=["tiny", "big"], on_exhausted="repeat")
    with caplog.at_level(logging.INFO, logger="llmshearing.data.sampler"):
        it = iter(s)
        for _ in range(12):
            next(it)
    assert "domain tiny: all 20 samples used, starting pass 2" in caplog.text
    st = s.state_dict()
    assert st["passes"][0] >= 1 and 0 <= st["cursors"][0] < 20


# ----------------------------------------------------------------------------- validation
def test_validation_errors(root, tmp_path):
    with pytest.raises(ValueError, match="sum to 1"):
        validate_proportions([0.5, 0.6, 0.0], DOMAINS)
    with pytest.raises(ValueError, match=">= 0"):
        validate_proportions([1.2, -0.2, 0.0], DOMAINS)
    with pytest.raises(ValueError, match="3 domains"):
        validate_proportions([0.5, 0.5], DOMAINS)
    with pytest.raises(ValueError, match="multiple of world_size"):
        _loader(root, global_batch_size=30, world_size=4, rank=0)
    with pytest.raises(FileNotFoundError, match="domain 'wiki'"):
        build_train_dataloader(root, ["cc", "wiki"], [0.5, 0.5], G, SEQ, seed=0)
    with pytest.raises(ValueError, match="expected \\(32,\\)"):
        _loader(root, seq_len=32)
    s = DynamicBatchSampler(SIZES, [0.5, 0.3, 0.2], G, seed=1)
    next(iter(s))
    with pytest.raises(ValueError, match="already produced"):
        s.set_proportions([0.2, 0.3, 0.5], from_batch=0)
    other = DynamicBatchSampler(SIZES, [0.5, 0.3, 0.2], G, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(s.state_dict())


# ----------------------------------------------------------------------------- eval loader
def test_eval_loader_ranks_disjoint_and_deterministic(root):
    """53 rows on 2 ranks: rank r reads rows r, r + 2, ...; rank 1 ends with a repeat of row 0 so both
    run 27 rows (4 batches). Composer drops that repeat from the metrics (tests/test_multiprocess.py
    checks the resulting losses against a 1-rank eval and a brute-force one)."""
    n = 53  # github eval rows
    parts = []
    for r in range(2):
        dl = _track(build_eval_dataloader(root, "github", batch_size=8, seq_len=SEQ, rank=r, world_size=2,
                                          domain_index=1))
        batches = list(dl)
        assert len(batches) == len(dl) == 4  # 27 rows per rank, same batch count on every rank
        assert all(torch.all(b["domain"] == 1) for b in batches)
        parts.append([i for b in batches for _, i in _ident(b)])
        assert parts[-1] == [i for b in dl for _, i in _ident(b)]  # same order every time
    assert parts[0] == list(range(0, n, 2)) and parts[1] == list(range(1, n, 2)) + [0]
    assert sorted(parts[0] + parts[1][:-1]) == list(range(n))  # every row once, plus the one repeat


def test_remote_root_downloads_into_local_cache(root, tmp_path):
    """A remote root (here a plain folder, which Streaming copies from) is cached shard by shard."""
    local = iter(_loader(root))
    remote = iter(_loader(root, local_cache=tmp_path / "cache", num_workers=2))
    for _ in range(4):
        assert torch.equal(next(local)["input_ids"], next(remote)["input_ids"])
    assert any((tmp_path / "cache" / "train" / "cc").glob("shard.*.mds"))
    with pytest.raises(ValueError, match="local_cache"):
        build_train_dataloader("s3://bucket/data", DOMAINS, [0.5, 0.3, 0.2], G, SEQ)


@pytest.mark.parametrize("persistent", [False, True])
def test_new_iteration_does_not_skip_prefetched_batches(root, persistent):
    ref = [b["input_ids"] for b in _take(iter(_loader(root)), 12)]
    dl = _loader(root, num_workers=2, prefetch_factor=2, persistent_workers=persistent)
    got = _take(iter(dl), 5)
    assert dl.batch_sampler.next_batch == 9  # ran ahead
    got += _take(iter(dl), 7)  # e.g. a second fit(): restarts at batch 5, not 9
    assert all(torch.equal(x["input_ids"], y) for x, y in zip(got, ref))
