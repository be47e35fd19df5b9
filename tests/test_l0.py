"""L0Module: mask types and shapes, expected size vs brute force, schedule, Lagrangian and its signs
through a real optimizer step, config round trip, param groups (FSDP2: tests/test_sharding.py)."""

import itertools
import math

import pytest
import torch

from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.config import ModelConfig
from llmshearing.models.masks import StructureMasks
from llmshearing.models.shape import ModelShape
from llmshearing.pruning import hard_concrete as hc
from llmshearing.pruning.l0 import L0Module
from llmshearing.pruning.param_groups import pruning_param_groups

TINY_GQA = ModelShape(d_model=6, n_heads=4, n_kv_heads=2, head_dim=2, n_layers=2, intermediate_size=5,
                      vocab_size=11, qkv_bias=True)
TINY_MHA = ModelShape(d_model=6, n_heads=3, n_kv_heads=3, head_dim=2, n_layers=3, intermediate_size=4, vocab_size=11)


def _randomize(l0: L0Module, seed: int = 0, scale: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in l0.log_alpha_params():
            p.copy_((torch.randn(p.shape, generator=g) * scale).clamp(hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX))


# ---- mask types ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target_heads,target_kv,expected", [
    (4, 2, {"kv_group": (4, 4)}),                          # drop whole KV groups (2 per group kept)
    (4, 4, {"query_head": (4, 4, 2)}),                     # drop query heads within groups
    (2, 2, {"kv_group": (4, 4), "query_head": (4, 4, 2)}),  # both
])
def test_gqa_mask_types(target_heads, target_kv, expected):
    src = ModelShape(d_model=16, n_heads=8, n_kv_heads=4, head_dim=2, n_layers=4, intermediate_size=8, vocab_size=7)
    tgt = src.replace(n_heads=target_heads, n_kv_heads=target_kv)
    l0 = L0Module(src, tgt, ["head"])
    assert {n: tuple(l0.log_alpha(n).shape) for n in l0.mask_types} == expected
    masks, lag = l0.train()()
    assert masks.heads.shape == (4, 8) and masks.layer is None and masks.hidden is None
    assert lag.dim() == 0
    # deterministic masks keep exactly K_T groups and G_T heads in every kept group
    _randomize(l0)
    hm = l0.deterministic_masks(target=True).heads.view(4, 4, 2) != 0
    per_group = hm.sum(-1)
    for layer in per_group:
        kept = layer[layer > 0]
        assert len(kept) == target_kv and set(kept.tolist()) == {target_heads // target_kv}


def test_gqa_composition_is_product_of_group_and_query_masks():
    src = ModelShape(d_model=8, n_heads=6, n_kv_heads=2, head_dim=2, n_layers=2, intermediate_size=4, vocab_size=7)
    l0 = L0Module(src, src.replace(n_heads=2, n_kv_heads=1), ["head"])
    zkv, zq = torch.rand(2, 2), torch.rand(2, 2, 3)
    heads = l0._compose({"kv_group": zkv, "query_head": zq}).heads
    for l, k, g in itertools.product(range(2), range(2), range(3)):
        assert heads[l, k * 3 + g] == zkv[l, k] * zq[l, k, g]
    # query head h uses KV group h // G: kv-only masks repeat each group's value G times
    heads = l0._compose({"kv_group": zkv}).heads
    assert torch.equal(heads, zkv[:, [0, 0, 0, 1, 1, 1]])


def test_mha_single_head_mask_and_all_types():
    tgt = TINY_MHA.replace(d_model=4, n_heads=2, n_kv_heads=2, n_layers=2, intermediate_size=2)
    l0 = L0Module(TINY_MHA, tgt)
    assert {n: tuple(l0.log_alpha(n).shape) for n in l0.mask_types} == {
        "layer": (3,), "head": (3, 3), "intermediate": (3, 4), "hidden": (6,)}
    for n in l0.mask_types:
        assert l0.log_alpha(n).dtype == torch.float32
        for lam in l0.lambdas(n):
            assert lam.shape == (1,) and lam.dtype == torch.float32 and float(lam) == 0.0
    names = dict(l0.named_parameters())
    assert {"log_alpha_head", "lambda_1_head", "lambda_2_head", "log_alpha_hidden"} <= set(names)
    masks, lag = l0.train()()
    masks.validate(3, 3, 4, 6)
    for _, z in masks.items():
        assert z.dtype == torch.float32 and float(z.min()) >= 0 and float(z.max()) <= 1


def test_eval_forward_deterministic_counts():
    tgt = TINY_MHA.replace(d_model=4, n_heads=2, n_kv_heads=2, n_layers=2, intermediate_size=2)
    l0 = L0Module(TINY_MHA, tgt, eval_target_model=True)
    _randomize(l0, 3)
    masks, lag = l0.eval()()
    assert lag is None
    assert int((masks.layer != 0).sum()) == 2 and int((masks.hidden != 0).sum()) == 4
    assert ((masks.heads != 0).sum(-1) == 2).all() and ((masks.intermediate != 0).sum(-1) == 2).all()
    # "current expected" model: per row round(sum of scores)
    l0.eval_target_model = False
    masks, _ = l0()
    p = hc.prob_nonzero(l0.log_alpha("intermediate").detach())
    want = [4 - round(float(4 - p[r].sum())) for r in range(3)]
    assert (masks.intermediate != 0).sum(-1).tolist() == want
    # deterministic masks are reproducible
    assert torch.equal(l0()[0].intermediate, masks.intermediate)


# ---- expected size --------------------------------------------------------------------------------------
def _brute_force_expected_params(shape: ModelShape, probs: dict) -> float:
    """Sum, over every entry of every prunable matrix (and bias), of the product of the survival
    probabilities of the units owning its row and column; explicit loops."""
    L, H, K, G, hd, D, F = (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.group_size, shape.head_dim,
                            shape.d_model, shape.intermediate_size)

    def p(name, *idx):
        return float(probs[name][idx]) if name in probs else 1.0

    total = 0.0
    for l in range(L):
        pl = p("layer", l)
        for h in range(H):
            k, g = divmod(h, G)
            # MHA: the 'head' mask gates q/o of head h and k/v of group h (K == H)
            ph = p("head", l, h) if "head" in probs else p("kv_group", l, k) * p("query_head", l, k, g)
            for _row in range(hd):
                for d in range(D):
                    total += pl * ph * p("hidden", d)  # q_proj[row, d]
                    total += pl * ph * p("hidden", d)  # o_proj[d, col]
                if shape.qkv_bias:
                    total += pl * ph  # q bias
        for k in range(K):
            pk = p("head", l, k) if "head" in probs else p("kv_group", l, k)
            for _proj in ("k", "v"):
                for _row in range(hd):
                    for d in range(D):
                        total += pl * pk * p("hidden", d)
                    if shape.qkv_bias:
                        total += pl * pk
        for f in range(F):
            for d in range(D):
                total += 3 * pl * p("intermediate", l, f) * p("hidden", d)  # gate row, up row, down column
    return total


@pytest.mark.parametrize("src,tgt,modules", [
    (TINY_GQA, TINY_GQA.replace(d_model=4, n_heads=1, n_kv_heads=1, n_layers=1, intermediate_size=2), None),
    (TINY_GQA, TINY_GQA.replace(n_heads=2, n_kv_heads=2), ["head"]),  # query heads only
    (TINY_GQA, TINY_GQA.replace(n_heads=2, n_kv_heads=1, intermediate_size=3), ["head", "intermediate"]),
    (TINY_MHA, TINY_MHA.replace(d_model=4, n_heads=2, n_kv_heads=2, n_layers=2, intermediate_size=2), None),
    (TINY_MHA, TINY_MHA.replace(n_heads=1, n_kv_heads=1), ["head"]),
])
def test_expected_params_vs_brute_force(src, tgt, modules):
    l0 = L0Module(src, tgt, modules or ["layer", "head", "intermediate", "hidden"])
    for seed in range(3):
        _randomize(l0, seed)
        probs = {k: v.detach() for k, v in l0.probs().items()}
        want = _brute_force_expected_params(src, probs)
        assert float(l0.expected_params()) == pytest.approx(want, rel=1e-6)
    # all units surely on -> the full prunable size
    ones = {n: torch.ones(l0.log_alpha(n).shape) for n in l0.mask_types}
    assert float(l0.expected_params(ones)) == src.n_prunable_params()


def _target_probs(l0: L0Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """0/1 probabilities with exactly the target count on per row, at random positions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, spec in l0.specs.items():
        scores = torch.rand(spec.shape, generator=g)
        out[n] = hc.deterministic(torch.logit(scores), spec.n_keep).ne(0).float()
    return out


@pytest.mark.parametrize("src,tgt", [
    (TINY_GQA, TINY_GQA.replace(d_model=4, n_heads=2, n_kv_heads=1, n_layers=1, intermediate_size=2)),
    (TINY_MHA, TINY_MHA.replace(d_model=4, n_heads=2, n_kv_heads=2, n_layers=2, intermediate_size=2)),
    # Llama-2-7B -> Sheared-LLaMA-2.7B / 1.3B (counts ~6.5e9: needs float64 to be exact)
    (ModelShape(4096, 32, 32, 128, 32, 11008, 32000), ModelShape(2560, 20, 20, 128, 32, 6912, 32000)),
    (ModelShape(4096, 32, 32, 128, 32, 11008, 32000), ModelShape(2048, 16, 16, 128, 24, 5504, 32000)),
    # Llama-3.1-8B-like GQA source -> fewer groups and fewer heads per group
    (ModelShape(4096, 32, 8, 128, 32, 14336, 128256), ModelShape(2048, 12, 4, 128, 24, 5632, 128256)),
])
def test_expected_params_equals_target_at_target_probabilities(src, tgt):
    l0 = L0Module(src, tgt)
    probs = _target_probs(l0)
    e = l0.expected_params(probs)
    assert e.dtype == torch.float64
    assert e.item() == tgt.n_prunable_params()
    es = l0.expected_sparsity(probs)
    for n, spec in l0.specs.items():
        assert float(es[n]) == pytest.approx(spec.final_target_sparsity, abs=1e-6)
    assert float(es["overall"]) == pytest.approx(1 - tgt.n_prunable_params() / src.n_prunable_params(), abs=1e-6)


def test_expected_sparsity_is_one_minus_mean_probability():
    l0 = L0Module(TINY_GQA, TINY_GQA.replace(n_heads=2, n_kv_heads=1, intermediate_size=2), ["head", "intermediate"])
    _randomize(l0, 5)
    es = l0.expected_sparsity()
    for n in l0.mask_types:
        p = hc.prob_nonzero(l0.log_alpha(n).detach())
        assert float(es[n]) == pytest.approx(1 - float(p.sum()) / p.numel(), abs=1e-6)


# ---- schedule and Lagrangian ----------------------------------------------------------------------------
def test_target_sparsity_schedule():
    tgt = TINY_MHA.replace(d_model=3, n_heads=1, n_kv_heads=1, n_layers=2, intermediate_size=1)
    l0 = L0Module(TINY_MHA, tgt, lagrangian_warmup_steps=40)
    final = {"layer": 1 - 2 / 3, "head": 1 - 1 / 3, "intermediate": 1 - 1 / 4, "hidden": 1 - 3 / 6}
    for step in (0, 1, 10, 20, 39, 40, 41, 1000):
        want = {n: t * min(1.0, step / 40) for n, t in final.items()}
        assert l0.target_sparsity(step) == pytest.approx(want)
    l0.set_step(20)
    assert l0.target_sparsity() == pytest.approx({n: t / 2 for n, t in final.items()})
    no_warmup = L0Module(TINY_MHA, tgt, lagrangian_warmup_steps=0)
    assert no_warmup.target_sparsity(0) == pytest.approx(final)


def _original_lagrangian(log_alphas: dict[str, torch.Tensor], lambdas: dict[str, tuple[float, float]],
                         targets: dict[str, float]) -> torch.Tensor:
    """The original implementation's formula, written out with Python loops: for each mask type, each row
    (all but the last logits dimension) has expected sparsity s_r = 1 - mean_u P(z_u != 0), with
    P(z != 0) = 1 - sigmoid(beta * log(-l / r) - log_alpha) = sigmoid(log_alpha - (2/3) log(0.1 / 1.1)),
    and the type's penalty is the mean over rows of lambda_1 (s_r - t) + lambda_2 (s_r - t)^2."""
    total = torch.zeros((), dtype=torch.float64)
    for name, la in log_alphas.items():
        rows = la.reshape(-1, la.shape[-1])
        penalties = []
        for r in range(rows.shape[0]):
            probs = [torch.sigmoid(rows[r, u].double() - (2 / 3) * math.log(0.1 / 1.1)) for u in range(rows.shape[1])]
            s_r = 1 - sum(probs) / len(probs)
            d = s_r - targets[name]
            penalties.append(lambdas[name][0] * d + lambdas[name][1] * d * d)
        total = total + sum(penalties) / len(penalties)
    return total


@pytest.mark.parametrize("src,tgt_kw,types", [
    (TINY_MHA, dict(n_heads=1, n_kv_heads=1, n_layers=2, intermediate_size=2, d_model=4),
     ["layer", "head", "intermediate", "hidden"]),
    (TINY_GQA, dict(n_heads=2, n_kv_heads=1, n_layers=1, intermediate_size=2, d_model=4),
     ["layer", "kv_group", "intermediate", "hidden"]),
    (TINY_GQA, dict(n_heads=2, n_kv_heads=2, intermediate_size=3), ["query_head", "intermediate"]),
])
def test_lagrangian_and_gradients_match_the_original_per_row_formula(src, tgt_kw, types):
    """Value and gradients (log_alphas and both multipliers) against the brute-force original, on random
    log-alphas, for every mask type; fp32 module vs fp64 loops: 1e-5 relative."""
    tgt = src.replace(**tgt_kw)
    l0 = L0Module(src, tgt, lagrangian_warmup_steps=10)
    _randomize(l0, 3)
    lam = {}
    with torch.no_grad():
        for i, n in enumerate(l0.mask_types):
            lam[n] = (0.3 + i, -0.7 + 0.5 * i)
            l0.lambdas(n)[0].fill_(lam[n][0])
            l0.lambdas(n)[1].fill_(lam[n][1])
    assert l0.mask_types == types
    targets = {n: l0.specs[n].final_target_sparsity * 0.4 for n in l0.mask_types}  # step 4 of a 10-step warm-up
    ours = l0.lagrangian(step=4)
    ours.backward()
    las = {n: l0.log_alpha(n).detach().double().clone().requires_grad_(True) for n in l0.mask_types}
    lam_t = {n: (torch.tensor(a, dtype=torch.float64, requires_grad=True),
                 torch.tensor(b, dtype=torch.float64, requires_grad=True)) for n, (a, b) in lam.items()}
    ref = _original_lagrangian(las, lam_t, targets)
    ref.backward()
    assert ours.dim() == 0 and float(ours) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)
    for n in l0.mask_types:
        torch.testing.assert_close(l0.log_alpha(n).grad.double(), las[n].grad, rtol=1e-5, atol=1e-7, msg=n)
        for i in range(2):
            assert float(l0.lambdas(n)[i].grad) == pytest.approx(float(lam_t[n][i].grad), rel=1e-5, abs=1e-7), n


def test_quadratic_term_penalises_rows_that_drift_apart():
    """Two layers at t + 0.2 and t - 0.2: the mean is on target, the per-row penalty is not zero."""
    tgt = TINY_MHA.replace(intermediate_size=2)
    l0 = L0Module(TINY_MHA, tgt, ["intermediate"], lagrangian_warmup_steps=0)
    t = l0.specs["intermediate"].final_target_sparsity
    q = (2 / 3) * math.log(0.1 / 1.1)
    with torch.no_grad():  # rows 0, 1, 2 at sparsity t + 0.2, t - 0.2, t: P(z != 0) = 1 - s per unit
        for r, s in enumerate((t + 0.2, t - 0.2, t)):
            l0.log_alpha("intermediate")[r].fill_(math.log(1 - s) - math.log(s) + q)
        l0.lambdas("intermediate")[1].fill_(1.0)
    rows = l0.expected_sparsity_per_row()["intermediate"]
    assert torch.allclose(rows, torch.tensor([t + 0.2, t - 0.2, t]), atol=1e-5)
    assert float(l0.lagrangian()) == pytest.approx((0.04 + 0.04 + 0) / 3, rel=1e-4)


def _pruning_setup(shape, tgt, warmup=1):
    torch.manual_seed(0)
    l0 = L0Module(shape, tgt, lagrangian_warmup_steps=warmup, seed=0)
    model = ComposerLlama(ModelConfig(shape), l0=l0)
    l0.set_step(10 * warmup)  # warm-up over: full target sparsity, s ~ 0.002 < t
    return model, l0


@pytest.mark.parametrize("opt_name", ["torch_adamw", "composer_decoupled_adamw"])
def test_gradient_signs_through_optimizer_step(opt_name):
    """lambda_1 moves in the direction of (s - t) (ascent), lambda_2 grows, and the model and
    log_alpha step descends the loss."""
    shape = ModelShape(d_model=16, n_heads=4, n_kv_heads=2, head_dim=4, n_layers=2, intermediate_size=16,
                       vocab_size=32)
    tgt = shape.replace(d_model=8, n_heads=1, n_kv_heads=1, n_layers=1, intermediate_size=8)
    model, l0 = _pruning_setup(shape, tgt)
    assert set(l0.mask_types) == {"layer", "kv_group", "query_head", "intermediate", "hidden"}
    groups = pruning_param_groups(model, lr=1e-2, lag_lr=0.1)
    if opt_name == "torch_adamw":
        opt = torch.optim.AdamW(groups, lr=1e-2)
    else:
        from composer.optim import DecoupledAdamW
        opt = DecoupledAdamW(groups, lr=1e-2)
    batch = {"input_ids": torch.randint(0, 32, (2, 8))}

    def loss_with_fixed_sample():
        torch.manual_seed(123)  # same hard-concrete sample before and after the step
        out = model(batch)
        return model.loss(out, batch)["ce_loss"] + out["lagrangian"], out["lagrangian"]

    # step 1: lambdas start at 0, so only they and the model move; s < t everywhere
    s_minus_t = {n: float(l0.expected_sparsity()[n]) - l0.target_sparsity()[n] for n in l0.mask_types}
    assert all(v < 0 for v in s_minus_t.values())
    total, _ = loss_with_fixed_sample()
    opt.zero_grad()
    total.backward()
    opt.step()
    l0.clamp_()
    for n in l0.mask_types:
        l1, l2 = l0.lambdas(n)
        assert float(l1) < 0, f"lambda_1_{n} must follow the sign of s - t < 0"
        assert float(l2) > 0, f"lambda_2_{n} must grow ((s - t)^2 >= 0)"

    # step 2: with lambda_1 < 0 the penalty pushes sparsity up; the descent on log_alpha must do so,
    # and the model/log_alpha step must lower the (fixed-sample) loss at fixed lambdas
    es_before = {n: float(v) for n, v in l0.expected_sparsity().items()}
    total, _ = loss_with_fixed_sample()
    opt.zero_grad()
    total.backward()
    lambdas_before = [p.detach().clone() for p in l0.lambda_params()]
    opt.step()
    l0.clamp_()
    es_after = {n: float(v) for n, v in l0.expected_sparsity().items()}
    for n in l0.mask_types:
        assert es_after[n] > es_before[n], f"expected sparsity of {n} must rise towards the target"
    with torch.no_grad():  # evaluate the new model/log_alpha with the *old* lambdas
        for p, old in zip(l0.lambda_params(), lambdas_before):
            p.copy_(old)
        after, _ = loss_with_fixed_sample()
    assert float(after) < float(total)


def test_param_groups_partition_and_signs():
    shape = ModelShape(d_model=8, n_heads=2, n_kv_heads=2, head_dim=4, n_layers=2, intermediate_size=8, vocab_size=16,
                       tie_embeddings=True)
    model, l0 = _pruning_setup(shape, shape.replace(n_layers=1, intermediate_size=4))
    groups = pruning_param_groups(model, lr=1e-4, lag_lr=1.0, weight_decay=0.1)
    assert [g["lr"] for g in groups] == [1e-4, 1.0, -1.0]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    ids = [[id(p) for p in g["params"]] for g in groups]
    all_ids = [i for g in ids for i in g]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))  # tied weight counted once
    assert set(ids[1]) == {id(p) for p in l0.log_alpha_params()}
    assert set(ids[2]) == {id(p) for p in l0.lambda_params()}
    with pytest.raises(ValueError, match="lag_lr"):
        pruning_param_groups(model, 1e-4, -1.0)
    with pytest.raises(ValueError, match="no L0 module"):
        pruning_param_groups(ComposerLlama(ModelConfig(shape)), 1e-4, 1.0)


