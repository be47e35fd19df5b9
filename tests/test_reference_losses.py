"""`llmshearing reference-losses`: the scaling-law fit recovers known constants and reproduces the paper's
published reference losses; `eval` of one model in our format and as a Hugging Face export agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _tiny_data import DOMAINS, make_tiny_data

from llmshearing.models.shape import ModelShape
from llmshearing.training.reference_losses import fit_scaling_law, predict


@pytest.mark.parametrize("e,a,alpha,sizes", [
    (1.50, 400.0, 0.30, [7e9, 13e9, 70e9]),
    (0.40, 12.0, 0.15, [1.1e8, 4e8, 1.4e9, 6.9e9]),
    (2.10, 30.0, 0.08, [1.25e8, 3.5e8, 7.6e8, 1.3e9, 2.7e9]),
])
def test_fit_recovers_known_constants(e, a, alpha, sizes):
    """Losses drawn from a known (E, A, alpha): the fit recovers each constant within 1%."""
    fit = fit_scaling_law(sizes, [e + a / n ** alpha for n in sizes])
    assert fit["E"] == pytest.approx(e, rel=0.01)
    assert fit["A"] == pytest.approx(a, rel=0.01)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.01)
    assert predict(fit, 2.7e9) == pytest.approx(e + a / 2.7e9 ** alpha, rel=1e-6)


def test_fit_reproduces_the_papers_reference_losses():
    """Llama-2 7B/13B/70B eval losses (from the original repo) -> the published Sheared-LLaMA reference
    losses for cc and github at 2.7B, 1.3B and 370M (4 decimals as published)."""
    llama2 = [6_738_415_616, 13_015_864_320, 68_976_648_192]  # parameter counts of Llama-2 7B, 13B, 70B
    cc = fit_scaling_law(llama2, [1.7520, 1.6680, 1.4621])
    github = fit_scaling_law(llama2, [0.6216, 0.5791, 0.4890])
    targets = {"2.7b": ModelShape(2560, 20, 20, 128, 32, 6912, 32000).n_params(),
               "1.3b": ModelShape(2048, 16, 16, 128, 24, 5504, 32000).n_params(), "370m": 373_867_520}
    published = {"2.7b": (1.8712, 0.6883), "1.3b": (1.9643, 0.7459), "370m": (2.1401, 0.8694)}
    for name, n in targets.items():
        assert round(predict(cc, n), 4) == published[name][0], name
        assert round(predict(github, n), 4) == published[name][1], name


def test_fit_refuses_too_few_or_rising_losses():
    with pytest.raises(ValueError, match="at least 3 model sizes"):
        fit_scaling_law([7e9, 13e9], [1.75, 1.67])
    with pytest.raises(ValueError, match="decrease with model size"):
        fit_scaling_law([7e9, 13e9, 70e9], [1.75, 1.80, 1.46])


def test_eval_and_fit_commands(tmp_path):
    """`eval` on one model as an llmshearing dir and as its Hugging Face export: the same per-domain
    losses (fp32, 1e-4); `fit` on three sizes prints target_losses in domain order."""
    from llmshearing.convert.checkpoint import save_model_dir
    from llmshearing.convert.hf import convert_composer_to_hf
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM

    data = make_tiny_data(tmp_path / "tiny")
    torch.manual_seed(0)
    m = LlamaForCausalLM(ModelConfig(ModelShape(64, 4, 2, 16, 2, 96, 1024)))
    ours = save_model_dir(m.state_dict(), m.config, tmp_path / "ours")
    convert_composer_to_hf(ours, tmp_path / "hf")
    exe = Path(sys.executable).parent / "llmshearing"
    p = subprocess.run([str(exe), "reference-losses", "eval", "--data", str(data), "--rows", "5", str(ours),
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = yaml.safe_load(p.stdout)
    a, b = doc["models"]
    assert list(a["losses"]) == list(DOMAINS) and a["n_params"] == b["n_params"] == m.config.shape.n_params()
    for d in DOMAINS:
        assert a["losses"][d] == pytest.approx(b["losses"][d], abs=1e-4)
    assert a["target_losses"] == [a["losses"][d] for d in DOMAINS]

    sizes = [1e8, 4e8, 1.6e9]
    synth = {"models": [{"n_params": n, "losses": {"x": 1 + 50 / n ** 0.2, "y": 0.5 + 9 / n ** 0.1}} for n in sizes]}
    (tmp_path / "l.yaml").write_text(yaml.safe_dump(synth))
    p = subprocess.run([str(exe), "reference-losses", "fit", str(tmp_path / "l.yaml"), "--target-params", "8e8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = yaml.safe_load(p.stdout)
    assert out["domains"] == ["x", "y"]
    assert out["target_losses"] == [round(1 + 50 / 8e8 ** 0.2, 4), round(0.5 + 9 / 8e8 ** 0.1, 4)]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"models": synth["models"][:2]}))
    p = subprocess.run([str(exe), "reference-losses", "fit", str(tmp_path / "two.yaml"), "--target-params", "8e8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "at least 3 model sizes" in p.stderr and "Traceback" not in p.stderr
