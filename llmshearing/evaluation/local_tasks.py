"""Two small lm-evaluation-harness tasks built from a local corpus (`raw/<domain>/docs.jsonl`, what
`prepare-data` reads and the demo builds), in the harness's own task YAML format, so the harness runs
offline (dataset_path: json on local files) on the demo's models and in the tests.

    llmshearing_mc    multiple choice: a document's opening (context), its true next ~48 characters
                      against the same span of three documents of the other domains; acc / acc_norm
    llmshearing_ppl   document perplexity (loglikelihood_rolling) of document openings of every domain;
                      word_perplexity / byte_perplexity / bits_per_byte, as the harness's wikitext task

Both are deterministic in `seed`. Contexts end without whitespace and every choice starts with the
document's own next character, so the harness's context/continuation split is the plain one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MC_TASK, PPL_TASK = "llmshearing_mc", "llmshearing_ppl"
CONTEXT_CHARS, CHOICE_CHARS, PPL_CHARS = 160, 48, 400

_MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_PPL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _docs(raw_root: Path, domain: str, min_chars: int) -> list[str]:
    path = raw_root / domain / "docs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected raw/<domain>/docs.jsonl, as prepare-data reads)")
    out = []
    with open(path) as f:
        for line in f:
            t = json.loads(line).get("text", "")
            if len(t) >= min_chars:
                out.append(t)
    return out


def _split(text: str) -> tuple[str, str]:
    """(context, rest): the context cut at CONTEXT_CHARS, trailing whitespace moved to the rest."""
    ctx = text[:CONTEXT_CHARS]
    stripped = ctx.rstrip()
    return stripped, text[len(stripped):]


def mc_items(raw_root: Path, domains: list[str], per_domain: int, seed: int = 0) -> list[dict]:
    """{'context', 'choices', 'label', 'domain'} items; distractors are other domains' spans."""
    rng = random.Random(seed)
    need = CONTEXT_CHARS + CHOICE_CHARS + 8
    docs = {d: _docs(raw_root, d, need) for d in domains}
    for d, ds in docs.items():
        if len(ds) < per_domain:
            raise ValueError(f"{raw_root / d}: {len(ds)} documents of >= {need} characters, {per_domain} needed")
    items = []
    for d in domains:
        for text in rng.sample(docs[d], per_domain):
            ctx, rest = _split(text)
            others = [t for o in domains if o != d for t in docs[o]]
            choices = [rest[:CHOICE_CHARS]]
            choices += [_split(t)[1][:CHOICE_CHARS] for t in rng.sample(others, 3)]
            order = list(range(4))
            rng.shuffle(order)
            items.append({"context": ctx, "choices": [choices[i] for i in order], "label": order.index(0),
                          "domain": d})
    return items


def ppl_docs(raw_root: Path, domains: list[str], per_domain: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for d in domains:
        docs = _docs(raw_root, d, PPL_CHARS)
        for text in rng.sample(docs, min(per_domain, len(docs))):
            out.append({"text": text[:PPL_CHARS].rstrip(), "domain": d})
    return out


def write_local_tasks(raw_root: str | Path, out_dir: str | Path, domains: list[str], mc_per_domain: int = 16,
                      ppl_per_domain: int = 8, seed: int = 0) -> list[str]:
    """Write both tasks (data + YAML) into `out_dir` (the harness's include path); returns the task names."""
    raw_root, out = Path(raw_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, tmpl in ((MC_TASK, mc_items(raw_root, domains, mc_per_domain, seed), _MC_YAML),
                             (PPL_TASK, ppl_docs(raw_root, domains, ppl_per_domain, seed), _PPL_YAML)):
        data = (out / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"{name}.yaml").write_text(tmpl.format(name=name, data=json.dumps(str(data))))
    return [MC_TASK, PPL_TASK]
