"""Targets given as a parameter budget: `pruning.target: {params: 1.3e9}` or `{params_fraction: 0.4}`
resolved to a concrete ModelShape by one documented rule, so nobody hand-writes a shape that is not
what they meant (the reference's issues #52, #74).

The rule (`resolve_budget`):
1. budget B = `params`, or `params_fraction` x the source's parameter count (all parameters:
   embeddings, norms and lm_head included, as `ModelShape.n_params`).
2. Other target keys given next to the budget (e.g. `n_layers: 24`) are kept as given; every other
   dimension not pruned by an enabled module stays the source's. n_layers stays the source's unless
   given (dropping layers is the user's call).
3. One width factor a in (0, 1] scales the source's proportions: d_model = a * d rounded to a multiple
   of `dim_multiple(d)` (64; 8 for sources narrower than 512); query heads = the GQA-valid count
   n_kv' x group' (n_kv' <= n_kv, group' <= group) nearest a * n_heads, ties to the pair closest to the
   source's KV/group proportions, then to more KV groups; intermediate = a * F to the same multiple.
   a is the largest factor (bisection) whose shape has <= B parameters.
4. The MLP width then takes up the rounding of the others: intermediate = the multiple of the step that
   brings the exact count nearest B (the count is linear in it). Hence the stated rounding:
   |n_params - B| <= n_layers * params_per_channel * step / 2 (half a step of MLP channels over all
   layers; e.g. 7.9M for Llama-2-7B -> 2.7B, 0.3% of the budget), or a ShapeError if no width fits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from llmshearing.models.shape import ModelShape, ShapeError

log = logging.getLogger(__name__)

BUDGET_KEYS: tuple[str, ...] = ("params", "params_fraction")


def is_budget(target: dict[str, Any]) -> bool:
    return any(k in target for k in BUDGET_KEYS)


def dim_multiple(source_width: int) -> int:
    """Rounding step of d_model and the MLP width: 64 (tensor-core and kernel friendly), 8 for toy models."""
    return 64 if source_width >= 512 else 8


def budget_params(source: ModelShape, target: dict[str, Any]) -> int:
    given = [k for k in BUDGET_KEYS if k in target]
    if len(given) != 1:
        raise ShapeError(f"give one budget key of {list(BUDGET_KEYS)}, got {given}")
    if "params" in target:
        b = float(target["params"])
    else:
        f = float(target["params_fraction"])
        if not 0 < f < 1:
            raise ShapeError(f"params_fraction must be in (0, 1), got {f}")
        b = f * source.n_params()
    if not 0 < b < source.n_params():
        raise ShapeError(f"a budget of {b:,.0f} parameters is not below the source's {source.n_params():,}")
    return int(round(b))


def _round(x: float, step: int, hi: int) -> int:
    return int(min(hi, max(step, round(x / step) * step)))


def _heads(source: ModelShape, a: float) -> tuple[int, int]:
    """(n_heads, n_kv_heads): the valid GQA pair nearest a * n_heads (see the module docstring)."""
    K, G = source.n_kv_heads, source.group_size
    want = a * source.n_heads
    pairs = [(k, g) for k in range(1, K + 1) for g in range(1, G + 1)]
    k, g = min(pairs, key=lambda p: (abs(p[0] * p[1] - want), abs(p[0] / K - p[1] / G), -p[0]))
    return k * g, k


def resolve_budget(source: ModelShape, target: dict[str, Any],
                   modules: Iterable[str] = ("layer", "head", "intermediate", "hidden")) -> ModelShape:
    """The concrete target shape of a budget (see the module docstring)."""
    modules = list(modules)
    b = budget_params(source, target)
    fixed = {k: v for k, v in target.items() if k not in BUDGET_KEYS}
    unknown = set(fixed) - set(source.to_dict())
    if unknown:
        raise ShapeError(f"unknown target keys {sorted(unknown)}; valid: {sorted(source.to_dict())} or a budget "
                         f"{list(BUDGET_KEYS)}")
    if "intermediate" not in modules or "intermediate_size" in fixed:
        raise ShapeError("a parameter budget needs the 'intermediate' module and a free intermediate_size: the MLP "
                         "width takes up the rounding of the other dimensions")
    step = dim_multiple(source.d_model)
    base = source.replace(**fixed)

    def shape(a: float) -> ModelShape:
        kw: dict[str, Any] = {"intermediate_size": _round(a * source.intermediate_size, step,
                                                          source.intermediate_size)}
        if "hidden" in modules and "d_model" not in fixed:
            kw["d_model"] = _round(a * source.d_model, step, source.d_model)
        if "head" in modules and not {"n_heads", "n_kv_heads"} & set(fixed):
            kw["n_heads"], kw["n_kv_heads"] = _heads(source, a)
        return base.replace(**kw)

    lo, hi = 0.0, 1.0
    if shape(lo).n_params() > b:
        raise ShapeError(f"a budget of {b:,} parameters is below the smallest shape this rule makes "
                         f"({shape(lo).summary()}); give a larger budget or an explicit target")
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shape(mid).n_params() <= b else (lo, mid)
    s = shape(lo)
    # the MLP width takes up the rounding: count = c0 + slope * F, linear in F
    slope = s.n_layers * s.params_per_channel()
    c0 = s.replace(intermediate_size=step).n_params() - slope * step
    f = round((b - c0) / slope / step) * step
    if not step <= f <= source.intermediate_size:
        raise ShapeError(f"no MLP width (multiple of {step} up to {source.intermediate_size}) brings {s.summary()} "
                         f"to {b:,} parameters; give an explicit target")
    s = s.replace(intermediate_size=int(f))
    tol = tolerance(s, source.d_model)
    if abs(s.n_params() - b) > tol:  # cannot happen by construction; a guard for the stated promise
        raise ShapeError(f"resolved {s.summary()} is {s.n_params() - b:+,} from the budget {b:,} (> {tol:,})")
    return s


def tolerance(shape: ModelShape, source_width: int | None = None) -> int:
    """The stated rounding of a resolved budget: half a step of MLP channels over all layers."""
    step = dim_multiple(source_width if source_width is not None else shape.d_model)
    return int(shape.n_layers * shape.params_per_channel() * step / 2)


def resolve_target(source: ModelShape, target: dict[str, Any],
                   modules: Iterable[str] = ("layer", "head", "intermediate", "hidden")) -> ModelShape:
    """Target ModelShape of a target dict: a budget by the rule above, or explicit ModelShape keys
    (keys not given copy the source: vocab, head_dim, tie flag, biases)."""
    target = dict(target)
    if is_budget(target):
        return resolve_budget(source, target, modules)
    d = source.to_dict()
    unknown = set(target) - set(d)
    if unknown:
        raise ShapeError(f"unknown target keys {sorted(unknown)}; valid: {sorted(d)} or a budget {list(BUDGET_KEYS)}")
    d.update(target)
    return ModelShape.from_dict(d)


def describe(source: ModelShape, target: dict[str, Any], shape: ModelShape) -> str:
    """One line for the run's log: the budget, the shape it resolved to, its exact parameter count."""
    b = budget_params(source, target)
    return (f"pruning target from the budget {b:,} parameters ({b / source.n_params():.1%} of the source): "
            f"{shape.summary()} -> exactly {shape.n_params():,} parameters ({shape.n_params() - b:+,} vs the budget, "
            f"{shape.n_params() / source.n_params():.1%} of the source)")
