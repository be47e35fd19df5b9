"""GPU tests (skipped without CUDA; see conftest.py): tiny pruning and continued pre-training runs through
train.py with FSDP2 (the path CI runs on CPU with gloo, here nccl) + activation checkpointing + amp_bf16
(layers gathered in bf16, the L0 unit in fp32), checkpoint save and autoresume after
an interruption, the masked model vs its cut dense model in bf16, the SDPA routing of our attention, and
the benchmark's CUDA code path.

The training runs go through subprocesses: Composer initialises torch.distributed once per process with
the device's backend (nccl here, gloo for the CPU tests) and refuses to switch, so a GPU Trainer and a CPU
Trainer cannot share the pytest process. The child entry point is this file itself
(`python tests/test_gpu.py child ...`, see `_child`), which builds the Trainer with `build_trainer`
exactly as `composer train.py` does, plus two test callbacks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
PRUNE = REPO / "yamls/tiny/prune.yaml"
CPT = REPO / "yamls/tiny/cpt.yaml"
GPU_OVERRIDES = ["device=gpu", "precision=amp_bf16", "fsdp.reshard_after_forward=true",
                 "fsdp.activation_checkpointing=true"]

pytestmark = pytest.mark.gpu


# --------------------------------------------------------------------------------------------------
# child process: one (possibly interrupted) training run, snapshots saved for the parent


def _child(argv: list[str]) -> int:
    """argv: YAML OUT_PT STOP_AT(0 = none) OVERRIDES...; saves {'fit_start_batch', 'fit_start', 'at_4',
    'final', 'final_batch', 'interrupted'} (weights as CPU fp32 state dicts) to OUT_PT. STOP_AT = n raises
    at the start of the batch after n completed batches (a crash that loses batch n if it was not
    checkpointed)."""
    import logging

    from composer.core import Callback

    from llmshearing.training.config import load_config
    from llmshearing.training.trainer import build_trainer

    logging.basicConfig(level=logging.WARNING)
    yaml, out, stop_at, overrides = argv[0], argv[1], int(argv[2]), argv[3:]
    snap: dict = {"interrupted": False}

    def weights(state) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor  # FSDP2 parameters

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu().clone()
                for k, v in state.model.state_dict().items()}

    class Interrupt(Exception):
        pass

    class Snapshots(Callback):
        def fit_start(self, state, logger) -> None:
            snap["fit_start_batch"] = int(state.timestamp.batch.value)
            snap["fit_start"] = weights(state)

        def batch_end(self, state, logger) -> None:
            if state.timestamp.batch.value == 4:  # the weights the checkpoint at batch 4 holds
                snap["at_4"] = weights(state)

        def batch_start(self, state, logger) -> None:
            if stop_at and state.timestamp.batch.value == stop_at:
                raise Interrupt  # a crash right after batch stop_at - 1 (and its checkpoint)

    cfg = load_config(yaml, overrides)
    trainer = build_trainer(cfg, extra_callbacks=[Snapshots()])
    try:
        trainer.fit()
    except Interrupt:
        snap["interrupted"] = True
    snap["final_batch"] = int(trainer.state.timestamp.batch.value)
    snap["final"] = weights(trainer.state)
    trainer.close()
    torch.save(snap, out)
    return 0


def _run_child(yaml: Path, out: Path, stop_at: int, overrides: list[str]) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(yaml), str(out), str(stop_at), *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + "\n" + p.stderr[-5000:]
    return torch.load(out, weights_only=False)


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from _tiny_data import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("tiny"))


def _model_dir(tmp: Path, data_root: Path) -> Path:
    """A random model of the tiny source shape as an llmshearing model dir (both stages start from it)."""
    from llmshearing.convert.checkpoint import save_model_dir
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.training.config import build_model_config, load_config

    torch.manual_seed(0)
    cfg = build_model_config(load_config(PRUNE, [f"data.root={data_root}"]))
    m = LlamaForCausalLM(cfg)
    return save_model_dir(m.state_dict(), m.config, tmp / "src")


def _global_norm(d: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert a.keys() == b.keys()
    return {k: a[k] - b[k] for k in a}


# --------------------------------------------------------------------------------------------------
# training runs: FSDP + activation checkpointing + bf16, checkpoint, autoresume


@pytest.mark.parametrize("stage", ["prune", "cpt"])
def test_fsdp_bf16_run_autoresumes_from_its_checkpoint(stage, data_root, tmp_path):
    """Killed after batch 5 (last checkpoint at 4) and restarted with the same command, the run starts at
    batch 4 with exactly the checkpoint's weights (masks and multipliers included) and ends at batch 8
    next to the uninterrupted run.

    Why not bit-identical at the end, as on CPU (tests/test_train_e2e.py, 1e-6): the flash-attention
    backward accumulates dQ with fp32 atomics, so two GPU runs of the same command differ in the last
    bits; Adam then carries those differences. The bound: the distance between the resumed and the
    uninterrupted final weights must be < 5% of how far the uninterrupted run moved in its last 4 steps
    (a restart from scratch, or from the wrong checkpoint, would be of the order of 100%)."""
    model_dir = _model_dir(tmp_path, data_root)
    yaml = PRUNE if stage == "prune" else CPT
    common = [f"data.root={data_root}", f"model.path={model_dir}", "max_duration=8ba", "save_interval=4ba",
              "eval_interval=4ba", "loggers.file=false", *GPU_OVERRIDES]
    if stage == "prune":
        common.append("model.init=null")

    full = _run_child(yaml, tmp_path / "full.pt", 0, common + [f"save_folder={tmp_path}/full"])
    assert full["final_batch"] == 8 and full["fit_start_batch"] == 0
    if stage == "prune":
        assert any(k.startswith("l0.") for k in full["final"]), "masks and multipliers are model state"

    # killed at the start of batch 6: batch 5 was trained but its work is lost (last checkpoint: batch 4)
    crashed = _run_child(yaml, tmp_path / "crashed.pt", 5, common + [f"save_folder={tmp_path}/resumed"])
    assert crashed["interrupted"] and crashed["final_batch"] == 5
    assert (tmp_path / "resumed" / "latest-rank0.pt").exists()

    resumed = _run_child(yaml, tmp_path / "resumed.pt", 0, common + [f"save_folder={tmp_path}/resumed"])
    assert not resumed["interrupted"]
    assert resumed["fit_start_batch"] == 4, "autoresume must continue from the batch-4 checkpoint"
    assert resumed["final_batch"] == 8
    assert resumed["fit_start"].keys() == crashed["at_4"].keys()
    for k, v in crashed["at_4"].items():  # loading is exact: the fp32 weights the checkpoint holds
        assert torch.equal(resumed["fit_start"][k], v), f"{stage}: {k} differs from the checkpoint after resume"

    moved = _global_norm(_diff(full["final"], full["at_4"]))
    gap = _global_norm(_diff(resumed["final"], full["final"]))
    assert moved > 0
    assert gap < 0.05 * moved, f"{stage}: resumed-vs-uninterrupted {gap:.3e} vs last-4-steps movement {moved:.3e}"
    for k, v in resumed["final"].items():
        assert torch.isfinite(v).all(), k


def test_composer_launcher_prunes_on_gpu_with_fsdp(data_root, tmp_path):
    """The documented command with the GPU overrides: `composer -n 1 train.py yamls/tiny/prune.yaml ...`."""
    import shutil

    composer = Path(sys.executable).parent / "composer"
    if not composer.exists():
        found = shutil.which("composer")
        if found is None:
            pytest.skip("no `composer` launcher on PATH or next to this Python")
        composer = Path(found)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    cmd = [str(composer), "-n", "1", "train.py", str(PRUNE), f"data.root={data_root}", "max_duration=6ba",
           "eval_interval=3ba", "save_interval=6ba", f"save_folder={tmp_path}/run", *GPU_OVERRIDES,
           "fsdp.state_dict_type=sharded"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert (tmp_path / "run" / "latest-rank0.pt" / ".metadata").exists()  # a sharded checkpoint folder
    masks = sorted((tmp_path / "run" / "masks").glob("*.pt"))
    assert masks, "deterministic masks are saved at each evaluation"
    m = torch.load(masks[-1], weights_only=False)
    assert m["masks"] and all(torch.isfinite(v).all() for v in m["masks"].values())


# --------------------------------------------------------------------------------------------------
# masked model == cut model, in bf16


#: name -> (source shape, target shape overrides). Both prune layers, heads, MLP channels and hidden dims.
EQUIV_CASES = {
    "mha": (dict(d_model=256, n_heads=8, n_kv_heads=8, head_dim=32, n_layers=4, intermediate_size=512, vocab_size=1024),
            dict(d_model=192, n_heads=4, n_kv_heads=4, n_layers=3, intermediate_size=256)),
    "gqa": (dict(d_model=256, n_heads=8, n_kv_heads=2, head_dim=32, n_layers=4, intermediate_size=512, vocab_size=1024),
            dict(d_model=192, n_heads=2, n_kv_heads=1, n_layers=3, intermediate_size=256)),
}
#: max |masked - cut| over the logits, relative to max |logit| of the fp32 masked model (scale ~4 here).
BF16_TOL = 3e-2
FP32_TOL = 1e-4


def masked_and_cut(name: str, device: str, seed: int = 0, mask_seed: int | None = None):
    """A random source model (weights re-drawn so every parameter matters, tests/_hf_helpers.randomize_),
    an L0 module with random logits (`mask_seed`, default `seed`), its exact-target deterministic masks
    and the cut model."""
    from _hf_helpers import randomize_

    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import LlamaForCausalLM
    from llmshearing.models.shape import ModelShape
    from llmshearing.pruning.cut import cut_model
    from llmshearing.pruning.l0 import L0Module

    src_kw, tgt_kw = EQUIV_CASES[name]
    src = ModelShape(**src_kw)
    torch.manual_seed(seed)
    model = randomize_(LlamaForCausalLM(ModelConfig(shape=src)), seed).eval()
    mask_seed = seed if mask_seed is None else mask_seed
    l0 = L0Module(src, src.replace(**tgt_kw), seed=mask_seed)
    with torch.no_grad():  # spread the logits so the kept mask values differ (0.2 .. 1) and the cut is non-trivial
        g = torch.Generator().manual_seed(mask_seed)
        for p in l0.log_alpha_params():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0 + 1.0)
    masks = l0.deterministic_masks(target=True)
    cut = cut_model(model, masks).eval()
    assert cut.config.shape == src.replace(**tgt_kw)
    return model.to(device), masks.to(device), cut.to(device)


def _logits(model, ids, masks=None, bf16=False):
    with torch.no_grad(), torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(ids, masks).float()


@pytest.mark.parametrize("name", sorted(EQUIV_CASES))
def test_masked_model_equals_cut_model_in_bf16(name):
    """bf16 autocast (the training precision): the masked source model and the cut dense model give the
    same logits within BF16_TOL = 3e-2 of the logit scale (max abs difference / max |logit|).

    Why 3e-2: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Under autocast every matmul
    operand is rounded to bf16, and the two models round different numbers: the cut folds the mask values
    into the weights before rounding, the masked model rounds weights and masks separately and multiplies
    activations by the masks in bf16, and its RMSNorm reduces over D dims with zeros where the cut one
    reduces over D'. Over 3-4 layers that is a few percent of the largest logit at worst; each model's own
    bf16-vs-fp32 error (asserted below to be of the same order) is the yardstick. A wrong cut (wrong head,
    channel or hidden dim kept, a mask value not folded in) moves logits by O(1) of their scale, far above
    the tolerance; the negative control below checks that the test can see one."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, masks, cut = masked_and_cut(name, "cuda")
    ids = torch.randint(0, model.config.shape.vocab_size, (2, 256), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))

    ref = _logits(model, ids, masks)  # fp32 masked
    scale = ref.abs().max().item()
    assert scale > 0.5
    fp32_err = (_logits(cut, ids) - ref).abs().max().item() / scale
    assert fp32_err < FP32_TOL, f"fp32 masked vs cut {fp32_err:.2e}"

    masked16, cut16 = _logits(model, ids, masks, bf16=True), _logits(cut, ids, bf16=True)
    assert torch.isfinite(masked16).all() and torch.isfinite(cut16).all()
    err = (masked16 - cut16).abs().max().item() / scale
    own = max((masked16 - ref).abs().max().item(), (cut16 - _logits(cut, ids)).abs().max().item()) / scale
    print(f"{name}: bf16 masked-vs-cut {err:.3e}, each model's bf16-vs-fp32 error up to {own:.3e}, "
          f"fp32 masked-vs-cut {fp32_err:.2e} (relative to max|logit| {scale:.2f})")
    assert err < BF16_TOL, f"bf16 masked vs cut: {err:.3e} of the logit scale"
    assert own < BF16_TOL  # the yardstick: bf16 itself costs this much

    # negative control: the same weights cut with other masks (another choice of kept units) are far off
    _, _, other = masked_and_cut(name, "cuda", mask_seed=1)
    wrong = (_logits(other, ids, bf16=True) - masked16).abs().max().item() / scale
    assert wrong > 5 * BF16_TOL, f"negative control too close ({wrong:.3e}); the tolerance would not catch a bad cut"


