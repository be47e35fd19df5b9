"""The model card (`README.md`, Hugging Face front-matter conventions) of every model directory we export.

Once a folder leaves the run, its shape, source, token counts and data mixture are lost unless the
folder says them: the card records what the files alone cannot (where the weights came from, how many
tokens pruning and continued pre-training used, the final domain mixture, the per-domain eval losses
measured, the commands) and inherits the source's license when the source's own card names one.

Facts come from where the run left them: a Composer checkpoint (tokens from its timestamp, the mixture
from its loader state, the last eval losses from the dynamic-loading callback, the source from
ModelInfo) and the hand-over file (`domain_weights.json`) that prune-export leaves next to a cut model,
which carries the pruning run's facts on to continued pre-training. The parameter count comes from
ModelShape, the single authority.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from llmshearing.convert.checkpoint import ComposerCheckpoint, read_handover
from llmshearing.models.config import ARCHITECTURES, ModelConfig
from llmshearing.models.shape import ModelShape, format_params

CARD_NAME = "README.md"
TAG = "llmshearing"
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)
_HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


@dataclass
class CardFacts:
    """Everything a card says; None = not known (the card says so rather than guessing)."""

    config: ModelConfig
    source_model: str | None = None
    source_shape: ModelShape | None = None
    base_model: str | None = None  # a Hub id, when one is known
    license: str | None = None
    pruning_tokens: int | None = None
    cpt_tokens: int | None = None
    mixture: dict[str, float] | None = None
    mixture_note: str = "final domain weights"
    eval_losses: dict[str, float] | None = None
    eval_note: str = "per-domain eval loss"
    commands: list[str] = field(default_factory=list)
    extra_sections: dict[str, str] = field(default_factory=dict)  # title -> markdown (e.g. harness results)

    def with_(self, **kw: Any) -> "CardFacts":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def invocation(args: Any = None) -> str:
    """The command line as typed (`llmshearing prune-export ...`): the CLI's parsed `args` keep it."""
    argv = getattr(args, "command_line", None) or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return shlex.join(argv)


def read_front_matter(path: str | Path) -> dict[str, Any] | None:
    """The YAML front matter of a card (a README.md file, or a directory holding one), or None."""
    p = Path(path)
    p = p / CARD_NAME if p.is_dir() else p
    if not p.is_file():
        return None
    m = _FRONT.match(p.read_text(errors="replace"))
    if m is None:
        return None
    try:
        doc = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, dict) else None


def _source_dir(source: str | None) -> Path | None:
    if not source:
        return None
    p = Path(source)
    return p if p.is_dir() else (p.parent if p.is_file() else None)


def inherited(source: str | None) -> dict[str, Any]:
    """license and base_model from the source's card: its license if it names one; base_model is the
    source's own Hub id (from a Hub cache path), or what our own card in the source already names."""
    out: dict[str, Any] = {}
    d = _source_dir(source)
    fm = read_front_matter(d) if d is not None else None
    if fm:
        if isinstance(fm.get("license"), str):
            out["license"] = fm["license"]
        if TAG in (fm.get("tags") or []) and fm.get("base_model"):
            out["base_model"] = fm["base_model"]
    m = _HUB_CACHE.search(str(Path(source).resolve())) if source else None
    if m and "base_model" not in out:
        out["base_model"] = f"{m.group(1)}/{m.group(2)}"
    return out


def _final_mixture(loader_state: dict[str, Any] | None) -> dict[str, float] | None:
    if not loader_state or not loader_state.get("proportion_history") or not loader_state.get("domains"):
        return None
    return {str(d): float(w) for d, w in zip(loader_state["domains"], loader_state["proportion_history"][-1][1])}


def facts_from_handover(cfg: ModelConfig, model_dir: str | Path) -> CardFacts:
    """A cut model directory: the pruning run's facts that prune-export left in domain_weights.json."""
    doc = read_handover(model_dir) or {}
    src_shape = doc.get("source_shape")
    return CardFacts(
        config=cfg, source_model=doc.get("source_model"),
        source_shape=ModelShape.from_dict(src_shape) if isinstance(src_shape, dict) else None,
        base_model=doc.get("base_model"), license=doc.get("license"), pruning_tokens=doc.get("tokens"),
        mixture=doc.get("weights"), mixture_note="final domain weights of the pruning run",
        eval_losses=doc.get("eval_losses"),
        eval_note="per-domain eval loss of the masked model at the pruning run's last evaluation",
        commands=list(doc.get("commands") or []))


