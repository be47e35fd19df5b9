"""How to recover a cut model: continued pre-training recipes compared at equal tokens. Prints JSON.

On the artifacts of a demo run (its cut model, its source as the teacher, its data and reference
losses), each recipe continues the same cut model for the same number of batches:

    lm_doremi          LM loss, DoReMi mixing against the source's own eval losses (the paper's recipe)
    kd_teacher_gap     distillation from the source + teacher-gap mixing
    kd_constant        distillation from the source, the pruning run's final mixture kept fixed
    lm_stratified      LM loss, the domains' token shares kept fixed (the baseline to beat)

and the demo's from-scratch model of the same shape (trained on the pipeline's tokens) stands
beside them. Per domain: eval loss and the gap to the teacher (the source); plus the step time
with and without the teacher and the teacher's weight bytes (what distillation costs).

    llmshearing demo --out demo_out --compare      # runs this after the demo
    python -m llmshearing.demo.recovery demo_out [--steps N] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from composer.core import Callback

from llmshearing.convert.checkpoint import load_model
from llmshearing.demo.corpus import DOMAINS
from llmshearing.demo.stages import (
    evaluate,
    model_dir_from_trainer,
    target_losses,
    train,
)

RECIPES: dict[str, list[str]] = {
    "lm_doremi": [],
    "kd_teacher_gap": ["distill={alpha: 0.5, temperature: 1.0}", "dynamic_loading.update=teacher_gap"],
    "kd_constant": ["distill={alpha: 0.5, temperature: 1.0}", "dynamic_loading.update=constant"],
    "lm_stratified": ["dynamic_loading.update=stratified"],
}


class _StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def batch_start(self, state, logger) -> None:
        self._t = time.perf_counter()

    def batch_end(self, state, logger) -> None:
        self.times.append(time.perf_counter() - self._t)


def compare(demo_out: str | Path, steps: int | None = None) -> dict[str, Any]:
    root = Path(demo_out).resolve()
    res = json.loads((root / "results.json").read_text())
    steps = steps or res["steps"]["continued"]
    data, seq_len = root / "data", json.loads((root / "data" / "manifest.json").read_text())["seq_len"]
    ref = target_losses([res["losses"]["source"][d] for d in DOMAINS])  # the source's own losses
    teacher = root / "models" / "source"
    out: dict[str, Any] = {"demo_out": str(root), "steps": steps, "teacher": str(teacher), "recipes": {}}
    for name, extra in RECIPES.items():
        timer = _StepTimer()
        tr, _ = train("cpt.yaml", [
            f"data.root={data}", "loggers.console=false", "autoresume=false", f"model.path={root / 'models' / 'pruned'}",
            f"run_name=recover-{name}", f"save_folder={root}/runs/recover-{name}", f"max_duration={steps}ba",
            f"save_interval={steps}ba", f"eval_interval={max(steps // 4, 1)}ba", ref,
            *(e.replace("distill={", f"distill={{teacher: {teacher}, ") for e in extra),
        ], callbacks=[timer])
        model_dir = model_dir_from_trainer(tr, root / "models" / f"recover-{name}")
        tr.close()
        losses = evaluate(load_model(model_dir), data, seq_len)
        out["recipes"][name] = {"losses": losses, "mean": statistics.fmean(losses.values()),
                                "step_s": statistics.median(timer.times[1:] or timer.times)}
    out["recipes"]["scratch"] = {"losses": res["losses"]["scratch"], "mean": statistics.fmean(res["losses"]["scratch"].values()),
                                 "tokens": res["tokens"]["scratch"]}
    teacher_losses = res["losses"]["source"]
    for r in out["recipes"].values():
        r["gap_to_teacher"] = {d: r["losses"][d] - teacher_losses[d] for d in DOMAINS}
    src = load_model(teacher, weights=False).config.shape
    lm_s, kd_s = out["recipes"]["lm_doremi"]["step_s"], out["recipes"]["kd_constant"]["step_s"]
    out["cost"] = {"step_s_without_teacher": lm_s, "step_s_with_teacher": kd_s, "ratio": kd_s / lm_s,
                   "teacher_fp32_bytes": src.n_params() * 4}
    out["teacher_losses"] = teacher_losses
    return out


def format_comparison(r: dict[str, Any]) -> str:
    lines = [f"{'recipe':<16}" + "".join(f"{d:>8}" for d in DOMAINS) + f"{'mean':>8}  gap to teacher (mean)"]
    for name, v in r["recipes"].items():
        gap = statistics.fmean(v["gap_to_teacher"].values())
        lines.append(f"{name:<16}" + "".join(f"{v['losses'][d]:8.3f}" for d in DOMAINS) + f"{v['mean']:8.3f}  {gap:+.3f}")
    lines.append(f"{'teacher':<16}" + "".join(f"{r['teacher_losses'][d]:8.3f}" for d in DOMAINS)
                 + f"{statistics.fmean(r['teacher_losses'].values()):8.3f}")
    c = r["cost"]
    lines.append(f"step time {c['step_s_without_teacher']:.3f} s without the teacher, {c['step_s_with_teacher']:.3f} s "
                 f"with it (x{c['ratio']:.2f}); teacher weights {c['teacher_fp32_bytes'] / 2**20:.1f} MiB fp32")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["recipes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(DOMAINS))], [r["recipes"][n]["gap_to_teacher"][d] for d in DOMAINS],
               width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(DOMAINS))], DOMAINS)
    ax.set(ylabel="eval loss - teacher's (nats/token)", title="recovery of the cut model, equal tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out")
    ap.add_argument("--steps", type=int, default=None, help="batches per recipe (default: the demo's CPT steps)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    r = compare(a.demo_out, a.steps)
    plot(r, Path(a.demo_out) / "recovery.png")
    text = json.dumps(r, indent=1)
    print(text)
    print(format_comparison(r), file=sys.stderr)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
