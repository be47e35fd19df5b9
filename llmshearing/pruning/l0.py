"""L0Module: the learnable structure masks of one source shape pruned towards one target shape.

It owns, per mask type, the hard-concrete logits and the two Lagrange multipliers, and turns
them into (a) the `StructureMasks` the model applies and (b) the Lagrangian penalty that pulls
each mask type's expected sparsity onto its (warmed-up) target. It knows nothing about Composer;
a Composer callback (`PruningCallback`) glues it to the Trainer.

Sampling noise: every microbatch draws its own mask sample, from a private generator seeded with
hash(seed, step, microbatch index), not from the global RNG. The index counts the microbatches of
the whole global batch: rank r's j-th microbatch of the step is r * (microbatches per rank) + j
(the callback passes r * microbatches-per-rank to `set_step`). So ranks draw independent noise
(more samples per step, less variance in the mask gradients, as the reference's seed + rank), a
resumed run draws exactly the masks the uninterrupted run drew (Composer does not restore the
global RNG on a mid-epoch resume with a resumable dataset), and a run's samples depend on how the
global batch is cut into microbatches, not on how those are spread over ranks: 2 ranks x 1
microbatch and 1 rank x 2 microbatches draw the same masks for the same rows.
`seed=None` uses base seed 0 for the noise (and the global RNG for the init); pass the run's seed.

log_alpha range: clamped in place to [log 1e-2, log 1e2] after every optimizer step (`clamp_()`,
called by the callback), and additionally clamped *at use* with a straight-through gradient
(`hard_concrete.clamp_at_use`), so the values used always obey the spec even if a step was not
followed by `clamp_()` (e.g. under FSDP without original params).

Mask types and their composition: `mask_set.py`; expected size: `expected_size.py`; the penalty:
`lagrangian.py`; the optimizer's param groups: `param_groups.py`.

The `pruning` dict written into checkpoints (see `config_dict`):
    {'target': ModelShape.to_dict(), 'modules': [str, ...], 'lagrangian_warmup_steps': int,
     'eval_target_model': bool, 'init_mean': float}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmshearing.models.masks import StructureMasks
from llmshearing.models.shape import ModelShape
from llmshearing.pruning import expected_size
from llmshearing.pruning import hard_concrete as hc
from llmshearing.pruning import lagrangian as penalty
from llmshearing.pruning.mask_set import DEFAULT_MODULES, compose, mask_specs

log = logging.getLogger(__name__)

_CONFIG_KEYS = {"target", "modules", "lagrangian_warmup_steps", "eval_target_model", "init_mean"}


class L0Module(nn.Module):
    """Hard-concrete masks + Lagrange multipliers. `forward() -> (StructureMasks, lagrangian | None)`."""

    def __init__(self, source: ModelShape, target: ModelShape, modules: Sequence[str] = DEFAULT_MODULES,
                 lagrangian_warmup_steps: int = 0, eval_target_model: bool = False,
                 init_mean: float = hc.INIT_MEAN, seed: int | None = None) -> None:
        super().__init__()
        if lagrangian_warmup_steps < 0:
            raise ValueError(f"lagrangian_warmup_steps must be >= 0, got {lagrangian_warmup_steps}")
        self.source = source
        self.target = target
        self.modules_enabled = list(modules)
        self.lagrangian_warmup_steps = int(lagrangian_warmup_steps)
        self.eval_target_model = bool(eval_target_model)
        self.init_mean = float(init_mean)
        self.seed = seed
        self.specs = mask_specs(source, target, self.modules_enabled)
        for name, spec in self.specs.items():
            self.register_parameter(f"log_alpha_{name}", nn.Parameter(torch.empty(spec.shape, dtype=torch.float32)))
            # shape [1], not 0-d: FSDP rejects scalar parameters
            self.register_parameter(f"lambda_1_{name}", nn.Parameter(torch.zeros(1, dtype=torch.float32)))
            self.register_parameter(f"lambda_2_{name}", nn.Parameter(torch.zeros(1, dtype=torch.float32)))
        self.reset_parameters()
        self._step = 0  # completed training batches; set by the callback (not state: derived from the timestamp)
        self._forwards_in_step = 0  # training forwards (microbatches) since the last set_step
        self._first_microbatch = 0  # global index of this rank's first microbatch in the step
        self._generators: dict[torch.device, torch.Generator] = {}

    # ---- construction from / to the checkpoint's `pruning` dict -----------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "modules": list(self.modules_enabled),
            "lagrangian_warmup_steps": self.lagrangian_warmup_steps,
            "eval_target_model": self.eval_target_model,
            "init_mean": self.init_mean,
        }

    @classmethod
    def from_config_dict(cls, source: ModelShape, d: dict[str, Any], **overrides: Any) -> "L0Module":
        unknown = set(d) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown pruning config keys {sorted(unknown)}; valid: {sorted(_CONFIG_KEYS)}")
        if "target" not in d:
            raise ValueError("pruning config needs a 'target' shape")
        kw: dict[str, Any] = {k: v for k, v in d.items() if k != "target"}
        kw.update(overrides)
        target = d["target"] if isinstance(d["target"], ModelShape) else ModelShape.from_dict(dict(d["target"]))
        return cls(source, target, **kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Logits ~ N(init_mean, 0.01) clamped to range; multipliers 0 (also used for meta-device init)."""
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        for name, spec in self.specs.items():
            la = self.log_alpha(name)
            la.copy_(hc.init_log_alpha(spec.shape, self.init_mean, generator=gen).to(la.device))
            getattr(self, f"lambda_1_{name}").zero_()
            getattr(self, f"lambda_2_{name}").zero_()

    # ---- parameter access ----------------------------------------------------------------------
    @property
    def mask_types(self) -> list[str]:
        return list(self.specs)

    def log_alpha(self, name: str) -> nn.Parameter:
        return getattr(self, f"log_alpha_{name}")

    def lambdas(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"lambda_1_{name}"), getattr(self, f"lambda_2_{name}")

    def log_alpha_params(self) -> list[nn.Parameter]:
        return [self.log_alpha(n) for n in self.specs]

    def lambda_params(self) -> list[nn.Parameter]:
        return [p for n in self.specs for p in self.lambdas(n)]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every log_alpha in place to the spec's range (call after each optimizer step)."""
        for p in self.log_alpha_params():
            p.clamp_(hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX)

    def set_step(self, step: int, first_microbatch: int = 0) -> None:
        """Current training step (completed batches), which drives the sparsity warm-up, and the
        global index of this rank's first microbatch in it; both key the sampling noise."""
        self._step = int(step)
        self._forwards_in_step = 0
        self._first_microbatch = int(first_microbatch)

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, step, global microbatch index): host-side only, no sync."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        key = (0 if self.seed is None else int(self.seed), self._step, self._first_microbatch + self._forwards_in_step)
        gen.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)  # int-tuple hashes are process-independent
        self._forwards_in_step += 1
        return gen

    @property
    def step(self) -> int:
        return self._step

    # ---- masks -------------------------------------------------------------------------------
    def forward(self) -> tuple[StructureMasks, torch.Tensor | None]:
        if self.training:
            gen = self._noise_generator(self.log_alpha(next(iter(self.specs))).device)
            zs = {n: hc.sample(hc.clamp_at_use(self.log_alpha(n)), generator=gen) for n in self.specs}
            return self._compose(zs), self.lagrangian()
        return self.deterministic_masks(self.eval_target_model), None

    @torch.no_grad()
    def deterministic_masks(self, target: bool) -> StructureMasks:
        """Eval/cut masks: soft scores with exactly the target count kept per row (`target=True`,
        gives the target shape) or round(expected count) per row (the "current expected" model).

        For a source with tied embeddings the hidden mask is hard 0/1: its soft values would have to
        be folded into the embedding (the residual stream starts as E[ids] * z) but not into lm_head
        (the final norm already carries z), which a shared matrix cannot do, so the cut would have to
        untie it (+ vocab x d_model parameters). With kept dims at 1 the cut keeps the tie and exactly
        the target's parameter count; the evaluations use the same hard mask, so they see the model
        the cut produces."""
        zs = {}
        for n, spec in self.specs.items():
            la = hc.clamp_at_use(self.log_alpha(n))
            zs[n] = hc.deterministic(la, spec.n_keep if target else hc.expected_n_keep(la))
        if "hidden" in zs and self.source.tie_embeddings:
            zs["hidden"] = (zs["hidden"] > 0).to(zs["hidden"].dtype)
        return self._compose(zs)

    def _compose(self, zs: dict[str, torch.Tensor]) -> StructureMasks:
        return compose(self.source, zs)

    # ---- expected size and sparsity -------------------------------------------------------------
    def probs(self) -> dict[str, torch.Tensor]:
        """P(z != 0) per unit of every mask type (fp32, differentiable)."""
        return {n: hc.prob_nonzero(hc.clamp_at_use(self.log_alpha(n))) for n in self.specs}

    def expected_params(self, probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Expected remaining prunable parameters (0-d float64; see `expected_size.expected_params`)."""
        return expected_size.expected_params(self.source, self.probs() if probs is None else probs)

    def expected_sparsity(self, probs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per mask type 1 - mean P(z != 0) (mean over rows and units), plus 'overall' =
        1 - expected_params / source prunable params."""
        p = self.probs() if probs is None else probs
        out = {n: 1 - v.mean() for n, v in p.items()}
        out["overall"] = (1 - self.expected_params(p) / self.source.n_prunable_params()).float()
        return out

    def target_sparsity(self, step: int | None = None) -> dict[str, float]:
        """Per mask type: t_m * min(1, step / lagrangian_warmup_steps), t_m = 1 - kept_T / size."""
        return penalty.target_sparsity(self.specs, self._step if step is None else step,
                                          self.lagrangian_warmup_steps)

    def lagrangian(self, step: int | None = None, rows: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The penalty (`lagrangian.lagrangian`) at `step`; `rows`: the `expected_sparsity_per_row()` a
        caller already has."""
        rows = self.expected_sparsity_per_row() if rows is None else rows
        return penalty.lagrangian(rows, self.target_sparsity(step), {n: self.lambdas(n) for n in self.specs})

    def expected_sparsity_per_row(self, probs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return expected_size.expected_sparsity_per_row(self.specs, self.probs() if probs is None else probs)

    @torch.no_grad()
    def stats(self, step: int | None = None) -> dict[str, float]:
        """Floats for logging (host syncs: call outside forward). Keys: expected_sparsity/<type>,
        expected_sparsity_range/<type> (max - min over rows, types with several rows),
        target_sparsity/<type> (warmed-up value at `step`), lambda_1/<type>, lambda_2/<type>,
        expected_sparsity/overall, target_sparsity/overall (final, not warmed up: the overall size is
        not constrained directly), expected_params, target_params, lagrangian."""
        probs = self.probs()
        es = self.expected_sparsity(probs)
        rows = self.expected_sparsity_per_row(probs)
        ts = self.target_sparsity(step)
        out: dict[str, float] = {}
        for n in self.specs:
            l1, l2 = self.lambdas(n)
            out[f"expected_sparsity/{n}"] = float(es[n])
            if rows[n].numel() > 1:  # how far the layers (groups) have drifted apart
                out[f"expected_sparsity_range/{n}"] = float(rows[n].max() - rows[n].min())
            out[f"target_sparsity/{n}"] = ts[n]
            out[f"lambda_1/{n}"] = float(l1.sum())
            out[f"lambda_2/{n}"] = float(l2.sum())
        out["expected_sparsity/overall"] = float(es["overall"])
        out["target_sparsity/overall"] = 1 - self.target.n_prunable_params() / self.source.n_prunable_params()
        out["expected_params"] = float(self.expected_params(probs))
        out["target_params"] = float(self.target.n_prunable_params())
        out["lagrangian"] = float(self.lagrangian(step, rows))
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}{list(s.shape)}->keep {s.n_keep}/row" for n, s in self.specs.items())


def unwrap_l0(module: nn.Module) -> "L0Module":
    """The L0Module behind FSDP / DDP wrappers (`.module`)."""
    m = module
    while not isinstance(m, L0Module) and hasattr(m, "module"):
        m = m.module
    if not isinstance(m, L0Module):
        raise TypeError(f"expected an L0Module (possibly wrapped), got {type(module).__name__}")
    return m


__all__ = ["L0Module", "unwrap_l0"]
