"""Real multi-process training: 2 ranks on CPU (gloo) through the `composer` launcher.

Every run below is `composer -n N tests/_mp_driver.py OUT yamls/tiny/<stage>.yaml ...`, i.e.
train.py's `main` with a recorder callback (tests/_mp_driver.py); nothing passes a world size by
hand. The runs are made once per module and shared by the tests:

    prune2   2 ranks x micro-batch 8, workers 2       cpt2   2 ranks x micro-batch 8, workers 2
    prune1   1 rank  x micro-batch 8 (2 per step)     cpt1   1 rank  x micro-batch 16
    killed   prune2 with rank 1 SIGKILLed at the start of batch 6 (checkpoint at 4), then the same
             command again (autoresume)

    distill2 / distill1 / distill_killed   continued pre-training distilled from the source, 2 / 1 ranks
    fsdp_*   the same under FSDP2 (see FSDP_RUNS; *_full: full checkpoints, no activation checkpointing)

all with the same seed, global batch 16, 8 batches, an evaluation before the first step
(`eval_first`) and every 4 batches over 7 rows per domain (odd: the rows do not divide by 2).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _tiny_data import DOMAINS, driver_env, make_tiny_data, tiny_model_dirs

from llmshearing.convert.checkpoint import load_model, save_domain_weights
from llmshearing.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
PRUNE = REPO / "yamls/tiny/prune.yaml"
CPT = REPO / "yamls/tiny/cpt.yaml"
COMPOSER = Path(sys.executable).parent / "composer"
EVAL_ROWS = 7
HANG_GUARD_S = 600  # a hang guard: a normal 2-rank run takes ~20-40 s on 2 busy cores

pytestmark = pytest.mark.multiprocess

# name: (stage, ranks, micro-batch per rank)
RUNS = {"prune2": ("prune", 2, 8), "prune1": ("prune", 1, 8), "cpt2": ("cpt", 2, 8), "cpt1": ("cpt", 1, 16),
        "killed": ("prune", 2, 8), "distill2": ("cpt", 2, 8), "distill_killed": ("cpt", 2, 8),
        "distill1": ("cpt", 1, 16),
        "fsdp_prune2": ("prune", 2, 8), "fsdp_prune2_full": ("prune", 2, 8), "fsdp_prune2_killed": ("prune", 2, 8),
        "fsdp_cpt2": ("cpt", 2, 8), "fsdp_cpt2_full": ("cpt", 2, 8), "fsdp_distill2": ("cpt", 2, 8)}
# FSDP2 runs: sharded checkpoints with activation checkpointing (the section's default), and full
# checkpoints without it, so the two also compare activation checkpointing on vs off
FSDP_RUNS = {"fsdp_prune2": ["fsdp.state_dict_type=sharded"], "fsdp_cpt2": ["fsdp.state_dict_type=sharded"],
             "fsdp_distill2": ["fsdp.state_dict_type=sharded"],
             "fsdp_prune2_full": ["fsdp.state_dict_type=full", "fsdp.activation_checkpointing=false"],
             "fsdp_cpt2_full": ["fsdp.state_dict_type=full", "fsdp.activation_checkpointing=false"]}


class Runs:
    """Launches the runs lazily (each once) and keeps their outputs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = make_tiny_data(tmp / "tiny")
        self.src_dir, self.cpt_dir = tiny_model_dirs(self.data, tmp)
        # as prune-export leaves it: the CPT yaml starts from this mixture (data.proportions: from_model)
        save_domain_weights(self.cpt_dir, {"code": 0.5, "legal": 0.25, "prose": 0.25}, source="test")
        self._done: dict[str, dict] = {}

    def overrides(self, stage: str, save: Path, nproc: int, micro: int) -> list[str]:
        common = [f"data.root={self.data}", "max_duration=8ba", "save_interval=4ba", "eval_interval=4ba",
                  "global_train_batch_size=16", f"device_train_microbatch_size={micro}", "data.num_workers=2",
                  f"data.eval_rows_per_domain={EVAL_ROWS}", "device_eval_batch_size=2", "eval_first=true",
                  "loggers.file=false", "loggers.console_interval=4ba", f"save_folder={save}"]
        if stage == "prune":
            return common + [f"model.path={self.src_dir}", "model.init=null"]
        return common + [f"model.path={self.cpt_dir}"]

    def launch(self, nproc: int, stage: str, name: str, micro: int, env: dict | None = None):
        out, save = self.tmp / name / "rec", self.tmp / name / "ckpt"
        extra = list(FSDP_RUNS.get(name.removesuffix("_killed"), ()))
        if name.startswith(("distill", "fsdp_distill")):  # continued pre-training distilled from the pruning source
            extra += [f"distill={{teacher: {self.src_dir}, alpha: 0.5, temperature: 2.0}}",
                      "dynamic_loading.update=teacher_gap"]
        cmd = [str(COMPOSER), "-n", str(nproc), "tests/_mp_driver.py", str(out), str(PRUNE if stage == "prune" else CPT),
               *self.overrides(stage, save, nproc, micro), *extra]
        p = subprocess.run(cmd, cwd=REPO, env=driver_env(env), capture_output=True, text=True, timeout=HANG_GUARD_S)
        return p, out, save

    def get(self, name: str) -> dict:
        if name in self._done:
            return self._done[name]
        stage, nproc, micro = RUNS[name]
        r: dict = {}
        if name.endswith("killed"):
            p, _, save = self.launch(nproc, stage, name, micro, env={"DRIVER_KILL_AT": "6"})
            r["first"] = p
            r["ckpt_after_kill"] = sorted(x.name for x in save.glob("ep*-ba*"))
        p, out, save = self.launch(nproc, stage, name, micro)
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        r.update(proc=p, save=save, recs=[json.loads((out / f"rank{i}.json").read_text()) for i in range(nproc)],
                 ckpt=load_checkpoint(save / "latest-rank0.pt", self.tmp / name / "as_torch_save.pt"))
        self._done[name] = r
        return r


