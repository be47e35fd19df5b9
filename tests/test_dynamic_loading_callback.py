"""DynamicLoadingCallback: the update rule by hand, config validation, event wiring, and a tiny
real Composer run that checkpoints mid-training and resumes onto exactly the same batches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmshearing.callbacks.dynamic_loading import DynamicLoadingCallback, doremi_update
from llmshearing.data.sampler import DynamicBatchSampler


# ----------------------------------------------------------------------------- update rule
def test_doremi_update_matches_hand_computation_clipped():
    w, loss, ref = [0.5, 0.3, 0.2], [2.0, 1.5, 3.0], [1.8, 1.6, 2.5]
    # Delta = max(loss - ref, 0) = [0.2, 0, 0.5]; alpha_i ∝ w_i * exp(Delta_i)
    a = [0.5 * math.exp(0.2), 0.3 * math.exp(0.0), 0.2 * math.exp(0.5)]
    s = sum(a)
    c = 1e-4
    expect = [(1 - c) * x / s + c / 3 for x in a]
    got = doremi_update(w, loss, ref, eta=1.0, smoothing=c, clip_negative=True)
    assert np.allclose(got, expect, rtol=0, atol=1e-12)
    assert got.dtype == np.float64 and abs(got.sum() - 1.0) < 1e-12
    # written out: 0.5e^0.2 = 0.6107014, 0.3, 0.2e^0.5 = 0.3297443, sum 1.2404456
    assert np.allclose(got, [0.4923083, 0.2418577, 0.2658340], atol=1e-6)


def test_doremi_update_raw_difference_and_eta():
    w, loss, ref = [0.5, 0.3, 0.2], [2.0, 1.5, 3.0], [1.8, 1.6, 2.5]
    eta, c = 2.0, 0.0
    a = [0.5 * math.exp(2 * 0.2), 0.3 * math.exp(2 * -0.1), 0.2 * math.exp(2 * 0.5)]
    expect = [x / sum(a) for x in a]
    got = doremi_update(w, loss, ref, eta=eta, smoothing=c, clip_negative=False)
    assert np.allclose(got, expect, rtol=0, atol=1e-12)


def test_doremi_update_edge_cases():
    # all gaps <= 0 with clipping: only smoothing moves the weights
    got = doremi_update([0.7, 0.3], [1.0, 1.0], [2.0, 2.0], smoothing=0.1)
    assert np.allclose(got, [0.9 * 0.7 + 0.05, 0.9 * 0.3 + 0.05])
    # a zero weight stays zero without smoothing and revives with it
    assert doremi_update([1.0, 0.0], [3.0, 9.0], [1.0, 1.0], smoothing=0.0)[1] == 0.0
    assert doremi_update([1.0, 0.0], [3.0, 9.0], [1.0, 1.0], smoothing=1e-4)[1] == pytest.approx(0.5e-4)
    with pytest.raises(ValueError, match="finite"):
        doremi_update([0.5, 0.5], [float("nan"), 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="one value per domain"):
        doremi_update([0.5, 0.5], [1.0], [1.0, 1.0])


@pytest.mark.parametrize("kwargs, key", [
    (dict(domains=["a", "a"], target_losses=[1, 2]), "domains"),
    (dict(domains=["a", "b"], target_losses={"a": 1.0}), "target_losses"),
    (dict(domains=["a", "b"], target_losses=[1.0]), "target_losses"),
    (dict(domains=["a", "b"], target_losses=[1.0, float("inf")]), "target_losses"),
    (dict(domains=["a", "b"], target_losses=[1, 2], eta=0), "eta"),
    (dict(domains=["a", "b"], target_losses=[1, 2], smoothing=1.0), "smoothing"),
    (dict(domains=["a", "b"], target_losses=[1, 2], smoothing=-0.1), "smoothing"),
    (dict(domains=["a", "b"], target_losses=[1, 2], update="bandit"), "update"),
])
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}"):
        DynamicLoadingCallback(**kwargs)


# ----------------------------------------------------------------------------- event wiring (stubs)
class _Metric:
    def __init__(self, v: float) -> None:
        self.v = v

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.v)


class _Logger:
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def log_metrics(self, m: dict[str, float]) -> None:
        self.logged.append(dict(m))


def _fake_state(sampler, losses: dict[str, float], batch: int):
    return SimpleNamespace(train_dataloader=SimpleNamespace(batch_sampler=sampler), dataloader_label=None,
                           eval_metrics={d: {"LanguageCrossEntropy": _Metric(v)} for d, v in losses.items()},
                           timestamp=SimpleNamespace(batch=batch))


@pytest.mark.parametrize("update", ["doremi", "constant"])
def test_callback_pushes_weights_to_sampler(update):
    domains, ref = ["cc", "book"], {"cc": 2.0, "book": 2.5}
    sampler = DynamicBatchSampler([100, 100], [0.8, 0.2], 10, seed=0, domains=domains, on_exhausted="repeat")
    it = iter(sampler)
    for _ in range(3):
        next(it)
    cb = DynamicLoadingCallback(domains, ref, update=update, eta=1.0, smoothing=0.0)
    losses = {"cc": 2.1, "book": 3.0}
    state, logger = _fake_state(sampler, losses, batch=3), _Logger()
    cb.fit_start(state, logger)
    cb.batch_end(state, logger)
    assert logger.logged[-1] == {"data/weight/cc": 0.8, "data/weight/book": 0.2}
    cb.eval_before_all(state, logger)
    for d in ["cc", "book", "not-a-domain"]:
        state.dataloader_label = d
        cb.eval_end(state, logger)
    cb.eval_after_all(state, logger)
    a = [0.8 * math.exp(0.1), 0.2 * math.exp(0.5)]
    expect = [x / sum(a) for x in a] if update == "doremi" else [0.8, 0.2]
    assert np.allclose(sampler.proportions, expect)
    assert np.allclose(cb.weights, expect)
    assert logger.logged[-1]["data/loss_gap/book"] == pytest.approx(0.5)
    assert logger.logged[-1]["data/eval_loss/cc"] == pytest.approx(2.1)
    if update == "doremi":
        assert sampler.proportion_history[-1][0] == 3 and cb.num_updates == 1
    else:
        assert len(sampler.proportion_history) == 1


def test_callback_skips_round_with_missing_domain():
    sampler = DynamicBatchSampler([10, 10], [0.5, 0.5], 2, domains=["a", "b"])
    cb = DynamicLoadingCallback(["a", "b"], [1.0, 1.0])
    state, logger = _fake_state(sampler, {"a": 5.0}, batch=0), _Logger()
    cb.eval_before_all(state, logger)
    state.dataloader_label = "a"
    cb.eval_end(state, logger)
    cb.eval_after_all(state, logger)
    assert sampler.proportions.tolist() == [0.5, 0.5]


def test_callback_refuses_other_loader_or_domain_order():
    cb = DynamicLoadingCallback(["a", "b"], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="build_train_dataloader"):
        cb.fit_start(SimpleNamespace(train_dataloader=SimpleNamespace(batch_sampler=None, dataset=None)), _Logger())
    sampler = DynamicBatchSampler([10, 10], [0.5, 0.5], 2, domains=["b", "a"])
    with pytest.raises(ValueError, match="domains"):
        cb.fit_start(_fake_state(sampler, {}, 0), _Logger())


# ----------------------------------------------------------------------------- real Composer run
DOMS, SEQ, VOCAB, GB = ["x", "y"], 8, 64, 4


def _write(root) -> None:
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("eval", 8)):
        for d_idx, d in enumerate(DOMS):
            cols = {"tokens": f"ndarray:uint16:{SEQ}", "domain": "str"}
            with MDSWriter(out=str(root / split / d), columns=cols) as w:
                for i in range(n):
                    # domain y is high-entropy (hard), x is a constant sequence (easy)
                    t = rng.integers(0, VOCAB, SEQ) if d_idx else np.full(SEQ, 3)
                    w.write({"tokens": t.astype(np.uint16), "domain": d})


class _TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.out = torch.nn.Linear(16, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def _composer_model():
    from composer.metrics import LanguageCrossEntropy
    from composer.models import ComposerModel

    class M(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = _TinyLM()
            self.metric = LanguageCrossEntropy()

        def forward(self, batch):
            return self.net(batch["input_ids"])

        def loss(self, outputs, batch):
            return torch.nn.functional.cross_entropy(outputs[:, :-1].reshape(-1, VOCAB),
                                                     batch["input_ids"][:, 1:].reshape(-1))

        def get_metrics(self, is_train=False):
            return {} if is_train else {"LanguageCrossEntropy": self.metric}

        def update_metric(self, batch, outputs, metric):
            metric.update(outputs[:, :-1].reshape(-1, VOCAB).contiguous(),
                          batch["input_ids"][:, 1:].reshape(-1).contiguous())

    torch.manual_seed(0)
    return M()


def _trainer(root, save_folder, load_path=None, seen=None):
    from composer import Callback, Evaluator, Trainer
    from composer.optim import DecoupledSGDW

    from llmshearing.data.dynamic import build_eval_dataloader, build_train_dataloader

    class Record(Callback):
        def after_dataloader(self, state, logger):
            seen[int(state.timestamp.batch)] = state.batch["input_ids"].clone()

    train = build_train_dataloader(root, DOMS, [0.9, 0.1], GB, SEQ, seed=11, num_workers=2, on_exhausted="repeat")
    eval_dls = [build_eval_dataloader(root, d, 4, SEQ, domain_index=i) for i, d in enumerate(DOMS)]
    evals = [Evaluator(label=d, dataloader=dl, metric_names=["LanguageCrossEntropy"]) for d, dl in zip(DOMS, eval_dls)]
    model = _composer_model()
    cb = DynamicLoadingCallback(DOMS, {"x": 0.0, "y": 0.0}, eta=1.0)
    trainer = Trainer(model=model, train_dataloader=train, eval_dataloader=evals, eval_interval="2ba",
                      max_duration="8ba", device_train_microbatch_size=GB,  # loader has no batch_size
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.1),
                      callbacks=[cb, Record()], save_folder=str(save_folder), save_interval="3ba",
                      save_overwrite=True, load_path=load_path, device="cpu", progress_bar=False,
                      log_to_console=False, loggers=[])
    trainer.loaders = [train, *eval_dls]  # closed by _close
    return trainer, train.batch_sampler, cb


def _close(trainer) -> None:
    trainer.close()
    for dl in trainer.loaders:
        dl.dataset.close()


def test_composer_checkpoint_resumes_same_batches_and_weights(tmp_path):
    root = tmp_path / "data"
    _write(root)
    seen_full: dict[int, torch.Tensor] = {}
    t1, s1, cb1 = _trainer(root, tmp_path / "ck", seen=seen_full)
    t1.fit()
    # updates at batches 2, 4, 6, 8 moved weight toward the harder domain y
    assert s1.proportions[1] > 0.1 and cb1.num_updates == 4
    hist_full = s1.proportion_history
    _close(t1)

    seen_resumed: dict[int, torch.Tensor] = {}
    t2, s2, cb2 = _trainer(root, tmp_path / "ck2", load_path=str(tmp_path / "ck" / "ep0-ba3-rank0.pt"),
                           seen=seen_resumed)
    assert s2.next_batch == 3  # Composer handed the consumed count to the dataset state
    assert cb2.num_updates == 1
    t2.fit()
    assert sorted(seen_resumed) == [3, 4, 5, 6, 7]
    for b in seen_resumed:
        assert torch.equal(seen_resumed[b], seen_full[b]), b
    assert s2.proportion_history[:2] == hist_full[:2]  # restored from the checkpoint exactly
    assert s2.proportion_history == hist_full, (s2.proportion_history, hist_full)  # same later updates
    _close(t2)


def test_constant_update_needs_no_reference_losses():
    """update='constant' (the GQA example yaml) runs without target losses; doremi refuses to."""
    from llmshearing.callbacks.dynamic_loading import DynamicLoadingCallback

    DynamicLoadingCallback(["a", "b"], None, update="constant")
    with pytest.raises(ValueError, match="target_losses: required"):
        DynamicLoadingCallback(["a", "b"], None, update="doremi")
