"""`llmshearing evaluate` (issue 27, part 1): lm-evaluation-harness on exported models, side by side, offline.

Two local tasks in the harness's own YAML format (a multiple-choice task and a perplexity task from the tiny
corpus, dataset_path: json on local files) run through the harness's `hf` model on the sheared fixture's
exports (the continued model and the cut model). Each metric is recomputed here per sample, with our own
model (llmshearing's LlamaForCausalLM on the exported weights) and the export's tokenizer:
acc / acc_norm from summed continuation log-likelihoods (argmax, raw and per character), and
word / byte perplexity and bits per byte from whole-document log-likelihoods. The harness scores a
document with its prefix token (BOS) before the tokenizer's own encoding, which starts with BOS too,
so the document's likelihood here is that of [BOS] + tokenizer(text).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers

from llmshearing.cli import main
from llmshearing.convert.model_source import load_source_model
from llmshearing.evaluation.harness import format_table
from llmshearing.evaluation.local_tasks import MC_TASK, PPL_TASK, write_local_tasks

DOMAINS = ["code", "legal", "prose"]
REL = 1e-4  # perplexities: the harness batches (padded), we score one sequence at a time; fp32


@pytest.fixture(scope="module")
def harness_run(sheared, tmp_path_factory):
    tasks = tmp_path_factory.mktemp("tasks")
    assert write_local_tasks(sheared.raw, tasks, DOMAINS, mc_per_domain=8, ppl_per_domain=4) == [MC_TASK, PPL_TASK]
    out = tasks / "results.json"
    assert main(["evaluate", str(sheared.hf), "--baseline", str(sheared.cut_hf), "--tasks", f"{MC_TASK},{PPL_TASK}",
                 "--include-path", str(tasks), "--out", str(out)]) == 0
    return tasks, json.loads(out.read_text())


def _rows(path):
    return [json.loads(line) for line in open(path)]


@torch.no_grad()
def _loglik(model, ids: list[int], start: int) -> float:
    """sum of log p(ids[i] | ids[:i]) for i >= start."""
    x = torch.tensor([ids])
    logp = model(x[:, :-1]).log_softmax(-1)[0]
    lp = logp.gather(-1, x[0, 1:, None])[:, 0]
    return float(lp[start - 1:].sum())


def _ours(model_dir, tasks) -> dict[str, dict[str, float]]:
    model = load_source_model(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hits = hits_norm = 0
    items = _rows(tasks / f"{MC_TASK}.jsonl")
    for it in items:
        ctx = tok(it["context"])["input_ids"]
        lls = []
        for ch in it["choices"]:
            whole = tok(it["context"] + ch)["input_ids"]
            lls.append(_loglik(model, whole, len(ctx)))
        hits += max(range(4), key=lambda i: lls[i]) == it["label"]
        hits_norm += max(range(4), key=lambda i: lls[i] / len(it["choices"][i])) == it["label"]
    ll = words = nbytes = 0.0
    for doc in _rows(tasks / f"{PPL_TASK}.jsonl"):
        ids = [tok.bos_token_id] + tok(doc["text"])["input_ids"]
        assert len(ids) <= model.config.max_position_embeddings  # one window: no rolling needed
        ll += _loglik(model, ids, 1)
        words += len(re.split(r"\s+", doc["text"]))
        nbytes += len(doc["text"].encode("utf-8"))
    return {MC_TASK: {"acc": hits / len(items), "acc_norm": hits_norm / len(items)},
            PPL_TASK: {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
                       "bits_per_byte": -ll / nbytes / math.log(2)}}


@pytest.mark.parametrize("which", ["model", "baseline"])
def test_harness_metrics_equal_our_per_sample_computation(sheared, harness_run, which):
    tasks, cmp = harness_run
    run = cmp["models"][which]
    assert run["model"] == str(sheared.hf if which == "model" else sheared.cut_hf)
    ours = _ours(run["model"], tasks)
    got = run["results"]
    assert got[MC_TASK]["acc"] == ours[MC_TASK]["acc"] and got[MC_TASK]["acc_norm"] == ours[MC_TASK]["acc_norm"]
    for m, v in ours[PPL_TASK].items():
        assert got[PPL_TASK][m] == pytest.approx(v, rel=REL), m
    assert run["n_samples"] == {MC_TASK: 24, PPL_TASK: 12}


def test_table_shows_both_models_and_the_difference(harness_run):
    _, cmp = harness_run
    table = format_table(cmp)
    a = cmp["models"]["model"]["results"][PPL_TASK]["byte_perplexity"]
    b = cmp["models"]["baseline"]["results"][PPL_TASK]["byte_perplexity"]
    line = next(x for x in table.splitlines() if x.startswith(PPL_TASK) and "byte_perplexity" in x)
    assert f"{a:.4f}" in line and f"{b:.4f}" in line and f"{a - b:+.4f}" in line
    assert len([x for x in table.splitlines() if x.startswith(("llmshearing_mc", "llmshearing_ppl"))]) == 5


def test_unknown_task_and_missing_model_are_one_line_errors(sheared, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--tasks", MC_TASK]) == 2
    assert main(["evaluate", str(sheared.hf), "--tasks", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err
    assert "not a Hugging Face model directory" in err and "unknown lm-eval task" in err