def load_checkpoint(path: Path, scratch: Path) -> dict:
    """A Composer checkpoint as one torch.save dict, read with torch's own tools only (not our reader):
    a full checkpoint file directly, a sharded folder through torch.distributed.checkpoint's converter."""
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, scratch)
        path = scratch
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("mp"))


def _model_state(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in ckpt["state"]["model"].items()}


def _loader_state(ckpt: dict) -> dict:
    return ckpt["state"]["dataset_state"]["train"]


# ------------------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("name", ["prune2", "cpt2"])
def test_two_rank_run_with_workers_exits_zero_and_saves(runs, name):
    r = runs.get(name)
    assert (r["save"] / "latest-rank0.pt").exists()
    ts = r["ckpt"]["state"]["timestamp"]["Timestamp"]
    assert (ts["batch"], ts["sample"]) == (8, 8 * 16)  # samples counted over both ranks
    assert [e["batch"] for e in r["recs"][0]["evals"]] == [0, 4, 8]  # eval_first, then every 4 batches
    if name == "prune2":
        assert sorted(p.name for p in (r["save"] / "masks").glob("*.pt")) == ["masks_ba0.pt", "masks_ba4.pt",
                                                                           "masks_ba8.pt"]


# ------------------------------------------------------------------------------------ data sharding
@pytest.mark.parametrize("two,one", [("prune2", "prune1"), ("cpt2", "cpt1")])
def test_rank_slices_are_disjoint_and_make_the_one_rank_global_batch(runs, two, one):
    r2, r1 = runs.get(two)["recs"], runs.get(one)["recs"]
    assert sorted(r1[0]["ids"], key=int) == [str(b) for b in range(8)]
    for b, glob in r1[0]["ids"].items():
        a, c = r2[0]["ids"][b], r2[1]["ids"][b]
        assert len(a) == len(c) == 8 and len(glob) == 16
        assert not set(a) & set(c), f"batch {b}: ranks share samples {set(a) & set(c)}"
        assert a + c == glob, f"batch {b}: rank slices {a} + {c} != 1-rank batch {glob}"


