"""`llmshearing demo`: the whole shearing pipeline, end to end, on CPU, with no network.

corpus (text already on this machine) -> tokenizer -> MDS shards -> train a small source model
-> prune it to a smaller target shape with dynamic batch loading -> cut (prune-export) ->
continued pre-training -> export to Hugging Face; plus a from-scratch model of the target shape
trained on as many tokens as pruning + continued pre-training used, as the baseline.

The corpus (three domains of text every Python installation has) is built by `demo_corpus.py`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llmshearing.convert.checkpoint import load_model, save_model_dir
from llmshearing.data.prep import prepare
from llmshearing.data.tokenizer import train_tokenizer
from llmshearing.demo.corpus import DOMAINS, build_corpus
from llmshearing.demo.plan import DemoPlan, Run
from llmshearing.demo.real import REAL_FULL, REAL_QUICK, stage_real_source
from llmshearing.demo.stages import (
    evaluate,
    model_dir_from_trainer,
    target_losses,
    train,
    yaml_path,
)
from llmshearing.models.llama import LlamaForCausalLM
from llmshearing.models.shape import format_params
from llmshearing.pruning.export import export_pruned

# Composer (through llmshearing.training.config / .train) and transformers' models are imported inside the
# functions that use them: this module is imported by `llmshearing --help` and every sub-command
# (it registers `demo`), and those imports cost seconds (measured: `import llmshearing.training.trainer` ~4 s
# on 2 cores, against ~1.5 s for the whole `llmshearing --help`).

MARKER = ".llmshearing-demo"


# The source gets far more training than the pruning + continued pre-training budget, as a real
# pretrained source has (that is what shearing reuses).
FULL = DemoPlan(chars_per_domain=1_500_000, vocab_size=1024, source_steps=1000, prune_steps=200, cpt_steps=200,
                eval_seqs_per_domain=64)
QUICK = DemoPlan(chars_per_domain=500_000, vocab_size=1024, source_steps=300, prune_steps=60, cpt_steps=60,
                 eval_seqs_per_domain=16)
def _plot(mem_logger, path: Path) -> bool:
    """Domain weights and expected sparsity over pruning steps, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    data = mem_logger.data
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in data if k.startswith("data/weight/")):
        xs = [t.batch.value for t, _ in data[key]]
        axes[0].plot(xs, [float(v) for _, v in data[key]], label=key.split("/")[-1])
    axes[0].set(title="domain weights (dynamic batch loading)", xlabel="pruning step", ylabel="proportion")
    axes[0].legend()
    for key in sorted(k for k in data if k.startswith("pruning/expected_sparsity/")):
        xs = [t.batch.value for t, _ in data[key]]
        line, = axes[1].plot(xs, [float(v) for _, v in data[key]], label=key.split("/")[-1])
        tkey = key.replace("expected_sparsity", "target_sparsity")
        if tkey in data:
            axes[1].plot([t.batch.value for t, _ in data[tkey]], [float(v) for _, v in data[tkey]], "--",
                         color=line.get_color(), alpha=0.6)
    axes[1].set(title="expected (solid) vs target (dashed) sparsity", xlabel="pruning step", ylabel="sparsity")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _prepare_out(out: Path, keep: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ValueError(f"{out} exists, is not empty and was not made by the demo; choose another --out")
        if not keep:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `llmshearing demo`; safe to delete\n")


def _stage_data(r: Run, tok_dir: Path | None = None) -> tuple[dict[str, dict[str, int]], Path]:
    """1-3: corpus, tokenizer (trained here unless the source brings one), MDS shards."""
    r.step("1/8 building a corpus from text on this machine (stdlib code, licenses, package descriptions)")
    corpus = build_corpus(r.out / "raw", r.plan.chars_per_domain)
    r.step("    " + ", ".join(f"{d}: {s['documents']} docs / {s['chars']:,} chars" for d, s in corpus.items()))
    if tok_dir is None:
        r.step("2/8 training a byte-level BPE tokenizer")
        texts = [json.loads(line)["text"] for dom in DOMAINS for line in open(r.out / "raw" / dom / "docs.jsonl")]
        tok_dir = Path(train_tokenizer(texts, vocab_size=r.plan.vocab_size, out_dir=r.out / "tokenizer"))
    else:
        r.step(f"2/8 using the source's tokenizer ({tok_dir})")
    r.step("3/8 tokenizing into MDS shards (train / eval per domain)")
    r.seq_len = _tiny_config("prune.yaml", r.plan.overrides).data.seq_len
    r.data_root = r.out / "data"
    prepare({d: str(r.out / "raw" / d) for d in DOMAINS}, str(tok_dir), str(r.data_root), r.seq_len,
            eval_fraction=0.1, eval_sequences=r.plan.eval_seqs_per_domain, seed=0, workers=1, progress=False)
    # Composer's console logs off (each run's metrics are in runs/<stage>/logs-rank0.txt)
    r.common = (f"data.root={r.data_root}", "loggers.console=false", "autoresume=false", *r.plan.overrides)
    return corpus, tok_dir


def _stage_source(r: Run) -> Path:
    """4: a source model trained well beyond the pruning + continued pre-training budget, as a real
    pretrained source is."""
    from llmshearing.training.config import build_model_config

    r.step(f"4/8 training the source model ({r.plan.source_steps} steps)")
    init_dir = r.out / "models" / "source-init"
    m = LlamaForCausalLM(build_model_config(_tiny_config("prune.yaml")))
    save_model_dir(m.state_dict(), m.config, init_dir)
    n = r.plan.source_steps
    tr, _ = train("cpt.yaml", [*r.common, f"model.path={init_dir}", "run_name=source", f"save_folder={r.out}/runs/source",
                                f"max_duration={n}ba", f"save_interval={n}ba", f"eval_interval={n}ba",
                                "dynamic_loading=null", "data.proportions=[0.34,0.33,0.33]", "eval_first=false"])
    src_dir = model_dir_from_trainer(tr, r.out / "models" / "source")
    tr.close()
    return src_dir


def _stage_prune(r: Run, src_dir: Path, ref: list[float]) -> tuple[Path, bool]:
    """5: pruning with dynamic batch loading; returns the checkpoint and whether the plot was made."""
    from composer.loggers import InMemoryLogger

    n = r.plan.prune_steps
    r.step(f"5/8 pruning {load_model(src_dir, weights=False).config.shape.summary()} -> target ({n} steps, "
           "dynamic loading)")
    mem = InMemoryLogger()
    tr, pcfg = train("prune.yaml", [
        *r.common, f"model.path={src_dir}", "model.init=null", "run_name=prune", f"save_folder={r.out}/runs/prune",
        f"max_duration={n}ba", f"save_interval={n}ba", f"eval_interval={max(n // 5, 1)}ba",
        # reference losses: the source model's own (the maintainers' suggestion when no scaling law is at hand)
        target_losses(ref), *r.prune_extra,
    ], loggers=[mem])
    tr.close()
    r.prune_init = pcfg.pruning.init.value
    return Path(pcfg.save_folder) / "latest-rank0.pt", _plot(mem, r.out / "pruning.png")


def _stage_continue(r: Run, pruned_dir: Path, ref: list[float], weights: dict[str, float]) -> tuple[Path, Path, Path]:
    """7: continued pre-training of the cut model, and the from-scratch baseline of the same shape
    on the pruning + continued pre-training token budget. Returns (CPT checkpoint, CPT model dir,
    scratch model dir)."""
    n = r.plan.cpt_steps
    r.step(f"7/8 continued pre-training of the cut model ({n} steps) and the from-scratch baseline")
    # the cut model dir carries the pruning run's final mixture: tiny/cpt.yaml starts from it (from_model)
    tr, ccfg = train("cpt.yaml", [*r.common, f"model.path={pruned_dir}", "run_name=cpt",
                                   f"save_folder={r.out}/runs/cpt", f"max_duration={n}ba", f"save_interval={n}ba",
                                   f"eval_interval={n}ba", target_losses(ref)])
    cont_dir = model_dir_from_trainer(tr, r.out / "models" / "continued")
    tr.close()
    scratch_steps = r.plan.prune_steps + n
    scratch_init = r.out / "models" / "scratch-init"
    torch.manual_seed(1)
    m = LlamaForCausalLM(load_model(pruned_dir, weights=False).config)
    save_model_dir(m.state_dict(), m.config, scratch_init)
    props = ",".join(repr(w) for w in weights.values())  # full precision: the config checks sum == 1
    tr, _ = train("cpt.yaml", [*r.common, f"model.path={scratch_init}", "run_name=scratch",
                                f"save_folder={r.out}/runs/scratch", f"max_duration={scratch_steps}ba",
                                f"save_interval={scratch_steps}ba", f"eval_interval={scratch_steps}ba",
                                f"data.proportions=[{props}]", target_losses(ref)])
    scratch_dir = model_dir_from_trainer(tr, r.out / "models" / "scratch")
    tr.close()
    return Path(ccfg.save_folder) / "latest-rank0.pt", cont_dir, scratch_dir


def _tiny_config(name: str, overrides: tuple[str, ...] = ()):
    """A tiny yaml as loaded with placeholder paths (for its shapes and batch sizes)."""
    from llmshearing.training.config import load_config

    paths = ["data.root=x", "model.path=x"] if name == "cpt.yaml" else ["data.root=x"]
    return load_config(yaml_path(name), paths + list(overrides))


def run_demo(out: str | Path = "demo_out", quick: bool = False, keep: bool = False,
             source: str | Path | None = None) -> dict[str, Any]:
    """The toy pipeline, or with `source` (a GGUF file, HF dir or our model dir, with its tokenizer)
    the same stages on a real pretrained model."""
    from llmshearing.convert.hf import convert_composer_to_hf

    out = Path(out).resolve()
    _prepare_out(out, keep)
    if source is None:
        plan = QUICK if quick else FULL
    else:
        plan = REAL_QUICK if quick else REAL_FULL
    r = Run(out=out, plan=plan, t0=time.time())
    torch.manual_seed(0)
    # Lock CPU threads so timings and results don't depend on the machine's core count.
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    if source is None:
        corpus, tok_dir = _stage_data(r)
        models = {"source": _stage_source(r)}
    else:
        models = {"source": stage_real_source(r, Path(source))}
        corpus, tok_dir = _stage_data(r, models["source"])
    losses = {"source": evaluate(load_model(models["source"]), r.data_root, r.seq_len)}
    ref = [losses["source"][d] for d in DOMAINS]
    prune_ckpt, plot_ok = _stage_prune(r, models["source"], ref)

    r.step("6/8 cutting the masked model to the target shape (prune-export)")
    models["pruned"] = out / "models" / "pruned"
    report = export_pruned(str(prune_ckpt), str(models["pruned"]))
    losses["pruned"] = evaluate(load_model(models["pruned"]), r.data_root, r.seq_len)

    cpt_ckpt, models["continued"], models["scratch"] = _stage_continue(r, models["pruned"], ref,
                                                                       report["domain_weights"])
    for k in ("continued", "scratch"):
        losses[k] = evaluate(load_model(models[k]), r.data_root, r.seq_len)

    r.step("8/8 exporting the continued model to Hugging Face and checking its logits")
    hf_dir = out / "hf"
    convert_composer_to_hf(str(cpt_ckpt), str(hf_dir), tokenizer_dir=str(tok_dir))
    max_diff = _check_hf(hf_dir, load_model(models["continued"]))
    harness = _stage_harness(r, hf_dir, models["scratch"], tok_dir)
    _write_demo_card(cpt_ckpt, hf_dir, losses["continued"], harness)

    steps = {"source": r.plan.source_steps, "pruned": r.plan.prune_steps, "continued": r.plan.cpt_steps,
             "scratch": r.plan.prune_steps + r.plan.cpt_steps}
    gbs = _tiny_config("cpt.yaml", r.plan.overrides).global_train_batch_size
    shapes = {k: load_model(d, weights=False).config.shape for k, d in models.items()}
    result = {
        "out": str(out), "hf_dir": str(hf_dir), "plot": str(out / "pruning.png") if plot_ok else None,
        "losses": losses, "shapes": {k: s.to_dict() for k, s in shapes.items()},
        "params": {k: s.n_params() for k, s in shapes.items()},
        "tokens": {k: v * gbs * r.seq_len for k, v in steps.items()}, "steps": steps, "prune_report": report,
        "final_domain_weights": report["domain_weights"], "hf_max_abs_logit_diff": max_diff, "harness": harness,
        "seconds": round(time.time() - r.t0, 1), "corpus": corpus, "prune_init": r.prune_init,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(format_table(result, shapes))
    return result


def _stage_harness(r: Run, hf_dir: Path, scratch_dir: Path, tok_dir: Path) -> dict[str, Any] | None:
    """lm-evaluation-harness (the paper's evaluation tool) on the continued model and the scratch baseline,
    on two small tasks built from the demo corpus; None when the harness (the eval extra) is not installed."""
    try:
        import lm_eval  # noqa: F401 - only to know it is there (the eval extra)
    except ImportError:  # pragma: no cover - lm-eval is in the dev extra
        r.step("    (lm-evaluation-harness not installed: pip install -e '.[eval]')")
        return None
    from llmshearing.evaluation.harness import compare
    from llmshearing.evaluation.local_tasks import write_local_tasks

    r.step("    lm-evaluation-harness on local tasks from the corpus: continued vs scratch")
    from llmshearing.convert.hf import convert_composer_to_hf

    scratch_hf = r.out / "hf-scratch"
    convert_composer_to_hf(str(scratch_dir), str(scratch_hf), tokenizer_dir=str(tok_dir))
    tasks = write_local_tasks(r.out / "raw", r.out / "tasks", list(DOMAINS), mc_per_domain=16, ppl_per_domain=8)
    with _quiet() as captured:
        try:
            return compare({"continued": hf_dir, "scratch": scratch_hf}, tasks, include_path=[r.out / "tasks"])
        except Exception:
            sys.stderr.write(captured.getvalue()[-4000:])  # the harness's own output, for the traceback
            raise


@contextlib.contextmanager
def _quiet():
    """The harness's progress bars (tqdm, `datasets`) would bury the demo's table: stderr is captured for the
    stage (tqdm looks sys.stderr up when a bar starts); the results are printed in the table."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield buf


def _write_demo_card(cpt_ckpt: Path, hf_dir: Path, losses: dict[str, float], harness: dict[str, Any] | None) -> None:
    """The export's card with the demo's own measurements: losses on the whole eval split, the harness table."""
    from llmshearing.convert.checkpoint import read_composer_checkpoint
    from llmshearing.convert.model_card import facts_from_checkpoint, invocation, write_card

    facts = facts_from_checkpoint(read_composer_checkpoint(cpt_ckpt))
    extra = {}
    if harness is not None:
        from llmshearing.evaluation.harness import format_table

        extra["lm-evaluation-harness (local tasks from the demo corpus)"] = f"```\n{format_table(harness)}\n```"
    write_card(hf_dir, facts.with_(eval_losses=losses, eval_note="per-domain eval loss on the whole eval split",
                                   commands=[invocation()], extra_sections=extra))


def _check_hf(hf_dir: Path, ours) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.shape.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((hf(ids).logits - ours.eval()(ids)).abs().max())


def format_table(r: dict[str, Any], shapes) -> str:

    rows = [("source", "trained from scratch"), ("pruned", "cut to target (no training after the cut)"),
            ("continued", "pruned + continued pre-training"), ("scratch", "target shape from scratch (baseline)")]
    head = f"{'model':<10} {'shape (d/heads/kv/layers/ffn)':<30} {'params':>8} {'tokens':>8} " + " ".join(
        f"{d:>7}" for d in DOMAINS) + f" {'mean':>7}"
    lines = ["", head, "-" * len(head)]
    for name, _ in rows:
        s = shapes[name]
        ls = r["losses"][name]
        dims = f"{s.d_model}/{s.n_heads}/{s.n_kv_heads}/{s.n_layers}/{s.intermediate_size}"
        lines.append(f"{name:<10} {dims:<30} {format_params(s.n_params()):>8} {format_params(r['tokens'][name]):>8} "
                     + " ".join(f"{ls[d]:7.3f}" for d in DOMAINS) + f" {sum(ls.values()) / len(ls):7.3f}")
    cont, scr, cut = (sum(r["losses"][k].values()) / len(DOMAINS) for k in ("continued", "scratch", "pruned"))
    init = {"scores": "importance scores (pruning.init=scores)", "uniform": "the uniform init (pruning.init=uniform)"}
    lines += [
        "",
        "eval loss per domain (nats/token). 'tokens' = tokens trained in that stage "
        "(scratch gets pruning + continued pre-training tokens).",
        f"masks started from {init.get(r['prune_init'], r['prune_init'])}; mean loss right after the cut: {cut:.3f}",
        f"continued vs scratch (same target shape, scratch with at least as many tokens): "
        f"{cont:.3f} vs {scr:.3f} -> {'shearing wins' if cont < scr else 'scratch wins'}",
        "final domain weights after pruning: " + ", ".join(f"{k}={v:.3f}" for k, v in r["final_domain_weights"].items()),
        f"Hugging Face model: {r['hf_dir']} (max |logit diff| vs ours: {r['hf_max_abs_logit_diff']:.2e})",
        *_harness_lines(r.get("harness")),
        f"plot: {r['plot']}",
        f"total time: {r['seconds']:.0f}s",
    ]
    return "\n".join(lines)


def _harness_lines(h: dict[str, Any] | None) -> list[str]:
    if h is None:
        return []
    from llmshearing.evaluation.harness import format_table

    return ["", "lm-evaluation-harness, local tasks from the corpus (llmshearing evaluate; acc: higher is better, "
            "perplexity: lower):", format_table(h), ""]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the tiny end-to-end shearing pipeline on CPU (no network)",
                              description=__doc__)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="fewer steps and less data (about a minute; for tests)")
    p.add_argument("--keep", action="store_true", help="reuse an existing demo folder instead of starting clean")
    p.add_argument("--source", default=None, metavar="MODEL",
                   help="shear a real pretrained model instead of the toy one: a GGUF file, a Hugging Face dir or "
                        "an llmshearing model dir, with its tokenizer (--quick: ~10 min on CPU for a 135M model)")
    p.add_argument("--compare", action="store_true",
                   help="then compare recovery recipes on the cut model at equal tokens (LM + DoReMi, distillation + "
                        "teacher-gap mixing, distillation + constant mixture, LM + stratified; see llmshearing.demo.recovery)")
    p.set_defaults(func=_run_cli)


def _run_cli(a) -> int:
    run_demo(a.out, quick=a.quick, keep=a.keep, source=a.source)
    if a.compare:
        from llmshearing.demo.recovery import compare, format_comparison, plot

        r = compare(a.out)
        plot(r, Path(a.out) / "recovery.png")
        (Path(a.out) / "recovery.json").write_text(json.dumps(r, indent=1) + "\n")
        print("\nrecovery of the cut model at equal tokens (eval loss per domain, nats/token):")
        print(format_comparison(r))
    return 0
