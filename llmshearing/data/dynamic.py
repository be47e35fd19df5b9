"""Dynamic multi-domain batch loading that works with DataLoader workers and resumes exactly.

Why this design: the reference drew domains inside an IterableDataset,
i.e. in the DataLoader *worker* processes, which never saw proportion updates made by the callback
in the main process, and checkpointed every used sample id. Here:

* `MixtureDataset` is a map-style view over ONE `StreamingDataset` with one `Stream` per domain
  (local or remote): `dataset[global_id]` -> {input_ids, domain}. Workers only fetch samples.
* `DynamicBatchSampler` (`data/sampler.py`) runs in the MAIN process (DataLoader pulls batch indices there). For global
  batch `b` it draws the domain of every sample with a generator seeded by (seed, b) under the
  proportions in effect for `b` -- identical on every rank without collectives -- then takes the
  next ids from per-domain seeded permutations (each pass over a domain is without replacement),
  and yields only this rank's contiguous slice of the global batch.
* Proportion changes apply from a batch index the caller names (the dynamic-loading callback: the
  batch right after the eval) and are recorded as a history [(from_batch, proportions)], so every
  rank and every resumed run switches at the same batch, whatever num_workers / prefetch_factor.
  Batches the workers prefetched under the old proportions are dropped and drawn again
  (`DynamicDataLoader`), so the switch never lands later than asked.
* The state is tiny: seed, batch index, per-domain cursor and pass, proportion history. The sampler
  runs ahead of training (prefetch), so `state_dict(num_samples)` rebuilds the cursors for the
  *consumed* batch count (snapshot of recent batches, or a replay of the domain draws).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llmshearing.data.manifest import check_manifest, load_manifest
from llmshearing.data.sampler import DynamicBatchSampler, validate_proportions
from llmshearing.data.shared_memory import release_shared_memory

# Streaming (and with it transformers, ~3.6 s measured on 2 busy cores) is imported where a dataset
# is built: the demo and reference-losses commands import this module, and so `llmshearing --help`.

log = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------
# Datasets over MDS shards
# -------------------------------------------------------------------------------------------

class MixtureDataset(Dataset):
    """Random access by global sample id into one StreamingDataset with a Stream per domain.

    Also the object Composer checkpoints (`state_dict(num_samples, from_beginning)` /
    `load_state_dict`): both are forwarded to the batch sampler that drives the loader.
    """

    def __init__(self, streaming_dataset: Any, domains: Sequence[str], seq_len: int,
                 domain_index: Sequence[int] | None = None, max_samples: int | None = None) -> None:
        self.sds = streaming_dataset
        self.domains = list(domains)
        self.seq_len = int(seq_len)
        self.offsets = np.asarray(streaming_dataset.sample_offset_per_stream, np.int64)
        self.sizes = np.asarray(streaming_dataset.samples_per_stream, np.int64)
        self.domain_index = list(domain_index) if domain_index is not None else list(range(len(self.domains)))
        self.sampler: DynamicBatchSampler | None = None
        total = int(self.sizes.sum())
        self.num_rows = total if max_samples is None else min(total, int(max_samples))

    def __len__(self) -> int:
        """Rows visible through this view: all of them, or the first `max_samples` (eval)."""
        return self.num_rows

    def __getitem__(self, gid: int) -> dict[str, Any]:
        gid = int(gid)
        tokens = np.asarray(self.sds.get_item(gid)["tokens"])
        stream = int(np.searchsorted(self.offsets, gid, side="right") - 1)
        if tokens.shape != (self.seq_len,):
            raise ValueError(f"domain '{self.domains[stream]}': sample {gid} has shape {tokens.shape}, "
                             f"expected ({self.seq_len},): data prepared with another seq_len?")
        return {"input_ids": torch.from_numpy(tokens.astype(np.int64)), "domain": self.domain_index[stream],
                "idx": gid}

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any] | None:
        if self.sampler is None:
            return None
        return self.sampler.state_dict(num_samples=num_samples, from_beginning=from_beginning)

    def load_state_dict(self, obj: Mapping[str, Any] | None) -> None:
        if obj is None or self.sampler is None:
            return
        self.sampler.load_state_dict(obj)

    def close(self) -> None:
        """Release Streaming's shared memory (see `release_shared_memory`); the dataset is unusable after."""
        if getattr(self, "sds", None) is not None:
            release_shared_memory(self.sds)
            self.sds = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sampler"] = None  # the sampler lives in the main process only
        return state