# ---------------------------------------------------------------------- same weights, any world size
def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a - init|| over all weights: the disagreement of two runs as a fraction of how far
    training moved the weights. Summation-order noise (fp32 all-reduce vs local accumulation) keeps it
    at ~3e-6 (0 for pruning here); wrong data moves it to ~0.5 (measured with both ranks reading
    rank 0's slice), five orders of magnitude apart."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in init)
    den = sum(float((a[k].double() - init[k].double()).pow(2).sum()) for k in init)
    return (num / den) ** 0.5


@pytest.mark.parametrize("two,one,init_dir", [("prune2", "prune1", "src_dir"), ("cpt2", "cpt1", "cpt_dir")])
def test_two_ranks_end_at_the_weights_of_one_rank_on_the_same_global_batch(runs, two, one, init_dir):
    a, b = _model_state(runs.get(two)["ckpt"]), _model_state(runs.get(one)["ckpt"])
    assert a.keys() == b.keys()
    init = {f"model.{k}": v for k, v in load_model(getattr(runs, init_dir)).state_dict().items()}
    gap = _relative_gap(a, b, init)
    print(f"{two} vs {one}: relative weight gap {gap:.2e}")
    assert gap < 1e-4, f"{two} vs {one}: relative weight gap {gap:.2e}"  # noise ~3e-6, wrong data ~0.5
    for k in a:
        if k.startswith("l0."):  # masks and multipliers (not in `init`): absolute, same noise argument
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    # the domain weights of the two runs followed the same updates
    pa, pb = _loader_state(runs.get(two)["ckpt"]), _loader_state(runs.get(one)["ckpt"])
    for (ba, wa), (bb, wb) in zip(pa["proportion_history"], pb["proportion_history"], strict=True):
        assert ba == bb and max(abs(x - y) for x, y in zip(wa, wb)) < 1e-6


# ------------------------------------------------------------------------------------ kill + resume
def test_killed_two_rank_run_resumes_exactly(runs):
    k, full = runs.get("killed"), runs.get("prune2")
    assert k["first"].returncode != 0, "the first launch should have died (rank 1 was killed)"
    assert k["ckpt_after_kill"] == ["ep0-ba4-rank0.pt"], k["ckpt_after_kill"]
    assert min(int(b) for b in k["recs"][0]["ids"]) == 4  # the relaunch resumed at batch 4
    a, b = _model_state(k["ckpt"]), _model_state(full["ckpt"])
    assert a.keys() == b.keys() and any(n.startswith("l0.lambda") for n in a) and any(n.startswith("l0.log_alpha") for n in a)
    for n in a:  # weights, mask logits and multipliers; 1e-6 absolute
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)
    la, lb = _loader_state(k["ckpt"]), _loader_state(full["ckpt"])
    assert la["proportion_history"] == lb["proportion_history"] and la["cursors"] == lb["cursors"]
    # and it trained on exactly the batches the uninterrupted run trained on after batch 4
    for r in range(2):
        for bi, ids in k["recs"][r]["ids"].items():
            assert ids == full["recs"][r]["ids"][bi]


# --------------------------------------------------------------------------------------- evaluation
def _brute_force_eval(model_dir: Path, data_root: Path) -> dict[str, float]:
    """Token-mean next-token CE over the first EVAL_ROWS rows of each domain, read with Streaming
    directly and computed with plain torch: the independent reference."""
    from streaming import StreamingDataset

    model = load_model(model_dir).eval()
    out = {}
    for dom in DOMAINS:
        sds = StreamingDataset(local=str(data_root / "eval" / dom), batch_size=1, shuffle=False)
        x = torch.stack([torch.from_numpy(sds.get_item(i)["tokens"].astype("int64")) for i in range(EVAL_ROWS)])
        with torch.no_grad():
            logits = model(x)
        out[dom] = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)))
    return out