# --------------------------------------------------------------------------------------------------
# attention routing on CUDA


def _attn_module(n_heads: int, n_kv: int, head_dim: int = 64, d: int = 256):
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.llama import Attention
    from llmshearing.models.rope import RotaryEmbedding
    from llmshearing.models.shape import ModelShape

    cfg = ModelConfig(shape=ModelShape(d_model=d, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, n_layers=1,
                                       intermediate_size=64, vocab_size=64))
    torch.manual_seed(0)
    return Attention(cfg).cuda(), RotaryEmbedding(head_dim, 10000.0, None).cuda()


def test_gqa_fp32_uses_a_fused_kernel_not_math():
    """fp32 GQA (no autocast): flash cannot take fp32; with enable_gqa torch 2.7 would fall back to the
    math kernel ([B,H,S,S] scores). Our attention expands K/V there, so the memory-efficient kernel alone
    must be able to run it (forward and backward), and it equals the float64 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn, rope = _attn_module(8, 2)
    x = torch.randn(2, 512, 256, device="cuda", requires_grad=True)
    cos, sin = rope(512, x.device, torch.float32)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        y = attn(x, cos, sin)
        y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    attn64 = attn.double()
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = attn64(x.detach().double(), cos.double(), sin.double())
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel  # fp32 kernel vs float64


def test_gqa_bf16_runs_on_the_flash_kernel():
    """bf16 autocast GQA: enable_gqa goes to flash directly (no K/V expansion, no math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn, rope = _attn_module(8, 2)
    x = torch.randn(2, 512, 256, device="cuda", requires_grad=True)
    cos, sin = rope(512, x.device, torch.float32)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        y = attn(x, cos, sin)
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):
        ref = attn(x.detach(), cos, sin)  # fp32 (expanded K/V, efficient or math kernel)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel  # bf16 operands


