"""Score init (`pruning.init: scores`): the step-0 deterministic masks keep exactly the top-scoring units at
the target counts, in the L0 math alone and inside a real pruning run (ScoreInitCallback).

The expected units are chosen here by plain Python sorting of the scores, per row, and compared with
what the L0 module's deterministic masks keep (nonzero entries of the composed per-query-head masks).
"""

from __future__ import annotations

import pytest
import torch
from _tiny_data import make_tiny_data
from composer.core import Callback

from llmshearing.models.shape import ModelShape
from llmshearing.pruning import hard_concrete as hc
from llmshearing.pruning.l0 import L0Module
from llmshearing.pruning.score_init import init_from_scores_, oneshot_masks
from llmshearing.pruning.scores import ImportanceScores, compute_scores

GQA = ModelShape(d_model=32, n_heads=8, n_kv_heads=4, head_dim=4, n_layers=4, intermediate_size=48, vocab_size=64)
GQA_T = GQA.replace(d_model=24, n_heads=2, n_kv_heads=2, n_layers=3, intermediate_size=20)  # K 4->2, G 2->1
MHA = ModelShape(d_model=32, n_heads=6, n_kv_heads=6, head_dim=4, n_layers=4, intermediate_size=48, vocab_size=64)
MHA_T = MHA.replace(d_model=16, n_heads=3, n_kv_heads=3, n_layers=2, intermediate_size=24)


def _top(values: list[float], k: int) -> set[int]:
    """Indices of the k largest values (ties: lower index), by plain sorting."""
    return set(sorted(range(len(values)), key=lambda u: (-values[u], u))[:k])


def expected_keep(src: ModelShape, tgt: ModelShape, s: ImportanceScores) -> dict[str, object]:
    """Brute force: kept layers, per kept layer the kept query heads, channels; kept hidden dims."""
    L, K, G = src.n_layers, src.n_kv_heads, src.group_size
    layers = _top(s.layers.tolist(), tgt.n_layers)
    heads, chans = {}, {}
    for layer in range(L):
        h = s.heads[layer].tolist()
        groups = _top([sum(h[k * G:(k + 1) * G]) for k in range(K)], tgt.n_kv_heads)
        heads[layer] = {k * G + g for k in groups for g in _top(h[k * G:(k + 1) * G], tgt.group_size)}
        chans[layer] = _top(s.intermediate[layer].tolist(), tgt.intermediate_size)
    return {"layers": layers, "heads": heads, "channels": chans, "hidden": _top(s.hidden.tolist(), tgt.d_model)}


def kept(masks, src: ModelShape) -> dict[str, object]:
    return {"layers": {i for i in range(src.n_layers) if float(masks.layer[i]) != 0},
            "heads": {i: set(torch.nonzero(masks.heads[i]).flatten().tolist()) for i in range(src.n_layers)},
            "channels": {i: set(torch.nonzero(masks.intermediate[i]).flatten().tolist()) for i in range(src.n_layers)},
            "hidden": set(torch.nonzero(masks.hidden).flatten().tolist())}


def random_scores(src: ModelShape, seed: int = 0) -> ImportanceScores:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return ImportanceScores(heads=r(src.n_layers, src.n_heads), intermediate=r(src.n_layers, src.intermediate_size),
                            hidden=r(src.d_model), layers=r(src.n_layers), tokens=1)