def test_two_rank_eval_equals_one_rank_eval_of_the_same_rows(runs):
    """7 rows per domain on 2 ranks: the sampler pads rank 1 with a repeat of row 0, which Composer
    drops from the metric, so both evaluate each of the 7 rows exactly once."""
    two, one = runs.get("cpt2")["recs"], runs.get("cpt1")["recs"]
    ref = _brute_force_eval(runs.cpt_dir, runs.data)
    e2, e1 = two[0]["evals"][0], one[0]["evals"][0]
    assert e2["batch"] == e1["batch"] == 0  # eval_first: the source weights, before any step
    for dom in DOMAINS:
        print(f"eval {dom}: 2-rank {e2['losses'][dom]:.8f} 1-rank {e1['losses'][dom]:.8f} brute force {ref[dom]:.8f}")
        # fp32 summation order only: one fp32 ulp at a loss of 7 is 4.8e-7, so 2e-6 is ~4 ulps
        assert abs(e2["losses"][dom] - e1["losses"][dom]) < 2e-6, dom
        assert abs(e2["losses"][dom] - ref[dom]) < 1e-5, (dom, e2["losses"][dom], ref[dom])  # fp32, 7x127 tokens
    # every rank computed the same losses and made the same domain-weight updates, bit for bit
    assert two[0]["evals"] == two[1]["evals"]
    assert two[0]["proportion_history"] == two[1]["proportion_history"]
    # eval_first updated the mixture before the first step (in effect from batch 0), starting from the
    # mixture saved next to the cut model (from_model) with the yaml's reference losses (3.0 each)
    from llmshearing.callbacks.dynamic_loading import doremi_update

    hist = two[0]["proportion_history"]
    want = doremi_update([0.5, 0.25, 0.25], [e2["losses"][d] for d in DOMAINS], [3.0, 3.0, 3.0])
    assert hist[0][0] == 0 and hist[0][1] == pytest.approx(want.tolist(), abs=1e-12)


# ------------------------------------------------------------------------------------- mask sampling
def test_ranks_draw_independent_mask_noise_keyed_by_global_microbatch(runs):
    """Each rank samples its own masks (independent hard-concrete noise); the noise is keyed by the
    microbatch's index in the global batch, so 1 rank x 2 microbatches draws the same two samples as
    2 ranks x 1 microbatch."""
    two, one = runs.get("prune2")["recs"], runs.get("prune1")["recs"]
    m0, m1 = two[0]["masks_step1"], two[1]["masks_step1"]
    assert len(m0) == len(m1) == 1 and len(one[0]["masks_step1"]) == 2
    assert m0[0]["hidden"] != m1[0]["hidden"] and m0[0]["intermediate"] != m1[0]["intermediate"]
    assert one[0]["masks_step1"] == [m0[0], m1[0]]