# --------------------------------------------------------------------------------------------------
# the benchmark's CUDA path


def test_benchmark_cuda_tiny_mode(tmp_path):
    """benchmarks/train_throughput.py on CUDA with tiny shapes: events timing, a real OOM caught during the
    micro-batch search (memory capped at 5% of the GPU, a candidate of 16384 x 64 tokens needs ~20 GB),
    the timed run after it, peak memory and the datasheet MFU."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--device", "cuda", "--tiny", "--quick",
           "--memory-fraction", "0.05", "--micro-batches", "1,2,16384", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    r = json.loads(p.stdout)
    assert r["meta"]["device"] == "cuda" and r["meta"]["precision"] == "amp_bf16"
    assert r["peak"]["measured_matmul"]["tflops"] > 1
    assert not [x for x in r["results"] if "error" in x], [x.get("error") for x in r["results"]]
    for x in r["results"]:
        assert x["peak_mem_gib"] > 0
        assert math.isfinite(x["loss_last"])
        if x["case"] in ("cpt", "prune"):
            assert [s["fits"] for s in x["search"]] == [True, True, False]
            assert "OOM" in x["search"][-1]["error"] and x["micro_batch"] == 2
        if r["peak"]["spec_tflops"]:
            assert x["mfu_spec"] == pytest.approx(x["achieved_tflops"] / r["peak"]["spec_tflops"])
    if "H100" in r["meta"]["device_name"] and "PCIE" not in r["meta"]["device_name"].upper():
        assert r["peak"]["spec_tflops"] == pytest.approx(989.4)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    sys.exit(_child(sys.argv[2:]))
