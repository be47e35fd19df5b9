"""benchmarks/train_throughput.py in its tiny CPU mode: it runs, its JSON has every field, and
its FLOP / MFU arithmetic agrees with a FLOP count made here independently of the repo's code."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"
FAKE_OOM_ABOVE = 2  # the run pretends micro-batches > 2 do not fit, to exercise the OOM search


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--quick",
           "--fake-oom-above", str(FAKE_OOM_ABOVE), "--out", str(out)]
    # a hang guard, not a speed check (it takes ~20 s; speed belongs to benchmarks/, not to tests)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads(p.stdout)  # stdout is exactly the JSON (progress goes to stderr)
    return {"report": report, "file": json.loads(out.read_text()), "stderr": p.stderr}


def independent_train_flops(shape: dict, micro_batch: int, seq: int) -> int:
    """llm-foundry convention, counted from the shape here: forward = 2 FLOPs per non-embedding weight per
    token + attention scores and context 2 * 2 * n_layers * (n_heads * head_dim) * S^2 per sequence;
    training = 3 x forward."""
    d, L, F, V = shape["d_model"], shape["n_layers"], shape["intermediate_size"], shape["vocab_size"]
    qd, kvd = shape["n_heads"] * shape["head_dim"], shape["n_kv_heads"] * shape["head_dim"]
    per_layer = d * qd + 2 * d * kvd + qd * d + 3 * d * F + 2 * d  # q, k, v, o, gate/up/down, two norms
    weights = L * per_layer + d + (0 if shape["tie_embeddings"] else V * d)  # + final norm + lm_head
    fwd_per_seq = 2 * weights * seq + 4 * L * qd * seq * seq
    return 3 * fwd_per_seq * micro_batch


def test_prints_the_json_it_writes(run):
    assert run["report"] == run["file"]
    assert run["report"]["complete"] is True


def test_meta_fields(run):
    m = run["report"]["meta"]
    for k in ("command", "device", "device_name", "torch", "transformers", "python", "precision", "seq_lens",
              "micro_batch_candidates", "warmup_steps", "timed_steps", "flops_convention"):
        assert k in m, k
    assert m["device"] == "cpu" and m["tiny"] is True and m["precision"] == "fp32"
    assert "train_throughput.py" in m["command"] and "--tiny" in m["command"]
    peak = run["report"]["peak"]
    assert peak["spec_tflops"] is None  # no datasheet peak for a CPU
    assert peak["measured_matmul"]["tflops"] > 0


def test_every_case_ran_for_every_seq_len(run):
    r = run["report"]
    got = {(x["case"], x["model"], x["seq_len"]) for x in r["results"] if "step_time_s" in x}
    for seq in r["meta"]["seq_lens"]:
        for model in ("370m", "1.3b"):
            assert ("cpt", model, seq) in got and ("hf", model, seq) in got
        assert ("prune", "1.3b", seq) in got and ("unmasked", "1.3b", seq) in got
    assert not [x for x in r["results"] if "error" in x], [x.get("error") for x in r["results"]]


def test_oom_search_picks_the_largest_fitting_micro_batch(run):
    for x in run["report"]["results"]:
        if x["case"] in ("cpt", "prune"):
            assert x["micro_batch"] == FAKE_OOM_ABOVE
            assert [s["fits"] for s in x["search"]] == [True, True, False]
            assert "OOM" in x["search"][-1]["error"]
        if x["case"] == "hf":  # the baseline runs at our micro-batch
            assert x["search"][0]["micro_batch"] == FAKE_OOM_ABOVE and x["micro_batch"] == FAKE_OOM_ABOVE


def test_flops_and_mfu_arithmetic(run):
    r = run["report"]
    mm = r["peak"]["measured_matmul"]["tflops"]
    for x in r["results"]:
        shape, mb, seq = x["shape"], x["micro_batch"], x["seq_len"]
        assert max(shape["d_model"], shape["intermediate_size"], shape["vocab_size"]) <= 512  # tiny shapes
        flops = independent_train_flops(shape, mb, seq)
        assert x["flops_per_step"] == flops, (x["case"], x["model"])
        assert x["step_time_s"] == pytest.approx(statistics.median(x["step_times_s"]), rel=1e-12)
        assert len(x["step_times_s"]) == r["meta"]["timed_steps"]
        assert x["tokens_per_step"] == mb * seq
        assert x["tokens_per_s"] == pytest.approx(mb * seq / x["step_time_s"], rel=1e-9)
        assert x["achieved_tflops"] == pytest.approx(flops / x["step_time_s"] / 1e12, rel=1e-9)
        assert x["mfu_measured_matmul"] == pytest.approx(x["achieved_tflops"] / mm, rel=1e-9)
        assert x["mfu_spec"] is None
        assert "peak_mem_gib" in x  # None on CPU
        for k in ("loss_first", "loss_last"):  # random init: cross-entropy near ln(vocab)
            assert math.isfinite(x[k]) and abs(x[k] - math.log(shape["vocab_size"])) < 1.0


def test_independent_count_matches_the_real_parameter_count(run):
    """The independent formula's weight count equals the model's actual non-embedding parameters."""
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.models.shape import ModelShape

    for x in run["report"]["results"]:
        if x["case"] != "cpt" or x["seq_len"] != run["report"]["meta"]["seq_lens"][0]:
            continue
        m = LlamaForCausalLM(ModelConfig(shape=ModelShape.from_dict(x["shape"])))
        weights = sum(p.numel() for n, p in m.named_parameters() if n != "model.embed_tokens.weight")
        # one sequence of one token: 6 FLOPs per weight plus the attention term 12 * L * q_dim
        attn = 12 * x["shape"]["n_layers"] * x["shape"]["n_heads"] * x["shape"]["head_dim"]
        assert independent_train_flops(x["shape"], 1, 1) - attn == 6 * weights
        assert x["n_params"] == sum(p.numel() for p in m.parameters())


def test_pruning_case_uses_masks_lagrangian_and_three_param_groups(run):
    r = run["report"]
    for x in r["results"]:
        if x["case"] != "prune":
            continue
        assert x["pruning"]["mask_types"] and set(x["pruning"]["mask_types"]) <= {
            "layer", "head", "kv_group", "query_head", "intermediate", "hidden"}
        groups = x["param_groups"]
        assert len(groups) == 3
        assert groups[0]["lr"] > 0 and groups[1]["lr"] > 0 and groups[2]["lr"] == -groups[1]["lr"]
        assert groups[1]["weight_decay"] == 0 and groups[2]["weight_decay"] == 0
        assert x["n_params"] > r["results"][0]["n_params"]  # the L0 parameters are part of the step
    for c in r["comparisons"]:
        if c["what"] == "prune_vs_unmasked":
            pr = next(x for x in r["results"] if x["case"] == "prune" and x["seq_len"] == c["seq_len"])
            un = next(x for x in r["results"] if x["case"] == "unmasked" and x["seq_len"] == c["seq_len"])
            assert c["step_time_ratio_prune_over_unmasked"] == pytest.approx(pr["step_time_s"] / un["step_time_s"])
    assert sum(c["what"] == "prune_vs_unmasked" for c in r["comparisons"]) == len(r["meta"]["seq_lens"])
    assert sum(c["what"] == "ours_vs_hf" for c in r["comparisons"]) == 2 * len(r["meta"]["seq_lens"])


def test_hf_baseline_is_transformers_with_sdpa(run):
    hf = [x for x in run["report"]["results"] if x["case"] == "hf"]
    assert hf and all(x["impl"] == "transformers" and x["hf_attn_implementation"] == "sdpa" for x in hf)
    ours = {(x["model"], x["seq_len"]): x for x in run["report"]["results"] if x["case"] == "cpt"}
    for x in hf:  # same shape, same parameter count as ours
        assert x["n_params"] == ours[(x["model"], x["seq_len"])]["n_params"]


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    """The one-call device script runs end to end without CUDA (gpu tests skip, tiny shapes), so a device
    session never spends its minutes on a script error; every part exits 0 and the summary is JSON."""
    import os

    env = {**os.environ, "GPU_CHECK_NO_INSTALL": "1", "OUT": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)  # hang guard; ~40 s
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_check" / "gpu_check.json").read_text())
    assert {summary[k]["rc"] for k in ("tests", "throughput", "compiled", "data")} == {"0"}, summary
    cases = {"cpt", "hf", "prune", "unmasked", "cpt_full_logits", "cpt_liger"}
    assert {r["case"] for r in summary["throughput"]["results"]} == cases
    for r in summary["throughput"]["results"]:  # liger-kernel is a GPU package, not installed here
        assert not r["error"] or (r["case"] == "cpt_liger" and "not installed" in r["error"]), r
    assert {r["case"] for r in summary["compiled"]["results"]} == {"cpt", "prune"}
    assert not any(r["error"] for r in summary["compiled"]["results"])
    tp = json.loads((tmp_path / "gpu_check" / "throughput.json").read_text())
    assert tp["meta"]["fsdp2"] is True  # the path train.py takes with an fsdp: section
    assert summary["loader_over_step"] and "skipped" in summary["tests"]["last_lines"][-1]


def test_step_memory_benchmark_runs_and_the_chunked_loss_matches(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_memory.py"), "--tiny", "--out", str(out)],
                       cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=900)  # a hang guard
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert {(s["task"], s["chunk_tokens"]) for s in r["summary"]} == {("lm", 64), ("distill", 64)}
    for s in r["summary"]:  # the same loss before and after: the chunked path is the same computation
        assert s["loss_gap"] < 1e-5, s
