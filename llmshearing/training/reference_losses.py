"""`llmshearing reference-losses`: the per-domain reference losses dynamic batch loading steers by.

Sheared-LLaMA compares each domain's eval loss with a reference loss: what a model of the target
size "should" reach. The paper gets them from a per-domain scaling law fitted to a series of models
of one family (Llama-2 7B/13B/70B), L(N) = E + A / N^alpha, evaluated at the target's parameter
count; the maintainers note that the source model's own losses work about as well. Both are here:

    llmshearing reference-losses eval --data DATA [--rows 500] MODEL_DIR [MODEL_DIR ...]
        per-domain eval losses of each model (llmshearing or Hugging Face dirs) on the prepared eval
        shards, printed as yaml (paste one as dynamic_loading.target_losses, or feed them to `fit`)
    llmshearing reference-losses fit LOSSES.yaml --target-params 1.3e9
        the fit per domain over >= 3 sizes, and the predicted reference losses at the target size
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from llmshearing.convert.checkpoint import is_model_dir, load_model
from llmshearing.data.dynamic import build_eval_dataloader
from llmshearing.data.manifest import load_manifest
from llmshearing.models.losses import next_token_loss_sum

log = logging.getLogger(__name__)

MIN_SIZES = 3  # three constants per domain


# ------------------------------------------------------------------------------------------- fit
def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y ~ E + A x; returns (E, A, sum of squared residuals)."""
    m = np.stack([np.ones_like(x), x], axis=1)
    (e, a), *_ = np.linalg.lstsq(m, y, rcond=None)
    r = y - (e + a * x)
    return float(e), float(a), float(r @ r)


def fit_scaling_law(n_params: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Fit L(N) = E + A / N^alpha to (N, L) pairs; returns {'E', 'A', 'alpha', 'rss'}.

    For a fixed alpha the model is linear in (E, A), so the fit is a one-dimensional search over
    alpha (log-spaced grid, then golden-section refinement) of the least-squares residual. N is
    scaled by its smallest value inside the search, for conditioning; A is reported for raw N.
    """
    n = np.asarray(n_params, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"need one loss per model size, got {n.size} sizes and {y.size} losses")
    if n.size < MIN_SIZES:
        raise ValueError(f"the fit L(N) = E + A / N^alpha has 3 constants: give at least {MIN_SIZES} model sizes "
                         f"of one family (got {n.size}); with fewer, use a model's own losses (`eval`)")
    if len(set(n.tolist())) != n.size or np.any(n <= 0) or not np.all(np.isfinite(y)):
        raise ValueError(f"model sizes must be distinct and > 0 and losses finite, got {n.tolist()}, {y.tolist()}")
    order = np.argsort(n)
    n, y = n[order], y[order]
    if not np.all(np.diff(y) < 0):
        raise ValueError(f"losses must decrease with model size for this law, got {dict(zip(n.tolist(), y.tolist()))}")
    n0 = n[0]
    u = n / n0

    def rss(alpha: float) -> float:
        return _linear_fit(u ** -alpha, y)[2]

    grid = np.exp(np.linspace(math.log(1e-3), math.log(5.0), 400))
    i = int(np.argmin([rss(a) for a in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(200):
        if rss(c) < rss(d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    alpha = (a + b) / 2
    e, a_scaled, r = _linear_fit(u ** -alpha, y)
    return {"E": e, "A": float(a_scaled * n0 ** alpha), "alpha": float(alpha), "rss": r}


def predict(fit: dict[str, float], n_params: float) -> float:
    return fit["E"] + fit["A"] / float(n_params) ** fit["alpha"]


# ------------------------------------------------------------------------------------------ eval
def _load_any(model_dir: Path, dtype: torch.dtype, device: str):
    """(callable ids -> logits, n_params, kind) for an llmshearing or a Hugging Face model dir, on `device`."""
    if is_model_dir(model_dir):
        m = load_model(model_dir, dtype=dtype).eval().to(device)
        return m, m.config.shape.n_params(), "llmshearing"
    if (model_dir / "config.json").is_file():
        import transformers  # only for HF dirs; seconds to import, and this module loads with `llmshearing --help`

        m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval().to(device)
        return (lambda ids: m(ids).logits), sum(p.numel() for p in m.parameters()), "hf"
    raise FileNotFoundError(f"{model_dir}: neither an llmshearing model dir nor a Hugging Face model dir")


@torch.no_grad()
def domain_losses(forward: Callable[[torch.Tensor], torch.Tensor], data_root: str | Path, domains: Sequence[str],
                  seq_len: int, split: str = "eval", rows: int | None = None, batch_size: int = 16,
                  device: str = "cpu") -> dict[str, float]:
    """Token-mean next-token loss of `forward` (ids -> logits) per domain over the first `rows` rows of
    the split (all by default), on one process: the one eval loop of the demo, the benchmarks and this CLI."""
    out: dict[str, float] = {}
    for dom in domains:
        dl = build_eval_dataloader(data_root, dom, batch_size=batch_size, seq_len=seq_len, split=split,
                                   max_samples=rows)
        total, count = 0.0, 0
        for batch in dl:
            ids = batch["input_ids"].to(device)
            ce, n = next_token_loss_sum(forward(ids), ids)
            total, count = total + float(ce), count + int(n)
        dl.dataset.close()  # release Streaming's shared memory now, not at interpreter exit
        out[dom] = total / max(count, 1)
    return out


def eval_losses(model_dir: str | Path, data_root: str | Path, split: str = "eval", rows: int | None = None,
                batch_size: int = 8, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Token-mean next-token loss per domain of a model dir over the first `rows` eval rows (all by default)."""
    root = Path(data_root)
    manifest = load_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root}: no manifest.json (prepare the data with `llmshearing prepare-data`)")
    model, n_params, kind = _load_any(Path(model_dir), dtype, device)
    out = domain_losses(model, root, manifest["domains"], int(manifest["seq_len"]), split=split, rows=rows,
                        batch_size=batch_size, device=device)
    for dom, v in out.items():
        log.info("%s: %s %.4f", model_dir, dom, v)
    return {"model": str(model_dir), "kind": kind, "n_params": int(n_params), "losses": out}