# ------------------------------------------------------------------------------------------- export
def test_two_rank_checkpoints_export(runs, tmp_path):
    """prune-export and composer-to-hf read what 2-rank runs save; the HF export loads and matches."""
    import transformers

    from llmshearing.convert.hf import convert_composer_to_hf
    from llmshearing.pruning.export import export_pruned

    report = export_pruned(runs.get("prune2")["save"] / "latest-rank0.pt", tmp_path / "cut")
    target = load_config(PRUNE, [f"data.root={runs.data}"]).pruning.target
    assert {k: report["shape"][k] for k in target} == dict(target)
    convert_composer_to_hf(runs.get("cpt2")["save"] / "latest-rank0.pt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(runs.cpt_dir).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in _model_state(runs.get("cpt2")["ckpt"]).items()})
    x = torch.randint(0, ours.config.shape.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4  # fp32, random-init-scale weights


# ------------------------------------------------------------------------------------- distillation
def test_two_rank_distillation_with_teacher_gap_resumes_exactly(runs):
    """Continued pre-training distilled from the pruning source (alpha 0.5, T 2) with teacher-gap
    mixing on 2 ranks: it runs, both ranks hold the same teacher references, and a run killed after
    its first checkpoint resumes to exactly the uninterrupted run's weights and mixture (1e-6)."""
    full, k = runs.get("distill2"), runs.get("distill_killed")
    cb = full["ckpt"]["state"]["callbacks"]["DynamicLoadingCallback"]
    assert set(cb["teacher_losses"]) == set(DOMAINS)
    assert full["recs"][0]["proportion_history"] == full["recs"][1]["proportion_history"]
    assert k["first"].returncode != 0 and k["ckpt_after_kill"] == ["ep0-ba4-rank0.pt"]
    a, b = _model_state(k["ckpt"]), _model_state(full["ckpt"])
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)
    assert _loader_state(k["ckpt"])["proportion_history"] == _loader_state(full["ckpt"])["proportion_history"]
    assert k["ckpt"]["state"]["callbacks"]["DynamicLoadingCallback"]["teacher_losses"] == cb["teacher_losses"]


# ------------------------------------------------------------------------------------------- FSDP2
# The same runs sharded with FSDP2 (`fsdp.*` on the command line turns it on): every parameter a
# DTensor split over the 2 ranks, rank 0 alone reading model.path, Composer writing the checkpoints.
def test_fsdp_ranks_hold_half_of_every_weight(runs):
    recs = runs.get("fsdp_prune2")["recs"]
    p0, p1 = recs[0]["params"], recs[1]["params"]
    assert p0.keys() == p1.keys() and any(n.startswith("l0.") for n in p0)
    full = local = 0
    for n in p0:
        assert p0[n]["placements"] == ["S(0)"], (n, p0[n])  # Shard(dim=0)  # every parameter, the L0 module's too
        f = p0[n]["full"]
        # dim 0 split in two (torch.chunk: the first rank takes the larger half), other dims whole
        assert [p0[n]["local"][0] + p1[n]["local"][0], *p0[n]["local"][1:]] == f, (n, p0[n], p1[n])
        numel = lambda s: math.prod(s) if s else 1  # noqa: E731
        full += numel(f)
        local += numel(p1[n]["local"])
    print(f"rank 1 holds {local:,} of {full:,} parameter values ({local / full:.3f})")
    assert 0.45 < local / full <= 0.5
    files = sorted(x.name for x in (runs.get("fsdp_prune2")["save"] / "ep0-ba8").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # a sharded checkpoint, written by both ranks


@pytest.mark.parametrize("two,one,init_dir", [("fsdp_prune2", "prune1", "src_dir"), ("fsdp_cpt2", "cpt1", "cpt_dir"),
                                              ("fsdp_distill2", "distill1", "cpt_dir")])
def test_fsdp_two_ranks_end_at_the_unsharded_one_rank_run(runs, two, one, init_dir):
    """FSDP2 on 2 ranks (activation checkpointing on, sharded checkpoints) vs 1 unsharded rank on the same
    global batch: weights, masks, multipliers and domain weights. Measured gaps 2.2e-7 (pruning), 2.1e-6
    (continued pre-training), 5.8e-6 (distillation): the summation order of the reduce-scatter vs local
    accumulation, carried by Adam; both ranks training on rank 0's slice gave 0.50 (seen once)."""
    a, b = _model_state(runs.get(two)["ckpt"]), _model_state(runs.get(one)["ckpt"])
    assert a.keys() == b.keys()
    init = {f"model.{k}": v for k, v in load_model(getattr(runs, init_dir)).state_dict().items()}
    gap = _relative_gap(a, b, init)
    print(f"{two} vs {one}: relative weight gap {gap:.2e}")
    assert gap <= 1e-5, f"{two} vs {one}: relative weight gap {gap:.2e}"  # fp32: stated bound 1e-5
    for k in a:
        if k.startswith("l0."):  # mask logits and multipliers, absolute (values of order 1)
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    pa, pb = _loader_state(runs.get(two)["ckpt"]), _loader_state(runs.get(one)["ckpt"])
    for (ba, wa), (bb, wb) in zip(pa["proportion_history"], pb["proportion_history"], strict=True):
        assert ba == bb and max(abs(x - y) for x, y in zip(wa, wb)) < 1e-6
    if two == "fsdp_distill2":  # the sharded teacher's reference losses are the unsharded teacher's
        ta = runs.get(two)["ckpt"]["state"]["callbacks"]["DynamicLoadingCallback"]["teacher_losses"]
        tb = runs.get(one)["ckpt"]["state"]["callbacks"]["DynamicLoadingCallback"]["teacher_losses"]
        assert ta.keys() == tb.keys() and all(abs(ta[d] - tb[d]) < 2e-6 for d in ta), (ta, tb)  # ~4 fp32 ulps


def test_fsdp_activation_checkpointing_gives_the_same_training(runs):
    """fsdp_prune2 recomputes every layer in backward (activation checkpointing), fsdp_prune2_full does
    not: the recomputation is the same arithmetic, so the weights agree to 1e-6 (absolute)."""
    a, b = _model_state(runs.get("fsdp_prune2")["ckpt"]), _model_state(runs.get("fsdp_prune2_full")["ckpt"])
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"activation checkpointing on vs off: max |weight diff| {worst:.2e}")
    assert worst <= 1e-6


def test_fsdp_killed_run_resumes_exactly_from_a_sharded_checkpoint(runs):
    k, full = runs.get("fsdp_prune2_killed"), runs.get("fsdp_prune2")
    assert k["first"].returncode != 0, "the first launch should have died (rank 1 was killed)"
    assert k["ckpt_after_kill"] == ["ep0-ba4"], k["ckpt_after_kill"]  # a sharded checkpoint folder
    assert min(int(b) for b in k["recs"][0]["ids"]) == 4
    a, b = _model_state(k["ckpt"]), _model_state(full["ckpt"])
    assert a.keys() == b.keys()
    for n in a:  # weights, mask logits and multipliers; 1e-6 absolute
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=0, msg=n)
    la, lb = _loader_state(k["ckpt"]), _loader_state(full["ckpt"])
    assert la["proportion_history"] == lb["proportion_history"] and la["cursors"] == lb["cursors"]
    for r in range(2):
        for bi, ids in k["recs"][r]["ids"].items():
            assert ids == full["recs"][r]["ids"][bi]