# ---- config, clamp, FSDP hook, stats ----------------------------------------------------------------------
def test_config_dict_round_trip_and_state_dict():
    tgt = TINY_GQA.replace(d_model=4, n_heads=2, n_kv_heads=1, intermediate_size=2)
    l0 = L0Module(TINY_GQA, tgt, ["head", "intermediate", "hidden"], lagrangian_warmup_steps=7, init_mean=3.0, seed=1)
    d = l0.config_dict()
    assert d == {"target": tgt.to_dict(), "modules": ["head", "intermediate", "hidden"],
                 "lagrangian_warmup_steps": 7, "eval_target_model": False, "init_mean": 3.0}
    l1 = L0Module.from_config_dict(TINY_GQA, d, eval_target_model=True)
    assert l1.eval_target_model and l1.specs == l0.specs
    _randomize(l0, 2)
    l1.load_state_dict(l0.state_dict(), strict=True)
    assert torch.equal(l1.deterministic_masks(True).heads, l0.deterministic_masks(True).heads)
    with pytest.raises(ValueError, match="unknown pruning config keys"):
        L0Module.from_config_dict(TINY_GQA, {**d, "bogus": 1})


def test_seed_makes_init_reproducible_and_clamp():
    tgt = TINY_MHA.replace(n_heads=1, n_kv_heads=1)
    a = L0Module(TINY_MHA, tgt, ["head"], init_mean=0.0, seed=3)
    b = L0Module(TINY_MHA, tgt, ["head"], init_mean=0.0, seed=3)
    assert torch.equal(a.log_alpha("head"), b.log_alpha("head"))
    with torch.no_grad():
        a.log_alpha("head").fill_(50.0)
    a.clamp_()
    assert torch.allclose(a.log_alpha("head"), torch.full((3, 3), hc.LOG_ALPHA_MAX))


