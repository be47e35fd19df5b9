"""Distillation and the mixing baselines (the loss itself against a brute-force KL: tests/test_losses.py):
alpha 0 = the LM-only run bit for bit, a frozen teacher without optimizer state, teacher-gap references =
the teacher's eval losses, stratified proportions = the domains' token shares."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny_data import DOMAINS, make_tiny_data, tiny_model_dirs

from llmshearing.convert.checkpoint import load_model, save_domain_weights
from llmshearing.training.config import load_config, resolve_proportions
from llmshearing.training.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
CPT = REPO / "yamls/tiny/cpt.yaml"


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("distill")
    data = make_tiny_data(tmp / "tiny")
    teacher, student = tiny_model_dirs(data, tmp)
    save_domain_weights(student, {"code": 0.4, "legal": 0.3, "prose": 0.3}, source="test", source_model=str(teacher))
    return {"tmp": tmp, "data": data, "teacher": teacher, "student": student}


def _run(setup, name: str, extra: list[str]):
    cfg = load_config(CPT, [f"data.root={setup['data']}", f"model.path={setup['student']}", "max_duration=6ba",
                            "eval_interval=3ba", "save_interval=6ba", "loggers.file=false",
                            f"save_folder={setup['tmp']}/{name}", *extra])
    trainer = build_trainer(cfg)
    trainer.fit()
    return trainer


def test_alpha_zero_reproduces_the_lm_only_run_bit_for_bit(setup):
    a = _run(setup, "lm", [])
    b = _run(setup, "alpha0", ["distill={alpha: 0.0}"])  # teacher: the source recorded by prune-export
    wa, wb = a.state.model.state_dict(), b.state.model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    a.close()
    b.close()


def test_teacher_is_frozen_without_optimizer_state_and_changes_the_run(setup):
    tr = _run(setup, "kd", ["distill={alpha: 0.5, temperature: 2.0}"])
    cb = next(c for c in tr.state.callbacks if type(c).__name__ == "DistillationCallback")
    before = load_model(setup["teacher"]).state_dict()
    after = cb.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # never changes
    assert all(not p.requires_grad and p.grad is None for p in cb.teacher.parameters())
    opt = tr.state.optimizers[0]
    teacher_ids = {id(p) for p in cb.teacher.parameters()}
    assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not teacher_ids & {id(p) for p in opt.state}
    assert not any(k.startswith("teacher") for k in tr.state.model.state_dict())  # not in checkpoints
    lm = load_model(setup["student"]).state_dict()
    kd = {k.removeprefix("model."): v for k, v in tr.state.model.state_dict().items()}
    assert any(not torch.equal(lm[k], kd[k]) for k in lm)  # it trained
    tr.close()


def test_teacher_gap_references_are_the_teachers_eval_losses(setup):
    """Reference losses = the teacher's token-mean loss on each domain's eval rows, computed here with
    plain torch over the rows the loader would evaluate (the first 32 of each domain)."""
    tr = _run(setup, "gap", ["distill={alpha: 0.5}", "dynamic_loading.update=teacher_gap",
                             "dynamic_loading.target_offsets=[0.1,0.0,-0.1]"])
    cb = next(c for c in tr.state.callbacks if type(c).__name__ == "DynamicLoadingCallback")
    from streaming import StreamingDataset

    teacher = load_model(setup["teacher"]).eval()
    for i, dom in enumerate(DOMAINS):
        sds = StreamingDataset(local=str(setup["data"] / "eval" / dom), batch_size=1, shuffle=False)
        n = min(32, sds.num_samples)
        x = torch.stack([torch.from_numpy(sds.get_item(j)["tokens"].astype("int64")) for j in range(n)])
        with torch.no_grad():
            logits = teacher(x)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        assert cb.teacher_losses[dom] == pytest.approx(float(ce), abs=1e-5)  # fp32 sums in another order
        assert cb.target_losses[i] == pytest.approx(float(ce) + [0.1, 0.0, -0.1][i], abs=1e-5)
    ckpt = torch.load(setup["tmp"] / "gap" / "latest-rank0.pt", weights_only=False)
    assert ckpt["state"]["callbacks"]["DynamicLoadingCallback"]["teacher_losses"] == cb.teacher_losses
    tr.close()


def test_stratified_proportions_are_the_token_shares(setup):
    cfg = load_config(CPT, [f"data.root={setup['data']}", f"model.path={setup['student']}",
                            "dynamic_loading.update=stratified"])
    m = json.loads((setup["data"] / "manifest.json").read_text())
    tokens = [m["splits"]["train"][d]["tokens"] for d in DOMAINS]
    assert resolve_proportions(cfg) == pytest.approx([t / sum(tokens) for t in tokens], abs=1e-12)
    tr = _run(setup, "strat", ["dynamic_loading.update=stratified"])
    hist = tr.state.train_dataloader.batch_sampler.proportion_history
    assert len(hist) == 1 and hist[0][1] == pytest.approx([t / sum(tokens) for t in tokens])  # never updated
    assert math.isclose(sum(hist[0][1]), 1.0)
    tr.close()
