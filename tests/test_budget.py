"""Budget targets (`pruning/budget.py`): a parameter budget resolves to a valid shape whose exact parameter
count, counted independently by transformers' own Llama (built on the meta device), is within the stated
rounding of the budget; the run prints it and records the concrete shape like an explicit target."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (imported here, not lazily inside the meta-device context: circular import)
import transformers

from llmshearing.models.shape import ModelShape, ShapeError
from llmshearing.pruning import budget
from llmshearing.pruning.target import validate_target

LLAMA2_7B = ModelShape(d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128, n_layers=32, intermediate_size=11008,
                       vocab_size=32000)
LLAMA3_8B = ModelShape(d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, n_layers=32, intermediate_size=14336,
                       vocab_size=128256)
MODULES = ["layer", "head", "intermediate", "hidden"]


def hf_count(s: ModelShape) -> int:
    """Parameters of transformers' LlamaForCausalLM of this shape (meta device: no memory)."""
    cfg = transformers.LlamaConfig(hidden_size=s.d_model, num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads,
                                   head_dim=s.head_dim, num_hidden_layers=s.n_layers, intermediate_size=s.intermediate_size,
                                   vocab_size=s.vocab_size, tie_word_embeddings=s.tie_embeddings)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("source,target", [
    (LLAMA2_7B, {"params": 2.7e9}), (LLAMA2_7B, {"params": 1.3e9}), (LLAMA2_7B, {"params_fraction": 0.4}),
    (LLAMA2_7B, {"params": 1.3e9, "n_layers": 24}),  # the paper's 1.3B keeps 24 layers
    (LLAMA3_8B, {"params": 4e9}), (LLAMA3_8B, {"params_fraction": 0.3}),
], ids=["7b-2.7b", "7b-1.3b", "7b-40pct", "7b-1.3b-24layers", "llama3-4b", "llama3-30pct"])
def test_budget_resolves_within_the_stated_rounding(source, target):
    assert hf_count(source) == source.n_params()
    s = budget.resolve_budget(source, target, MODULES)
    b = target.get("params", target.get("params_fraction", 0) * source.n_params())
    exact = hf_count(s)
    tol = s.n_layers * 3 * s.d_model * 64 / 2  # half a step of 64 MLP channels over all layers
    print(f"{target}: {s.summary()} exact {exact:,} ({(exact - b) / b:+.3%}; tolerance {tol:,.0f})")
    assert abs(exact - b) <= tol
    validate_target(source, s, MODULES)  # a target the masks can reach
    assert s.d_model % 64 == 0 and s.intermediate_size % 64 == 0
    assert s.n_heads % s.n_kv_heads == 0 and s.group_size <= source.group_size  # GQA-valid
    assert s.n_layers == target.get("n_layers", source.n_layers)
    # proportions kept: d_model and query heads shrink by about the same factor
    assert abs(s.d_model / source.d_model - s.n_heads / source.n_heads) < 0.1


def test_paper_27b_budget_gives_about_the_papers_shape():
    """Sheared-LLaMA-2.7B: d 2560, 20 heads, 6912 channels, 32 layers (2.70B). The rule lands next to it."""
    s = budget.resolve_budget(LLAMA2_7B, {"params": 2.7e9}, MODULES)
    assert abs(s.d_model - 2560) <= 128 and abs(s.n_heads - 20) <= 1 and s.n_layers == 32


@pytest.mark.parametrize("target,msg", [({"params": 1e11}, "not below"), ({"params_fraction": 1.5}, "(0, 1)"),
                                        ({"params": 1e9, "intermediate_size": 4096}, "intermediate"),
                                        ({"params": 1e6}, "smallest shape"),
                                        ({"params": 1e9, "params_fraction": 0.2}, "one budget key")])
def test_impossible_budgets_are_refused(target, msg):
    with pytest.raises(ShapeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        budget.resolve_budget(LLAMA2_7B, target, MODULES)


def test_run_prints_the_budget_shape_and_records_it(tmp_path):
    from _tiny_data import TINY_PRUNE
    from omegaconf import OmegaConf

    from llmshearing.training.config import budget_report, load_config
    from llmshearing.training.trainer import build_model

    y = OmegaConf.load(TINY_PRUNE)
    y.pruning.target = {"params_fraction": 0.5}
    y.data.root = str(tmp_path)  # not read: no data is touched here
    OmegaConf.save(y, tmp_path / "prune.yaml")
    cfg = load_config(tmp_path / "prune.yaml")
    line = budget_report(cfg)
    model = build_model(cfg)
    target = model.l0.target
    assert f"exactly {target.n_params():,} parameters" in line
    assert model.l0.config_dict()["target"] == target.to_dict()  # what ModelInfo writes into the checkpoint
    src = model.config.shape
    assert abs(target.n_params() - 0.5 * src.n_params()) <= budget.tolerance(target, src.d_model)
