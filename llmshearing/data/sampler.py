"""The dynamic batch sampler: which samples every global batch holds, under proportions that
change during training, identically on every rank, resumable from a few hundred bytes.

For global batch b the domain of every position is drawn with a generator seeded by (seed, b)
under the proportions in effect for b (a recorded history), so all ranks agree without
collectives; the ids come from per-domain seeded permutations (one pass = without replacement);
each rank yields its contiguous slice. See `llmshearing.data.dynamic` for the loader around it.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)

STATE_VERSION = 1
_DRAW_TAG = 1  # seed-sequence tags keep the draw and permutation streams apart
_PERM_TAG = 2
ON_EXHAUSTED = ("stop", "repeat")


class DomainExhaustedError(RuntimeError):
    """A domain ran out of samples with on_exhausted='stop'."""


def per_domain(values: Sequence[Any] | Mapping[str, Any] | np.ndarray, domains: Sequence[str], key: str) -> list[Any]:
    """One value per domain, in domain order, from a list or a {domain: value} mapping; errors name `key`."""
    if isinstance(values, Mapping):
        missing = [d for d in domains if d not in values]
        extra = sorted(set(values) - set(domains))
        if missing or extra:
            raise ValueError(f"{key}: missing domains {missing}, unknown domains {extra}")
        return [values[d] for d in domains]
    out = list(np.asarray(values).reshape(-1)) if isinstance(values, np.ndarray) else list(values)
    if len(out) != len(domains):
        raise ValueError(f"{key}: got {len(out)} values for {len(domains)} domains {list(domains)}")
    return out


def validate_proportions(proportions: Sequence[float] | Mapping[str, float] | np.ndarray,
                         domains: Sequence[str], tol: float = 1e-6) -> np.ndarray:
    """One non-negative weight per domain summing to 1 (within `tol`); returned renormalised in float64."""
    p = np.asarray(per_domain(proportions, domains, "proportions"), dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"proportions must be finite and >= 0, got {p.tolist()}")
    s = float(p.sum())
    if abs(s - 1.0) > tol:
        raise ValueError(f"proportions must sum to 1 (within {tol}), got sum={s!r} for {p.tolist()}")
    return p / s


class DynamicBatchSampler(DistributedSampler):
    """Yields this rank's global sample ids for each global batch; see the module docstring.

    A `DistributedSampler` because it is one: every rank yields only its own slice of each global
    batch. That is also what Composer's DataSpec checks (isinstance) before it accepts a loader in
    a multi-rank run. Nothing of `DistributedSampler.__init__` applies (no dataset length, no
    per-epoch shuffle), so only the attributes its users read are set; `set_epoch` is inherited
    and unused (the loader is one infinite epoch).

    Args:
        domain_sizes: samples per domain (one Stream each).
        proportions: initial domain weights (sum to 1).
        global_batch_size: samples per global batch (all ranks); divisible by `world_size`.
        seed: seeds the per-batch domain draws and the per-domain permutations.
        rank, world_size: this rank gets positions [rank*B, (rank+1)*B) of each global batch, B = G/W.
        domains: names (for messages and the state); default d0, d1, ...
        sample_offsets: global id of each domain's first sample; default cumulative sizes.
        on_exhausted: 'stop' raises DomainExhaustedError; 'repeat' starts a new seeded pass.
        snapshot_limit: cursor snapshots kept for recent batches (beyond it, state is replayed).
    """

    def __init__(self, domain_sizes: Sequence[int], proportions: Sequence[float] | Mapping[str, float],
                 global_batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 domains: Sequence[str] | None = None, sample_offsets: Sequence[int] | None = None,
                 on_exhausted: str = "stop", snapshot_limit: int = 1024) -> None:
        sizes = np.asarray(domain_sizes, dtype=np.int64).reshape(-1)
        if sizes.size == 0 or np.any(sizes <= 0):
            raise ValueError(f"every domain needs >= 1 sample, got sizes {sizes.tolist()}")
        self.domains = list(domains) if domains is not None else [f"d{i}" for i in range(sizes.size)]
        if len(self.domains) != sizes.size or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains {self.domains} must be unique, one per size {sizes.tolist()}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                             f"world_size ({world_size})")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sizes = sizes
        self.offsets = (np.asarray(sample_offsets, dtype=np.int64) if sample_offsets is not None
                        else np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
        self.global_batch_size = int(global_batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.device_batch_size = self.global_batch_size // self.world_size
        self.seed = int(seed)
        self.on_exhausted = on_exhausted
        self.snapshot_limit = int(snapshot_limit)
        self._managed = False  # set by DynamicDataLoader: it redraws stale prefetched batches
        # the DistributedSampler attributes (see the class docstring)
        self.dataset, self.num_replicas, self.epoch, self.shuffle, self.drop_last = None, self.world_size, 0, False, True
        self._history: list[tuple[int, np.ndarray]] = [(0, validate_proportions(proportions, self.domains))]
        self._reset_position(0, np.zeros(sizes.size, np.int64))

    # ---------------------------------------------------------------- position bookkeeping
    def _reset_position(self, batch: int, consumed: np.ndarray) -> None:
        self._next_batch = int(batch)
        self._delivered = int(batch)  # batches handed to the trainer (tracked by DynamicDataLoader)
        self._stale_from: int | None = None  # first produced batch drawn under since-changed proportions
        self._consumed = consumed.astype(np.int64).copy()  # samples drawn per domain before _next_batch
        self._base = (self._next_batch, self._consumed.copy())  # replay origin
        self._snapshots: OrderedDict[int, np.ndarray] = OrderedDict()
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def next_batch(self) -> int:
        """Index of the next global batch the sampler will produce."""
        return self._next_batch

    # ---------------------------------------------------------------- proportions
    @property
    def proportions(self) -> np.ndarray:
        """Latest proportions set (those in effect for batches at/after the last history entry)."""
        return self._history[-1][1].copy()

    @property
    def proportion_history(self) -> list[tuple[int, list[float]]]:
        return [(b, p.tolist()) for b, p in self._history]

    def proportions_at(self, batch: int) -> np.ndarray:
        i = bisect.bisect_right([b for b, _ in self._history], batch) - 1
        return self._history[max(i, 0)][1]

    def set_proportions(self, proportions: Sequence[float] | Mapping[str, float] | np.ndarray,
                        from_batch: int | None = None) -> int:
        """Use `proportions` from global batch `from_batch` on (default: the next batch the trainer
        gets; for a sampler iterated without `DynamicDataLoader`, the next batch it yields).

        Returns the batch index the change applies from. Entries scheduled at or after it are
        replaced. Under `DynamicDataLoader`, batches already produced for prefetching from
        `from_batch` on become stale (`stale`) and are drawn again before they are delivered;
        a bare sampler cannot take back what it yielded, so there `from_batch` >= the next batch.
        """
        p = validate_proportions(proportions, self.domains)
        floor = self._delivered if self._managed else self._next_batch
        b = floor if from_batch is None else int(from_batch)
        if b < floor:
            raise ValueError(f"cannot change proportions from batch {b}: batches up to {floor - 1} were already "
                             f"{'delivered' if self._managed else 'produced'}")
        self._history = [(fb, q) for fb, q in self._history if fb < b]
        if self._history and np.array_equal(self._history[-1][1], p):
            return b  # no change: keep the history short
        self._history.append((b, p))
        if b < self._next_batch:
            self._stale_from = b if self._stale_from is None else min(b, self._stale_from)
            for k in [k for k in self._snapshots if k > b]:  # they counted draws under the old proportions
                del self._snapshots[k]
        log.info("domain proportions from batch %d: %s", b,
                 ", ".join(f"{d}={w:.4f}" for d, w in zip(self.domains, p)))
        return b

    # ---------------------------------------------------------------- drawing
    def draw_domains(self, batch: int) -> np.ndarray:
        """Domain of every position of global batch `batch` (same on all ranks)."""
        rng = np.random.default_rng([self.seed, _DRAW_TAG, int(batch)])
        return rng.choice(self.sizes.size, size=self.global_batch_size, p=self.proportions_at(batch))

    def _perm(self, d: int, pass_idx: int) -> np.ndarray:
        key = (d, pass_idx)
        perm = self._perms.get(key)
        if perm is None:
            n = int(self.sizes[d])
            perm = np.random.default_rng([self.seed, _PERM_TAG, d, pass_idx]).permutation(n)
            perm = perm.astype(np.int32 if n < 2**31 else np.int64)
            for old in [k for k in self._perms if k[0] == d and k[1] < pass_idx - 1]:
                del self._perms[old]
            self._perms[key] = perm
        return perm

    def _produce(self) -> list[int]:
        b = self._next_batch
        doms = self.draw_domains(b)
        counts = np.bincount(doms, minlength=self.sizes.size)
        after = self._consumed + counts
        if self.on_exhausted == "stop":
            over = np.nonzero(after > self.sizes)[0]
            if over.size:
                d = int(over[0])
                raise DomainExhaustedError(
                    f"domain '{self.domains[d]}' is exhausted: it has {int(self.sizes[d])} samples, all used "
                    f"by batch {b} (which needs {int(counts[d])} more; {int(self._consumed[d])} used before). "
                    "Prepare more data for it or use on_exhausted='repeat'.")
        else:
            last_pass = (after - 1) // self.sizes  # pass of the last sample drawn in this batch
            started = (counts > 0) & (last_pass >= 1) & (last_pass * self.sizes >= self._consumed)
            for d in np.nonzero(started)[0]:
                log.info("domain %s: all %d samples used, starting pass %d (batch %d)",
                         self.domains[d], int(self.sizes[d]), int(last_pass[d]) + 1, b)
        # within-batch occurrence index of each position among positions of the same domain
        occ = np.empty(self.global_batch_size, np.int64)
        for d in np.nonzero(counts)[0]:
            where = np.nonzero(doms == d)[0]
            occ[where] = np.arange(where.size)
        lo, hi = self.rank * self.device_batch_size, (self.rank + 1) * self.device_batch_size
        ids = []
        for j in range(lo, hi):
            d = int(doms[j])
            t = int(self._consumed[d] + occ[j])
            n = int(self.sizes[d])
            ids.append(int(self.offsets[d]) + int(self._perm(d, t // n)[t % n]))
        self._snapshots[b] = self._consumed.copy()
        while len(self._snapshots) > self.snapshot_limit:
            self._snapshots.popitem(last=False)
        self._consumed = after
        self._next_batch = b + 1
        return ids

    def __iter__(self) -> Iterator[list[int]]:
        """Infinite: continues from the current position (set by `load_state_dict` for a resume)."""
        while True:
            yield self._produce()

    def __len__(self) -> int:
        # DistributedSampler has a length; this sampler has none (infinite). TypeError is what
        # `len()` of a length-less sampler raises, and what Composer and the DataLoader expect.
        raise TypeError("DynamicBatchSampler is infinite: give the trainer max_duration in batches")

    def seek(self, batch: int) -> None:
        """Move the position to global batch `batch` (>= where this sampler started or resumed)."""
        consumed = self._consumed_before(int(batch))
        self._next_batch, self._consumed = int(batch), consumed
        for b in [b for b in self._snapshots if b >= batch]:
            del self._snapshots[b]
        self._stale_from = None

    @property
    def stale(self) -> bool:
        """True when the next batch to deliver was produced ahead (prefetch) under proportions that
        have changed since; the ones before it are still valid."""
        return self._stale_from is not None and self._delivered >= self._stale_from

    @property
    def delivered(self) -> int:
        """Batches handed to the trainer so far (the index of the next one)."""
        return self._delivered

    def mark_delivered(self) -> None:
        self._delivered += 1

    def rewind_to_delivered(self) -> None:
        """Forget batches produced for prefetching but never delivered (before a new iteration)."""
        if self._delivered != self._next_batch or self._stale_from is not None:
            log.debug("dynamic sampler: rewinding from batch %d to delivered batch %d",
                      self._next_batch, self._delivered)
            self.seek(self._delivered)

    # ---------------------------------------------------------------- state
    def _consumed_before(self, batch: int) -> np.ndarray:
        """Per-domain samples drawn before global batch `batch` (snapshot, or replay of the draws)."""
        if batch == self._next_batch:
            return self._consumed.copy()
        if batch in self._snapshots:
            return self._snapshots[batch].copy()
        start, consumed = self._base
        if batch < start:
            raise ValueError(f"cannot reconstruct the loader state at batch {batch}: this sampler started "
                             f"(or was resumed) at batch {start}")
        known = [b for b in self._snapshots if b <= batch]
        if known:
            start = max(known)
            consumed = self._snapshots[start]
        consumed = consumed.copy()
        for b in range(start, batch):
            consumed += np.bincount(self.draw_domains(b), minlength=self.sizes.size)
        return consumed

    def state_dict(self, num_samples: int | None = None, from_beginning: bool = True,
                   consumed_batches: int | None = None) -> dict[str, Any]:
        """State after the CONSUMED batches (not what prefetching has produced).

        Composer passes `num_samples` = global samples consumed in the epoch (from_beginning=True).
        With from_beginning=False it counts from where this sampler started/resumed. Without
        arguments, the state after the batches produced so far is returned.
        """
        if consumed_batches is not None:
            k = int(consumed_batches)
        elif num_samples is not None:
            num_samples = int(num_samples)
            if num_samples % self.global_batch_size:
                raise ValueError(f"num_samples={num_samples} is not a whole number of global batches of "
                                 f"{self.global_batch_size}: is global_batch_size the trainer's?")
            k = num_samples // self.global_batch_size + (0 if from_beginning else self._base[0])
        else:
            k = self._next_batch
        consumed = self._consumed_before(k)
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "domains": list(self.domains),
            "domain_sizes": self.sizes.tolist(),
            "global_batch_size": self.global_batch_size,
            "batch_idx": k,
            "cursors": (consumed % self.sizes).tolist(),
            "passes": (consumed // self.sizes).tolist(),
            "proportion_history": [[b, p.tolist()] for b, p in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the checkpointed run's consumed batches ended (call before iterating)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported dynamic-loader state version {state.get('version')!r}")
        for key, mine in (("domains", self.domains), ("domain_sizes", self.sizes.tolist()),
                          ("global_batch_size", self.global_batch_size), ("seed", self.seed)):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data loader: checkpoint has {key}={state[key]}, "
                                 f"this run has {key}={mine}")
        hist = [(int(b), validate_proportions(p, self.domains)) for b, p in state["proportion_history"]]
        if not hist or hist[0][0] != 0 or any(b2 <= b1 for (b1, _), (b2, _) in zip(hist, hist[1:])):
            raise ValueError(f"invalid proportion_history in loader state: {state['proportion_history']}")
        consumed = (np.asarray(state["passes"], np.int64) * self.sizes
                    + np.asarray(state["cursors"], np.int64))
        self._history = hist
        self._reset_position(int(state["batch_idx"]), consumed)
