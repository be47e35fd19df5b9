"""`llmshearing demo` (the README's main job) runs end to end on CPU with no network, and shearing beats
training the target shape from scratch (the paper's claim at toy scale)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_and_shearing_beats_scratch(tmp_path):
    """`--quick` (about a minute on 2 cores; the full demo takes 3-5 minutes and is what the README shows):
    the same stages, a shorter-trained source, and shearing still wins by a wide margin (4.56 vs 5.16)."""
    exe = Path(sys.executable).parent / "llmshearing"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    # the timeout is a hang guard (~10x the normal duration), not a speed check
    p = subprocess.run([str(exe), "demo", "--quick", "--out", str(tmp_path / "demo")], capture_output=True,
                       text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "demo" / "results.json").read_text())
    # The <10-minute budget is a speed target, measured and reported (results.json "seconds", README),
    # not asserted: a loaded CI machine must not turn it into a flaky failure.
    for row in ("source", "pruned", "continued", "scratch"):
        assert row in p.stdout
    # the pruned model has exactly the tiny prune yaml's target shape
    target = {"d_model": 96, "n_heads": 2, "n_kv_heads": 2, "n_layers": 3, "intermediate_size": 192}
    assert {k: r["shapes"]["pruned"][k] for k in target} == target
    # the HF export loads and reproduces our logits (fp32, 1e-4)
    assert r["hf_max_abs_logit_diff"] < 1e-4
    assert (Path(r["hf_dir"]) / "config.json").is_file() and Path(r["plot"]).is_file()
    mean = {k: sum(v.values()) / len(v) for k, v in r["losses"].items()}
    # scratch trains on pruning + continued pre-training tokens, i.e. at least as many as the sheared model
    assert r["tokens"]["scratch"] >= r["tokens"]["pruned"] + r["tokens"]["continued"]
    assert mean["continued"] < mean["scratch"], f"continued {mean['continued']:.3f} vs scratch {mean['scratch']:.3f}"
    assert mean["continued"] < mean["pruned"]  # continued pre-training recovers what the cut lost
    # the demo ends with lm-evaluation-harness on the local tasks, continued vs scratch (the table is printed);
    # that the harness's numbers are right is tests/test_evaluate.py's job
    h = r["harness"]
    assert set(h["models"]) == {"continued", "scratch"}
    for name, m in h["models"].items():
        assert set(m["results"]) == set(h["tasks"]) and m["results"]["llmshearing_mc"]["acc"] >= 0, name
    assert "lm-evaluation-harness" in p.stdout and "llmshearing_ppl" in p.stdout
    assert "lm-evaluation-harness" in (Path(r["hf_dir"]) / "README.md").read_text()  # in the export's card

    # the recovery comparison (`llmshearing demo --compare`, README table) runs on that output: every recipe
    # trains from the same cut model and is evaluated on every domain (2 batches each: a smoke run)
    p = subprocess.run([sys.executable, "-m", "llmshearing.demo.recovery", str(tmp_path / "demo"), "--steps", "2"],
                       capture_output=True, text=True, env=env, timeout=900)  # hang guard
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cmp = json.loads(p.stdout)
    assert set(cmp["recipes"]) == {"lm_doremi", "kd_teacher_gap", "kd_constant", "lm_stratified", "scratch"}
    for name, rec in cmp["recipes"].items():
        assert set(rec["losses"]) == set(r["losses"]["source"]) and all(v == v for v in rec["losses"].values()), name
    assert (tmp_path / "demo" / "recovery.png").is_file()


def test_real_source_target_keeps_gqa_and_about_40_percent():
    """`llmshearing demo --source`: the target of SmolLM2-135M's shape (9 query heads in 3 KV groups)."""
    from llmshearing.demo.real import real_target
    from llmshearing.models.shape import ModelShape
    from llmshearing.pruning.target import validate_target

    src = ModelShape(d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, n_layers=30, intermediate_size=1536,
                     vocab_size=49152, tie_embeddings=True)
    tgt = real_target(src)
    assert (tgt.n_kv_heads, tgt.n_heads, tgt.n_layers, tgt.d_model, tgt.intermediate_size) == (3, 6, 20, 384, 1024)
    assert 0.35 < tgt.n_params() / src.n_params() < 0.45 and tgt.tie_embeddings
    validate_target(src, tgt, ["layer", "head", "intermediate", "hidden"])