class DynamicDataLoader(DataLoader):
    """DataLoader that always delivers the batches the sampler's proportion history says.

    With workers the sampler runs `num_workers * prefetch_factor` batches ahead of the trainer.
    Every new iteration (a second `fit()`, a new epoch) restarts at the first batch not yet
    delivered, and so does a proportion change that reaches into the prefetched batches: they are
    dropped and drawn again under the new proportions once the trainer reaches them (the batches
    before the change are delivered from the prefetch as usual; with persistent workers the redraw
    re-primes the workers' queues, no process restarts). So a change requested for batch b is in
    effect from b, with 0 workers or 8.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.batch_sampler, DynamicBatchSampler):
            self.batch_sampler._managed = True

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        if not isinstance(sampler, DynamicBatchSampler):
            yield from super().__iter__()
            return
        while True:
            sampler.rewind_to_delivered()
            for batch in super().__iter__():
                sampler.mark_delivered()
                yield batch
                if sampler.stale:
                    log.debug("dynamic loader: proportions changed inside the prefetched batches; redrawing "
                              "from batch %d", sampler.delivered)
                    break
            else:
                return


def _domain_dirs(root: str, split: str, domains: Sequence[str],
                 local_cache: str | None) -> list[tuple[str, str | None]]:
    """(local, remote) per domain.

    Without `local_cache`, `root` is a local folder read in place. With it, `root` is a remote
    (s3://, gs://, ..., or another folder) whose shards Streaming downloads into `local_cache`.
    """
    out = []
    for d in domains:
        if local_cache is not None:
            out.append((os.path.join(local_cache, split, d), f"{str(root).rstrip('/')}/{split}/{d}"))
            continue
        if "://" in root:
            raise ValueError(f"root {root} is remote: give local_cache= (a local folder for downloaded shards)")
        local = os.path.join(str(root), split, d)
        if not os.path.isfile(os.path.join(local, "index.json")):
            raise FileNotFoundError(f"domain '{d}': no MDS data at {local} (missing index.json); "
                                    f"prepare it with `llmshearing prepare-data`")
        out.append((local, None))
    return out


def _streaming_dataset(dirs: Sequence[tuple[str, str | None]], batch_size: int,
                       cache_limit: str | int | None = None) -> Any:
    from streaming import Stream, StreamingDataset

    streams = [Stream(local=local, remote=remote) for local, remote in dirs]
    return StreamingDataset(streams=streams, batch_size=batch_size, shuffle=False, predownload=8 * batch_size,
                            cache_limit=cache_limit)


def _check_data(root: str, split: str, domains: Sequence[str], seq_len: int, vocab_size: int | None) -> None:
    """Refuse data whose manifest disagrees with the run (local roots; rows are also shape-checked)."""
    if not os.path.isdir(root):
        return
    manifest = load_manifest(root)
    if manifest is None:
        log.warning("no manifest.json under %s: cannot check tokenizer / seq_len of the data", root)
        return
    check_manifest(root, seq_len=seq_len, vocab_size=vocab_size, domains=domains, split=split,
                   allow_padded_vocab=True, manifest=manifest)


def _loader_kwargs(num_workers: int, prefetch_factor: int | None, persistent_workers: bool,
                   pin_memory: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_workers": int(num_workers), "pin_memory": pin_memory}
    if num_workers > 0:
        kw["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    return kw


def build_train_dataloader(
    root: str | os.PathLike,
    domains: Sequence[str],
    proportions: Sequence[float] | Mapping[str, float],
    global_batch_size: int,
    seq_len: int,
    seed: int = 17,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    on_exhausted: str = "stop",
    split: str = "train",
    *,
    prefetch_factor: int | None = None,
    persistent_workers: bool = True,
    pin_memory: bool = False,
    vocab_size: int | None = None,
    local_cache: str | os.PathLike | None = None,
    cache_limit: str | int | None = None,
) -> DataLoader:
    """DynamicDataLoader of {input_ids: LongTensor[B, seq_len], domain: LongTensor[B]}, B = G / world_size.

    The sampler is `loader.batch_sampler` (a `DynamicBatchSampler`); the dataset forwards
    Composer's `state_dict`/`load_state_dict` to it. The loader is infinite: give Composer a
    `max_duration` in batches/tokens/samples.
    """
    domains = [str(d) for d in domains]
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be a non-empty list of unique names, got {domains}")
    props = validate_proportions(proportions, domains)
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                         f"world_size ({world_size})")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    root = str(root)
    dirs = _domain_dirs(root, split, domains, None if local_cache is None else str(local_cache))
    _check_data(root, split, domains, seq_len, vocab_size)
    sds = _streaming_dataset(dirs, global_batch_size // world_size, cache_limit)
    ds = MixtureDataset(sds, domains, seq_len)
    sampler = DynamicBatchSampler(ds.sizes, props, global_batch_size, seed=seed, rank=rank, world_size=world_size,
                                  domains=domains, sample_offsets=ds.offsets, on_exhausted=on_exhausted)
    ds.sampler = sampler
    for d, off in zip(domains, ds.offsets):  # fail now, not in a worker, if rows have another length
        ds[int(off)]
    return DynamicDataLoader(ds, batch_sampler=sampler,
                             **_loader_kwargs(num_workers, prefetch_factor, persistent_workers, pin_memory))


def build_eval_dataloader(
    root: str | os.PathLike,
    domain: str,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "eval",
    num_workers: int = 0,
    *,
    domain_index: int = 0,
    max_samples: int | None = None,
    vocab_size: int | None = None,
    local_cache: str | os.PathLike | None = None,
    cache_limit: str | int | None = None,
) -> DataLoader:
    """One domain's first `max_samples` eval rows (default all), sharded over the ranks.

    The rows are dealt out by torch's `DistributedSampler` (rank r reads rows r, r + W, ...;
    no shuffle). When the row count does not divide by the world size, the sampler repeats rows
    so that every rank runs the same number of forwards (FSDP forwards are collective), and
    Composer's evaluation loop drops exactly those repeats from the metrics (it does so for a
    `DistributedSampler` with `drop_last=False` over a dataset of known length). So every row is
    evaluated once, whatever the world size. `domain` in the batches is `domain_index`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    root = str(root)
    dirs = _domain_dirs(root, split, [domain], None if local_cache is None else str(local_cache))
    _check_data(root, split, [domain], seq_len, vocab_size)
    sds = _streaming_dataset(dirs, batch_size, cache_limit)
    ds = MixtureDataset(sds, [domain], seq_len, domain_index=[domain_index], max_samples=max_samples)
    if len(ds) < 1:
        raise ValueError(f"eval data of domain '{domain}' has no rows")
    ds[0]  # shape check in the main process
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
    # batch_size= (not batch_sampler=) so Composer can read the eval microbatch size from the loader
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=False, num_workers=num_workers)


def find_dynamic_sampler(obj: Any) -> DynamicBatchSampler | None:
    """The DynamicBatchSampler behind a DataLoader / DataSpec / dataset, if any."""
    seen = 0
    while obj is not None and seen < 4:
        if isinstance(obj, DynamicBatchSampler):
            return obj
        bs = getattr(obj, "batch_sampler", None)
        if isinstance(bs, DynamicBatchSampler):
            return bs
        ds = getattr(obj, "dataset", None)
        if isinstance(getattr(ds, "sampler", None), DynamicBatchSampler):
            return ds.sampler
        obj = getattr(obj, "dataloader", None)
        seen += 1
    return None


__all__ = [
    "DynamicDataLoader",
    "MixtureDataset",
    "build_eval_dataloader",
    "build_train_dataloader",
    "find_dynamic_sampler",
]