# ------------------------------------------------------------------------------------------- CLI
def _run_eval(args: argparse.Namespace) -> int:
    results = [eval_losses(m, args.data, split=args.split, rows=args.rows, batch_size=args.batch_size,
                           device=args.device) for m in args.models]
    print(f"# per-domain eval loss (nats/token) on {args.data}/{args.split}"
          + (f", first {args.rows} rows per domain" if args.rows else ", all rows"))
    print("# paste `target_losses` under dynamic_loading:, or give this file to `reference-losses fit`")
    print(yaml.safe_dump({"models": [{"model": r["model"], "n_params": r["n_params"],
                                      "losses": {d: round(v, 4) for d, v in r["losses"].items()},
                                      "target_losses": [round(v, 4) for v in r["losses"].values()]}
                                     for r in results]}, sort_keys=False), end="")
    return 0


def _read_losses(path: str) -> tuple[list[float], dict[str, list[float]]]:
    """{'models': [{'n_params': N, 'losses': {domain: loss}}, ...]} (the `eval` output)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
        models = doc["models"]
        sizes = [float(m["n_params"]) for m in models]
        domains = list(models[0]["losses"])
        per = {d: [float(m["losses"][d]) for m in models] for d in domains}
    except (OSError, yaml.YAMLError, KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: expected the yaml `reference-losses eval` prints (models: [{{n_params, losses: "
                         f"{{domain: loss}}}}]): {type(e).__name__}: {e}") from e
    return sizes, per


def _run_fit(args: argparse.Namespace) -> int:
    sizes, per = _read_losses(args.losses)
    fits, target = {}, {}
    for d, ys in per.items():
        try:
            fits[d] = fit_scaling_law(sizes, ys)
        except ValueError as e:
            raise ValueError(f"domain '{d}': {e}") from None
        target[d] = predict(fits[d], args.target_params)
    print(f"# L(N) = E + A / N^alpha per domain, fitted to {len(sizes)} sizes {[f'{s:.4g}' for s in sizes]}; "
          f"predicted at N = {args.target_params:.4g}")
    print(yaml.safe_dump({"fits": {d: {k: float(f"{v:.6g}") for k, v in f.items()} for d, f in fits.items()},
                          "target_params": args.target_params,
                          "target_losses": [round(v, 4) for v in target.values()],
                          "domains": list(target)}, sort_keys=False), end="")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("reference-losses", help="per-domain reference losses for dynamic batch loading",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="how", required=True, metavar="{eval,fit}")
    e = sub.add_parser("eval", help="per-domain eval losses of models on prepared eval shards (yaml)")
    e.add_argument("models", nargs="+", help="llmshearing model dirs or Hugging Face model dirs")
    e.add_argument("--data", required=True, help="prepared data root (with manifest.json)")
    e.add_argument("--split", default="eval")
    e.add_argument("--rows", type=int, default=None, help="first N rows per domain (default: all)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.set_defaults(func=_run_eval)
    f = sub.add_parser("fit", help="fit L(N) = E + A / N^alpha per domain and predict at the target size")
    f.add_argument("losses", help="yaml printed by `reference-losses eval` for >= 3 sizes of one family")
    f.add_argument("--target-params", type=float, required=True, help="parameter count of the target model")
    f.set_defaults(func=_run_fit)