def facts_from_checkpoint(ck: ComposerCheckpoint, cfg: ModelConfig | None = None) -> CardFacts:
    """A Composer checkpoint: a pruning run's (cut to `cfg`), or a continued pre-training run's, whose
    model.path is the cut model directory and carries the pruning run's facts."""
    mixture = _final_mixture(ck.dataset_state)
    if ck.pruning:
        inh = inherited(ck.source_path)
        return CardFacts(config=cfg or ck.model_config, source_model=ck.source_path,
                         source_shape=ck.model_config.shape, pruning_tokens=ck.tokens, mixture=mixture,
                         mixture_note="final domain weights of the pruning run", eval_losses=ck.eval_losses,
                         eval_note="per-domain eval loss of the masked model at the pruning run's last evaluation",
                         **inh)
    f = facts_from_handover(ck.model_config, ck.source_path) if _source_dir(ck.source_path) else \
        CardFacts(config=ck.model_config)
    if f.source_model is None:  # not a cut model: the run's own model.path is the source
        f = f.with_(source_model=ck.source_path, **inherited(ck.source_path))
    f = f.with_(config=cfg or ck.model_config, cpt_tokens=ck.tokens)
    if mixture:
        f = f.with_(mixture=mixture, mixture_note="final domain weights of continued pre-training")
    if ck.eval_losses:
        f = f.with_(eval_losses=ck.eval_losses,
                    eval_note="per-domain eval loss at the last evaluation of continued pre-training")
    return f


def handover_facts(f: CardFacts) -> dict[str, Any]:
    """What a cut model's domain_weights.json keeps for the cards of the models made from it."""
    return {"tokens": f.pruning_tokens, "eval_losses": f.eval_losses, "license": f.license,
            "base_model": f.base_model, "commands": f.commands,
            "source_shape": f.source_shape.to_dict() if f.source_shape else None}


def _yaml_front(f: CardFacts) -> dict[str, Any]:
    fm: dict[str, Any] = {}
    if f.license:
        fm["license"] = f.license
    if f.base_model:
        fm["base_model"] = f.base_model
    fm.update(library_name="transformers", pipeline_tag="text-generation",
              tags=[TAG, "pruned", "structured-pruning", "sheared-llama", f.config.family])
    return fm


def _shape_rows(f: CardFacts) -> list[str]:
    s, src = f.config.shape, f.source_shape
    keys = [("hidden size (d_model)", "d_model"), ("attention heads", "n_heads"), ("KV heads", "n_kv_heads"),
            ("head dim", "head_dim"), ("layers", "n_layers"), ("MLP intermediate size", "intermediate_size"),
            ("vocabulary", "vocab_size"), ("tied embeddings", "tie_embeddings")]
    rows = ["| | source | this model |", "|---|---:|---:|"]
    for label, k in keys:
        rows.append(f"| {label} | {getattr(src, k) if src else '?'} | {getattr(s, k)} |")
    rows.append(f"| parameters | {f'{src.n_params():,}' if src else '?'} | {s.n_params():,} |")
    return rows


def _fmt_tokens(n: int | None) -> str:
    return "not recorded" if n is None else f"{n:,} ({format_params(n)})"


def render_card(f: CardFacts) -> str:
    """The whole README.md: YAML front matter, then the body."""
    s = f.config.shape
    lines = ["---", yaml.safe_dump(_yaml_front(f), sort_keys=False).rstrip(), "---", ""]
    name = f"{ARCHITECTURES[f.config.family]} sheared to {format_params(s.n_params())} parameters"
    lines += [f"# {name}", "",
              "Sheared with [llmshearing](https://github.com/princeton-nlp/LLM-Shearing)-style targeted structured "
              "pruning (learned masks on layers, heads, MLP channels and hidden dimensions, pruned to an exact "
              "target shape) and continued pre-training.", "",
              f"- source model: `{f.source_model or 'not recorded'}`",
              f"- license: {f.license or 'not stated (the source card names none)'}",
              f"- exact parameter count: **{s.n_params():,}** ({format_params(s.n_params())})",
              f"- target shape: {s.summary()}", "", "## Shape", "", *_shape_rows(f), "",
              "## Training tokens", "", "| stage | tokens |", "|---|---:|",
              f"| pruning | {_fmt_tokens(f.pruning_tokens)} |",
              f"| continued pre-training | {_fmt_tokens(f.cpt_tokens)} |", ""]
    lines += ["## Data mixture", ""]
    if f.mixture:
        lines += [f"{f.mixture_note}:", "", "| domain | weight |", "|---|---:|",
                  *(f"| {d} | {w:.4f} |" for d, w in f.mixture.items()), ""]
    else:
        lines += ["not recorded", ""]
    lines += ["## Evaluation", ""]
    if f.eval_losses:
        mean = sum(f.eval_losses.values()) / len(f.eval_losses)
        lines += [f"{f.eval_note} (nats/token):", "", "| domain | loss |", "|---|---:|",
                  *(f"| {d} | {v:.4f} |" for d, v in f.eval_losses.items()), f"| mean | {mean:.4f} |", ""]
    else:
        lines += ["no eval losses recorded", ""]
    for title, body in f.extra_sections.items():
        lines += [f"## {title}", "", body.rstrip(), ""]
    lines += ["## How it was made", ""]
    if f.commands:
        lines += ["```bash", *f.commands, "```", ""]
    lines += ["Recipe: `llmshearing convert hf-to-composer` (source) -> `composer train.py yamls/...prune.yaml` "
              "-> `llmshearing prune-export` -> `composer train.py yamls/...cpt.yaml` -> "
              "`llmshearing convert composer-to-hf` (see the llmshearing README).", ""]
    return "\n".join(lines)


def write_card(out_dir: str | Path, facts: CardFacts) -> Path:
    path = Path(out_dir) / CARD_NAME
    path.write_text(render_card(facts))
    return path
