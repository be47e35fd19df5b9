"""validate_target: one test per rule, each checking that the message names the dimension."""

import logging

import pytest

from llmshearing.models.shape import ModelShape, ShapeError
from llmshearing.pruning.l0 import L0Module
from llmshearing.pruning.target import validate_target

ALL = ["layer", "head", "intermediate", "hidden"]
SRC = ModelShape(d_model=64, n_heads=8, n_kv_heads=2, head_dim=8, n_layers=4, intermediate_size=128, vocab_size=100)
OK = ModelShape(d_model=48, n_heads=4, n_kv_heads=2, head_dim=8, n_layers=3, intermediate_size=64, vocab_size=100)


def test_valid_target_passes():
    validate_target(SRC, OK, ALL)


@pytest.mark.parametrize("dim,value", [("d_model", 80), ("n_layers", 5), ("intermediate_size", 256),
                                       ("n_heads", 12), ("n_kv_heads", 4)])
def test_target_larger_than_source(dim, value):
    kw = {"n_heads": 12, "n_kv_heads": 2} if dim == "n_heads" else {dim: value}
    if dim == "n_kv_heads":
        kw["n_heads"] = 8  # 2 query heads per group (<= the source's 4), 4 kv heads > 2
    with pytest.raises(ShapeError, match=f"target {dim} \\({value}\\) is larger than the source") as e:
        validate_target(SRC, OK.replace(**kw), ALL)
    assert dim in str(e.value)


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ShapeError, match="n_heads.*n_kv_heads"):
        OK.replace(n_heads=3, n_kv_heads=2)


def test_head_dim_mismatch():
    with pytest.raises(ShapeError, match="head_dim"):
        validate_target(SRC, OK.replace(head_dim=4), ALL)


def test_vocab_mismatch():
    with pytest.raises(ShapeError, match="vocab_size"):
        validate_target(SRC, OK.replace(vocab_size=99), ALL)


def test_qkv_bias_mismatch():
    with pytest.raises(ShapeError, match="qkv_bias"):
        validate_target(SRC, OK.replace(qkv_bias=True), ALL)


@pytest.mark.parametrize("module,dim", [("hidden", "d_model"), ("layer", "n_layers"),
                                        ("intermediate", "intermediate_size"), ("head", "n_heads")])
def test_dimension_changed_without_its_module(module, dim):
    mods = [m for m in ALL if m != module]
    with pytest.raises(ShapeError, match=f"{dim}.*'{module}' is not enabled"):
        validate_target(SRC, OK, mods)


def test_gqa_query_heads_per_group_cannot_grow():
    # source: 8 heads / 2 groups = 4 per group; target 6 heads / 1 group = 6 per group
    with pytest.raises(ShapeError, match="query heads per KV group"):
        validate_target(SRC, OK.replace(n_heads=6, n_kv_heads=1), ALL)
    # MHA source cannot become GQA (group size 1 -> 2)
    mha = SRC.replace(n_kv_heads=8)
    with pytest.raises(ShapeError, match="query heads per KV group"):
        validate_target(mha, OK.replace(n_heads=4, n_kv_heads=2), ALL)


def test_gqa_kv_heads_cannot_grow():
    with pytest.raises(ShapeError, match="n_kv_heads"):
        validate_target(SRC, OK.replace(n_heads=4, n_kv_heads=4), ALL)


def test_unknown_module_lists_valid_ones():
    with pytest.raises(ShapeError, match=r"unknown pruning module.*'mlp'.*valid modules.*'layer'"):
        validate_target(SRC, OK, ALL + ["mlp"])


def test_warns_when_enabled_module_is_unchanged(caplog):
    tgt = OK.replace(d_model=64)
    with caplog.at_level(logging.WARNING):
        validate_target(SRC, tgt, ALL)
    assert any("'hidden'" in r.getMessage() and "d_model=64" in r.getMessage() for r in caplog.records)
    l0 = L0Module(SRC, tgt, ALL)
    assert "hidden" not in l0.mask_types  # no mask created


def test_l0_module_validates_before_building():
    with pytest.raises(ShapeError, match="d_model"):
        L0Module(SRC, OK, ["layer", "head", "intermediate"])
    with pytest.raises(ShapeError, match="nothing to prune"):
        L0Module(SRC, SRC, ALL)