def test_checkpoint_reader_reads_what_composer_wrote_sharded(runs):
    """Our reader on a Composer-written sharded folder == torch's own DCP converter, bit for bit."""
    from llmshearing.convert.checkpoint import read_composer_checkpoint

    r = runs.get("fsdp_prune2")
    ck = read_composer_checkpoint(r["save"] / "latest-rank0.pt")  # the link Composer points at the folder
    want = _model_state(r["ckpt"])
    assert ck.model_state.keys() == want.keys()
    assert all(torch.equal(ck.model_state[k], want[k]) for k in want)
    assert ck.dataset_state["proportion_history"] == _loader_state(r["ckpt"])["proportion_history"]
    assert ck.model_config.shape == load_model(runs.src_dir).config.shape


def test_prune_export_of_a_sharded_checkpoint_equals_the_full_one(runs, tmp_path):
    """The same training saved sharded (fsdp_*2) and full (fsdp_*2_full): prune-export and composer-to-hf
    give bit-identical outputs, and the HF export loads in transformers with the checkpoint's logits."""
    import transformers
    from safetensors.torch import load_file

    from llmshearing.convert.hf import convert_composer_to_hf
    from llmshearing.pruning.export import export_pruned

    def same_weights(a: Path, b: Path) -> None:
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    a = export_pruned(runs.get("fsdp_prune2")["save"] / "ep0-ba8", tmp_path / "a")
    b = export_pruned(runs.get("fsdp_prune2_full")["save"] / "latest-rank0.pt", tmp_path / "b")
    assert a["shape"] == b["shape"]
    same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    convert_composer_to_hf(runs.get("fsdp_cpt2")["save"] / "latest-rank0.pt", tmp_path / "hf")
    convert_composer_to_hf(runs.get("fsdp_cpt2_full")["save"] / "latest-rank0.pt", tmp_path / "hf_full")
    same_weights(tmp_path / "hf" / "model.safetensors", tmp_path / "hf_full" / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(runs.cpt_dir).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in _model_state(runs.get("fsdp_cpt2")["ckpt"]).items()})
    x = torch.randint(0, ours.config.shape.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4  # fp32, random-init-scale weights