def test_stats_keys_and_values():
    tgt = TINY_GQA.replace(d_model=4, n_heads=1, n_kv_heads=1, n_layers=1, intermediate_size=2)
    l0 = L0Module(TINY_GQA, tgt, lagrangian_warmup_steps=10)
    st = l0.stats(5)
    for n in ("layer", "kv_group", "query_head", "intermediate", "hidden"):
        for k in ("expected_sparsity", "target_sparsity", "lambda_1", "lambda_2"):
            assert isinstance(st[f"{k}/{n}"], float)
    assert st["target_sparsity/layer"] == pytest.approx(0.25)
    assert st["expected_params"] == pytest.approx(float(l0.expected_params()))
    assert st["target_params"] == tgt.n_prunable_params()
    assert isinstance(l0.deterministic_masks(True), StructureMasks)


def test_training_samples_are_a_function_of_seed_step_and_microbatch():
    """Resume-exact noise: the same (seed, step, microbatch) gives the same sample whatever the global
    RNG did in between; microbatches, steps and seeds differ; the global RNG is not consumed."""
    tgt = TINY_MHA.replace(d_model=4, n_heads=2, n_kv_heads=2, n_layers=2, intermediate_size=2)
    a, b, c = (L0Module(TINY_MHA, tgt, seed=s).train() for s in (5, 5, 6))
    for m in (a, b, c):
        _randomize(m, 0, scale=0.5)  # logits near 0: samples spread over (0, 1)

    def flat(masks):
        return torch.cat([v.flatten() for _, v in masks.items()])

    a.set_step(7)
    first, second = a()[0], a()[0]  # two microbatches of step 7
    assert not torch.equal(flat(first), flat(second))
    torch.manual_seed(999)
    rng_before = torch.random.get_rng_state()
    b.set_step(7)
    again = b()[0]
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for k, v in first.items():
        assert torch.equal(getattr(again, k), v)
    b.set_step(8)
    assert not torch.equal(flat(b()[0]), flat(first))
    c.set_step(7)
    assert not torch.equal(flat(c()[0]), flat(first))
