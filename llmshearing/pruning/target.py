"""Checks that a target shape can be cut from a source shape with the enabled pruning modules.

Run before anything is built or trained, so that an impossible target fails in a second with a
message naming the dimension, instead of after hours of pruning (or silently, as in the
reference where a dimension without its module was simply not pruned).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from llmshearing.models.shape import ModelShape, ShapeError

log = logging.getLogger(__name__)

#: pruning module -> the ModelShape dimensions it can shrink
MODULE_DIMS: dict[str, tuple[str, ...]] = {
    "layer": ("n_layers",),
    "head": ("n_heads", "n_kv_heads"),
    "intermediate": ("intermediate_size",),
    "hidden": ("d_model",),
}
VALID_MODULES: tuple[str, ...] = tuple(MODULE_DIMS)


def validate_target(source: ModelShape, target: ModelShape, modules: Iterable[str]) -> None:
    """Raise ShapeError if `target` cannot be obtained from `source` by pruning `modules`.

    Warns (logging) for an enabled module whose dimensions already equal the source's: no mask
    is created for it.
    """
    modules = list(modules)
    unknown = [m for m in modules if m not in MODULE_DIMS]
    if unknown:
        raise ShapeError(f"unknown pruning module(s) {unknown}; valid modules: {list(VALID_MODULES)}")
    if len(set(modules)) != len(modules):
        raise ShapeError(f"pruning modules {modules} contain duplicates")

    # ModelShape already enforces this at construction; re-checked for clarity of the message.
    if target.n_heads % target.n_kv_heads:
        raise ShapeError(f"target n_heads ({target.n_heads}) must be divisible by target n_kv_heads "
                         f"({target.n_kv_heads})")
    if target.vocab_size != source.vocab_size:
        raise ShapeError(f"target vocab_size ({target.vocab_size}) differs from the source's "
                         f"({source.vocab_size}); the vocabulary cannot be pruned")
    if target.head_dim != source.head_dim:
        raise ShapeError(f"target head_dim ({target.head_dim}) differs from the source's ({source.head_dim}); "
                         "head_dim cannot be pruned (prune whole heads instead)")
    if target.qkv_bias != source.qkv_bias:
        raise ShapeError(f"target qkv_bias ({target.qkv_bias}) differs from the source's ({source.qkv_bias}); "
                         "pruning cannot add or remove projection biases")

    for dims in MODULE_DIMS.values():
        for dim in dims:
            s, t = getattr(source, dim), getattr(target, dim)
            if t > s:
                raise ShapeError(f"target {dim} ({t}) is larger than the source's ({s}); pruning only shrinks")

    if target.group_size > source.group_size:
        raise ShapeError(
            f"target has {target.group_size} query heads per KV group (n_heads/n_kv_heads = "
            f"{target.n_heads}/{target.n_kv_heads}) but the source has only {source.group_size}; "
            "head pruning keeps whole KV groups and drops query heads within groups, it cannot regroup heads")

    for module, dims in MODULE_DIMS.items():
        changed = [d for d in dims if getattr(source, d) != getattr(target, d)]
        if changed and module not in modules:
            what = ", ".join(f"{d} {getattr(source, d)} -> {getattr(target, d)}" for d in changed)
            raise ShapeError(f"target changes {what} but pruning module '{module}' is not enabled "
                             f"(enabled: {modules}); add '{module}' or keep the source's value")
        if not changed and module in modules:
            log.warning("pruning module '%s' is enabled but the target keeps %s unchanged; no mask is created for it",
                        module, ", ".join(f"{d}={getattr(source, d)}" for d in dims))
