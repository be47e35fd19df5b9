"""Every exported model directory carries a model card (issue 27, part 3): Hugging Face front matter that
parses as YAML (license inherited from the source's card, base_model, tags) and a body whose numbers are
the run's, checked against independent counts: the parameters transformers' own model has, the tokens the
run's yaml implies (batches x global batch x sequence length), the mixture in the checkpoint's loader
state and the losses of the exported model recomputed on the eval split."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
import yaml
from _sheared import BATCHES, GLOBAL_BATCH, LICENSE, SEQ_LEN

from llmshearing.convert.model_card import read_front_matter

TOKENS = BATCHES * GLOBAL_BATCH * SEQ_LEN  # what each 4-batch run trained on


def _card(d) -> tuple[dict, str]:
    text = (d / "README.md").read_text()
    m = re.match(r"\A---\n(.*?)\n---\n(.*)\Z", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def _number(body: str, label: str) -> int:
    m = re.search(rf"\| {re.escape(label)} \| ([\d,]+) ", body)
    assert m, f"no {label!r} row"
    return int(m.group(1).replace(",", ""))


def _table(body: str, heading: str) -> dict[str, float]:
    sec = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \|$", sec, re.M)}


@pytest.mark.parametrize("which", ["cut", "cut_hf", "hf"])
def test_card_front_matter_parses_and_inherits_the_source_license(sheared, which):
    fm, body = _card(getattr(sheared, which))
    assert fm["license"] == LICENSE  # from the source's own card
    assert fm["base_model"] == "acme/tiny-src"  # the source's Hub id (its Hub-cache folder)
    assert "llmshearing" in fm["tags"] and fm["pipeline_tag"] == "text-generation"
    assert read_front_matter(getattr(sheared, which)) == fm
    assert str(sheared.source) in body


def test_card_numbers_are_the_runs(sheared):
    import json

    fm, body = _card(sheared.hf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(sheared.hf, dtype=torch.float32).eval()
    n = sum(p.numel() for p in hf.parameters())  # transformers' own model, tied weights counted once
    assert f"exact parameter count: **{n:,}**" in body
    assert re.search(rf"\| parameters \| [\d,]+ \| {n:,} \|", body)
    cfg = json.loads((sheared.hf / "config.json").read_text())
    assert re.search(rf"\| layers \| 4 \| {cfg['num_hidden_layers']} \|", body)  # source 4 layers, cut 3
    assert _number(body, "pruning") == TOKENS and _number(body, "continued pre-training") == TOKENS

    # the final mixture: the continued pre-training run's loader state, read here with torch directly
    st = torch.load(sheared.cpt_ckpt, weights_only=False, map_location="cpu")["state"]["dataset_state"]["train"]
    want = dict(zip(st["domains"], st["proportion_history"][-1][1]))
    got = _table(body, "Data mixture")
    assert got.keys() == want.keys() and all(abs(got[d] - want[d]) < 1e-4 for d in want), (got, want)

    # eval losses: the run's last evaluation (batch 4 = the exported weights), recomputed on the eval split
    from llmshearing.convert.model_source import load_source_model
    from llmshearing.training.reference_losses import domain_losses

    ours = load_source_model(sheared.hf).eval()
    want = domain_losses(ours, sheared.data, list(want), SEQ_LEN, split="eval")
    got = _table(body, "Evaluation")
    assert got.pop("mean") == pytest.approx(sum(want.values()) / 3, abs=1e-4)
    assert got.keys() == want.keys() and all(abs(got[d] - want[d]) < 1e-4 for d in want), (got, want)  # 4 decimals

    cmds = body.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "llmshearing prune-export" in cmds and "llmshearing convert composer-to-hf" in cmds


def test_cut_card_carries_the_pruning_run(sheared):
    _, body = _card(sheared.cut)
    assert _number(body, "pruning") == TOKENS and "| continued pre-training | not recorded |" in body
    st = torch.load(sheared.prune_ckpt, weights_only=False, map_location="cpu")["state"]
    want = dict(zip(st["dataset_state"]["train"]["domains"], st["dataset_state"]["train"]["proportion_history"][-1][1]))
    got = _table(body, "Data mixture")
    assert all(abs(got[d] - want[d]) < 1e-4 for d in want)
    hf = transformers.AutoModelForCausalLM.from_pretrained(sheared.cut_hf)
    assert f"**{sum(p.numel() for p in hf.parameters()):,}**" in body