@pytest.mark.parametrize("src,tgt", [(GQA, GQA_T), (MHA, MHA_T)], ids=["gqa", "mha"])
def test_step0_deterministic_masks_keep_the_top_scoring_units(src, tgt):
    l0 = L0Module(src, tgt, seed=0)
    s = random_scores(src)
    if src.n_kv_heads != src.n_heads:
        assert set(l0.specs) == {"layer", "kv_group", "query_head", "intermediate", "hidden"}
    written = init_from_scores_(l0, s, margin=2.0)
    l0.eval()
    got = kept(l0.deterministic_masks(target=True), src)
    assert got == expected_keep(src, tgt, s)
    # the same selection, hard 0/1, for the one-shot cut
    one = oneshot_masks(src, tgt, l0.modules_enabled, s)
    assert kept(one, src) == got and all(set(v.unique().tolist()) <= {0.0, 1.0} for _, v in one.items())
    # stated margin: lowest kept logit - highest dropped logit >= margin, in every row; all within range
    for name, la in written.items():
        n_keep = l0.specs[name].n_keep
        top = torch.topk(la, la.shape[-1], dim=-1).values
        assert (top[..., n_keep - 1] - top[..., n_keep] >= 2.0 - 1e-6).all(), name
        assert la.min() >= hc.LOG_ALPHA_MIN and la.max() <= hc.LOG_ALPHA_MAX


def test_uniform_init_does_not_keep_the_top_scoring_units():
    """The check above can fail: the paper's uniform init keeps other units."""
    l0 = L0Module(GQA, GQA_T, seed=0).eval()
    assert kept(l0.deterministic_masks(target=True), GQA) != expected_keep(GQA, GQA_T, random_scores(GQA))


# ---- inside a pruning run ----------------------------------------------------------------------------------

class Step0Masks(Callback):
    """Records the exact-target deterministic masks when the first batch starts (before any update)."""

    def __init__(self) -> None:
        self.masks = None

    def batch_start(self, state, logger) -> None:
        if self.masks is None:
            from llmshearing.callbacks.pruning import find_l0

            l0 = find_l0(state.model)[1]
            self.masks = l0.deterministic_masks(target=True)
            self.model_state = {k: v.clone() for k, v in state.model.model.state_dict().items()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiny"), docs_per_domain=60)


def test_pruning_run_starts_from_the_scores(data_root, tmp_path):
    from _tiny_data import TINY_PRUNE

    from llmshearing.callbacks.score_init import ScoreInitCallback
    from llmshearing.pruning.scores import calibration_ids
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.training.config import build_model_config, load_config, pruning_target
    from llmshearing.training.trainer import build_trainer

    shape = "model.init.shape"
    cfg = load_config(TINY_PRUNE, [f"data.root={data_root}", f"save_folder={tmp_path}/run", "max_duration=1ba",
                                   f"{shape}.n_heads=8", f"{shape}.n_kv_heads=4", f"{shape}.head_dim=16",
                                   "pruning.target.n_heads=2", "pruning.target.n_kv_heads=2",
                                   "pruning.init=scores", "pruning.init_batches=2", "global_train_batch_size=8",
                                   "device_train_microbatch_size=4", "loggers.file=false", "eval_interval=100ba"])
    rec = Step0Masks()
    trainer = build_trainer(cfg, extra_callbacks=[rec])
    trainer.fit()
    cb = next(c for c in trainer.state.callbacks if isinstance(c, ScoreInitCallback))
    ds = trainer.state.train_dataloader.dataset
    rows = calibration_ids(len(ds), 2, 8, cfg.seed, 0, 1)
    calib = [torch.stack([ds[int(i)]["input_ids"] for i in r]) for r in rows]
    trainer.close()
    src = build_model_config(cfg).shape
    tgt = pruning_target(src, cfg.pruning.target)
    # the scores of the run's source weights over its calibration rows, recomputed here
    model = LlamaForCausalLM(build_model_config(cfg))
    model.load_state_dict(rec.model_state)
    s = compute_scores(model, calib, progress=False)
    assert s.tokens == cb.scores.tokens == 2 * 8 * cfg.data.seq_len
    # fp32 forwards of micro-batches of 4 (the run) vs batches of 8 (here): fp32 rounding only
    torch.testing.assert_close(cb.scores.heads, s.heads, rtol=1e-5, atol=0)
    assert kept(rec.masks, src) == expected_keep(src, tgt, s)
