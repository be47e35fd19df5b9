"""`llmshearing demo`: the whole shearing pipeline, end to end, on CPU, with no network.

corpus (text already on this machine) -> tokenizer -> MDS shards -> train a small source model
-> prune it to a smaller target shape with dynamic batch loading -> cut (prune-export) ->
continued pre-training -> export to Hugging Face; plus a from-scratch model of the target shape
trained on as many tokens as pruning + continued pre-training used, as the baseline.

Domains (deterministic: files and distributions sorted by name, duplicates dropped):
  code  - Python source of the standard library
  legal - license texts shipped by the installed distributions
  prose - long descriptions (READMEs) in the installed distributions' metadata
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch


DOMAINS = ("code", "legal", "prose")
MARKER = ".llmshearing-demo"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoPlan:
    chars_per_domain: int
    vocab_size: int
    source_steps: int
    prune_steps: int
    cpt_steps: int
    eval_seqs_per_domain: int


# The source gets far more training than the pruning + continued pre-training budget, as a real
# pretrained source has (that is what shearing reuses).
FULL = DemoPlan(chars_per_domain=1_500_000, vocab_size=1024, source_steps=1000, prune_steps=200, cpt_steps=200,
                eval_seqs_per_domain=64)
QUICK = DemoPlan(chars_per_domain=500_000, vocab_size=1024, source_steps=300, prune_steps=60, cpt_steps=60,
                 eval_seqs_per_domain=16)


# ---- corpus ------------------------------------------------------------------------------------
def _dedup(docs: Iterator[str], min_chars: int = 200) -> Iterator[str]:
    seen: set[str] = set()
    for d in docs:
        d = d.strip()
        h = hashlib.sha1(" ".join(d.split()).encode()).hexdigest()
        if len(d) >= min_chars and h not in seen:
            seen.add(h)
            yield d


def _distributions() -> list[md.Distribution]:
    by_name = {}
    for d in md.distributions():
        name = (d.metadata.get("Name") or "").lower()
        if name and name not in by_name:
            by_name[name] = d
    return [by_name[k] for k in sorted(by_name)]


def code_docs() -> Iterator[str]:
    std = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(std.glob("*.py")):
        yield p.read_text(encoding="utf-8", errors="replace")


def legal_docs() -> Iterator[str]:
    for d in _distributions():
        for f in sorted(d.files or [], key=str):
            if any(k in f.name.upper() for k in ("LICENSE", "LICENCE", "COPYING")):
                try:
                    yield f.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue


def prose_docs() -> Iterator[str]:
    for d in _distributions():
        body = d.metadata.get_payload() if hasattr(d.metadata, "get_payload") else None
        body = body or d.metadata.get("Description") or ""
        if isinstance(body, str):
            yield body


SOURCES = {"code": code_docs, "legal": legal_docs, "prose": prose_docs}


def _pieces(text: str, size: int = 4000) -> Iterator[str]:
    """Split a long text at line boundaries into documents of about `size` characters, so that every
    domain has enough documents for a document-level train/eval split."""
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        n += len(line)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def build_corpus(raw_dir: Path, chars_per_domain: int) -> dict[str, dict[str, int]]:
    """Write raw/<domain>/docs.jsonl, capped at `chars_per_domain` characters per domain."""
    stats = {}
    for dom in DOMAINS:
        out = raw_dir / dom
        out.mkdir(parents=True, exist_ok=True)
        n, chars = 0, 0
        with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in _dedup(SOURCES[dom]()):
                for doc in list(_pieces(text))[:8]:  # no single source text dominates a domain
                    f.write(json.dumps({"text": doc}) + "\n")
                    n, chars = n + 1, chars + len(doc)
                if chars >= chars_per_domain:
                    break
        if n < 10:
            raise RuntimeError(f"demo corpus: only {n} '{dom}' documents found on this machine")
        stats[dom] = {"documents": n, "chars": chars}
    return stats


# ---- stages ------------------------------------------------------------------------------------
def _yaml(name: str) -> Path:
    p = REPO / "yamls" / "tiny" / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: the demo runs from a source checkout (pip install -e .)")
    return p


def _train(yaml_name: str, overrides: list[str], loggers=()):
    from llmshearing.config import load_config
    from llmshearing.train import build_trainer

    cfg = load_config(_yaml(yaml_name), overrides)
    trainer = build_trainer(cfg, extra_loggers=loggers)
    trainer.fit()
    return trainer, cfg


def _model_dir_from_trainer(trainer, out: Path) -> Path:
    from llmshearing.convert.checkpoint import save_model_dir

    m = trainer.state.model.model
    save_model_dir(m.state_dict(), m.config, out)
    return out


@torch.no_grad()
def evaluate(model, data_root: Path, seq_len: int, split: str = "eval") -> dict[str, float]:
    """Token-averaged next-token loss per domain over the whole eval split."""
    import torch.nn.functional as F

    from llmshearing.data.dynamic import build_eval_dataloader
    from llmshearing.models.composer_model import shift_targets

    model.eval()
    out = {}
    for dom in DOMAINS:
        dl = build_eval_dataloader(root=str(data_root), domain=dom, batch_size=16, seq_len=seq_len, rank=0,
                                   world_size=1, split=split)
        total, count = 0.0, 0
        for batch in dl:
            ids = batch["input_ids"]
            t = shift_targets(ids)
            logits = model(ids)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), t.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((t != -100).sum())
        out[dom] = total / max(count, 1)
    return out


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


def run_demo(out: str | Path = "demo_out", quick: bool = False, keep: bool = False) -> dict[str, Any]:
    from composer.loggers import InMemoryLogger

    from llmshearing.convert.checkpoint import load_model, save_model_dir
    from llmshearing.data.prep import prepare
    from llmshearing.data.tokenizer import train_tokenizer
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.pruning.export import export_pruned

    plan = QUICK if quick else FULL
    out = Path(out).resolve()
    _prepare_out(out, keep)
    t0 = time.time()
    torch.manual_seed(0)
    # Lock CPU threads so timings and results don't depend on the machine's core count.
    torch.set_num_threads(min(4, os.cpu_count() or 1))

    def step(msg: str) -> None:
        print(f"[demo {time.time() - t0:6.1f}s] {msg}", flush=True)

    step("1/8 building a corpus from text on this machine (stdlib code, licenses, package descriptions)")
    corpus = build_corpus(out / "raw", plan.chars_per_domain)
    step("    " + ", ".join(f"{d}: {s['documents']} docs / {s['chars']:,} chars" for d, s in corpus.items()))

    step("2/8 training a byte-level BPE tokenizer")
    texts = [json.loads(line)["text"] for dom in DOMAINS for line in open(out / "raw" / dom / "docs.jsonl")]
    tok_dir = Path(train_tokenizer(texts, vocab_size=plan.vocab_size, out_dir=out / "tokenizer"))

    step("3/8 tokenizing into MDS shards (train / eval per domain)")
    from llmshearing.config import build_model_config, load_config

    base = load_config(_yaml("prune.yaml"), ["data.root=x"])  # source shape and seq_len of the tiny yamls
    seq_len = base.data.seq_len
    data_root = out / "data"
    prepare({d: str(out / "raw" / d) for d in DOMAINS}, str(tok_dir), str(data_root), seq_len, eval_fraction=0.1,
            eval_sequences=plan.eval_seqs_per_domain, seed=0, workers=1, progress=False)

    # Composer's console logs off (each run's metrics are in runs/<stage>/logs-rank0.txt)
    common = [f"data.root={data_root}", "loggers.console=false", "autoresume=false"]

    step(f"4/8 training the source model ({plan.source_steps} steps)")
    init_dir = out / "models" / "source-init"
    src_model = LlamaForCausalLM(build_model_config(base))
    save_model_dir(src_model.state_dict(), src_model.config, init_dir)
    tr, _ = _train("cpt.yaml", common + [f"model.path={init_dir}", "run_name=source", f"save_folder={out}/runs/source",
                                          f"max_duration={plan.source_steps}ba", f"save_interval={plan.source_steps}ba",
                                          f"eval_interval={plan.source_steps}ba", "dynamic_loading=null"])
    src_dir = _model_dir_from_trainer(tr, out / "models" / "source")
    tr.close()
    source = load_model(src_dir)
    losses = {"source": evaluate(source, data_root, seq_len)}
    ref = [losses["source"][d] for d in DOMAINS]

    step(f"5/8 pruning {source.config.shape.summary()} -> target ({plan.prune_steps} steps, dynamic loading)")
    mem = InMemoryLogger()
    tr, pcfg = _train("prune.yaml", common + [
        f"model.path={src_dir}", "model.init=null", "run_name=prune", f"save_folder={out}/runs/prune",
        f"max_duration={plan.prune_steps}ba", f"save_interval={plan.prune_steps}ba",
        f"eval_interval={max(plan.prune_steps // 5, 1)}ba",
        # reference losses: the source model's own (the maintainers' suggestion when no scaling law is at hand)
        f"dynamic_loading.target_losses=[{','.join(f'{x:.4f}' for x in ref)}]",
    ], loggers=[mem])
    tr.close()
    plot_ok = _plot(mem, out / "pruning.png")

    step("6/8 cutting the masked model to the target shape (prune-export)")
    pruned_dir = out / "models" / "pruned"
    report = export_pruned(str(Path(pcfg.save_folder) / "latest-rank0.pt"), str(pruned_dir))
    pruned = load_model(pruned_dir)
    losses["pruned"] = evaluate(pruned, data_root, seq_len)

    step(f"7/8 continued pre-training of the cut model ({plan.cpt_steps} steps) and the from-scratch baseline")
    # the cut model dir carries the pruning run's final mixture: tiny/cpt.yaml starts from it (from_model)
    tr, ccfg = _train("cpt.yaml", common + [
        f"model.path={pruned_dir}", "run_name=cpt", f"save_folder={out}/runs/cpt", f"max_duration={plan.cpt_steps}ba",
        f"save_interval={plan.cpt_steps}ba", f"eval_interval={plan.cpt_steps}ba",
        f"dynamic_loading.target_losses=[{','.join(f'{x:.4f}' for x in ref)}]",
    ])
    cont_dir = _model_dir_from_trainer(tr, out / "models" / "continued")
    tr.close()
    continued = load_model(cont_dir)
    losses["continued"] = evaluate(continued, data_root, seq_len)

    scratch_steps = plan.prune_steps + plan.cpt_steps
    scratch_init = out / "models" / "scratch-init"
    torch.manual_seed(1)
    scratch_model = LlamaForCausalLM(pruned.config)
    save_model_dir(scratch_model.state_dict(), scratch_model.config, scratch_init)
    weights = [repr(w) for w in report["domain_weights"].values()]  # full precision: the config checks sum == 1
    tr, _ = _train("cpt.yaml", common + [
        f"model.path={scratch_init}", "run_name=scratch", f"save_folder={out}/runs/scratch",
        f"max_duration={scratch_steps}ba", f"save_interval={scratch_steps}ba", f"eval_interval={scratch_steps}ba",
        f"data.proportions=[{','.join(weights)}]", f"dynamic_loading.target_losses=[{','.join(f'{x:.4f}' for x in ref)}]",
    ])
    scratch_dir = _model_dir_from_trainer(tr, out / "models" / "scratch")
    tr.close()
    losses["scratch"] = evaluate(load_model(scratch_dir), data_root, seq_len)

    step("8/8 exporting the continued model to Hugging Face and checking its logits")
    from llmshearing.convert.hf import convert_composer_to_hf

    hf_dir = out / "hf"
    convert_composer_to_hf(str(Path(ccfg.save_folder) / "latest-rank0.pt"), str(hf_dir), tokenizer_dir=str(tok_dir))
    max_diff = _check_hf(hf_dir, continued)

    tokens = {"source": plan.source_steps, "pruned": plan.prune_steps, "continued": plan.cpt_steps,
              "scratch": scratch_steps}
    gbs = load_config(_yaml("cpt.yaml"), ["data.root=x", "model.path=x"]).global_train_batch_size
    tokens = {k: v * gbs * seq_len for k, v in tokens.items()}
    shapes = {"source": source.config.shape, "pruned": pruned.config.shape, "continued": continued.config.shape,
              "scratch": pruned.config.shape}
    result = {
        "out": str(out), "hf_dir": str(hf_dir), "plot": str(out / "pruning.png") if plot_ok else None,
        "losses": losses, "shapes": {k: s.to_dict() for k, s in shapes.items()},
        "params": {k: s.n_params() for k, s in shapes.items()}, "tokens": tokens, "prune_report": report,
        "final_domain_weights": report["domain_weights"], "hf_max_abs_logit_diff": max_diff,
        "seconds": round(time.time() - t0, 1), "corpus": corpus,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(format_table(result, shapes))
    return result


def _check_hf(hf_dir: Path, ours) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.shape.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((hf(ids).logits - ours.eval()(ids)).abs().max())


def format_table(r: dict[str, Any], shapes) -> str:
    from llmshearing.shape import format_params

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
    cont, scr = (sum(r["losses"][k].values()) / len(DOMAINS) for k in ("continued", "scratch"))
    lines += [
        "",
        "eval loss per domain (nats/token). 'tokens' = tokens trained in that stage "
        "(scratch gets pruning + continued pre-training tokens).",
        f"continued vs scratch (same target shape, scratch with at least as many tokens): "
        f"{cont:.3f} vs {scr:.3f} -> {'shearing wins' if cont < scr else 'scratch wins'}",
        "final domain weights after pruning: " + ", ".join(f"{k}={v:.3f}" for k, v in r["final_domain_weights"].items()),
        f"Hugging Face model: {r['hf_dir']} (max |logit diff| vs ours: {r['hf_max_abs_logit_diff']:.2e})",
        f"plot: {r['plot']}",
        f"total time: {r['seconds']:.0f}s",
    ]
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the tiny end-to-end shearing pipeline on CPU (no network)",
                              description=__doc__)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="fewer steps and less data (about a minute; for tests)")
    p.add_argument("--keep", action="store_true", help="reuse an existing demo folder instead of starting clean")
    p.set_defaults(func=lambda a: (run_demo(a.out, quick=a.quick, keep=a.keep), 0)[1])
