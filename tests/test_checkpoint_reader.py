"""The one Composer-checkpoint reader (`convert/checkpoint.py`) on full checkpoint files: it returns the
saved model; `prune-export` never pages in the optimizer state; bad files fail in one line.

Sharded (FSDP2) checkpoint folders are tested on folders Composer itself wrote in 2-rank runs
(tests/test_multiprocess.py: the reader against torch's own DCP converter, prune-export of a sharded
checkpoint == of the full one, bit for bit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmshearing.callbacks.model_info import ModelInfo
from llmshearing.convert.checkpoint import read_composer_checkpoint
from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.config import ModelConfig
from llmshearing.models.shape import ModelShape
from llmshearing.pruning.l0 import L0Module

REPO = Path(__file__).resolve().parents[1]
SRC = ModelShape(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=3, intermediate_size=96,
                 vocab_size=128)
TGT = SRC.replace(d_model=48, n_kv_heads=1, n_heads=2, n_layers=2, intermediate_size=64)


def _pruning_state(src: ModelShape = SRC, tgt: ModelShape = TGT, seed: int = 0) -> dict:
    """Composer's State.state_dict() layout for a pruning run, with Adam moments for every weight."""
    torch.manual_seed(seed)
    cfg = ModelConfig(shape=src)
    l0 = L0Module(src, tgt, seed=seed)
    with torch.no_grad():
        for p in l0.log_alpha_params():
            p.normal_(0.0, 2.0)  # learned-looking masks
    cm = ComposerLlama(cfg, l0=l0)
    model = {k: v.clone() for k, v in cm.state_dict().items()}
    adam = {k: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v), "step": torch.tensor(8.0)}
            for k, v in model.items()}
    return {"model": model, "optimizers": {"DecoupledAdamW": {"state": adam, "param_groups": [{"lr": 1e-4}]}},
            "callbacks": {"ModelInfo": ModelInfo(cfg, l0.config_dict()).state_dict()},
            "timestamp": {"Timestamp": {"batch": 8}}, "run_name": "t",
            "dataset_state": {"train": {"proportion_history": [[0, [0.5, 0.5]], [4, [0.6, 0.4]]]}, "eval": {}}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ckpts")
    full = tmp / "latest-rank0.pt"
    torch.save({"state": _pruning_state(), "rng": [{}]}, full)
    return {"full": full, "state": _pruning_state()}


def test_reader_returns_the_saved_model_and_loader_state(checkpoints):
    ck = read_composer_checkpoint(checkpoints["full"])
    want = checkpoints["state"]["model"]
    assert ck.model_state.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(ck.model_state[k], v), k  # bit for bit
    assert ck.model_config.shape == SRC and ck.pruning["target"] == TGT.to_dict()
    assert ck.dataset_state["proportion_history"] == [[0, [0.5, 0.5]], [4, [0.6, 0.4]]]


# ------------------------------------------------------------------------------------------- memory
_MEASURE = r"""
import json, sys
from llmshearing.pruning.export import export_pruned  # everything the export imports, before the baseline

def hwm():  # peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

base = hwm()
export_pruned(sys.argv[1], sys.argv[2])
print(json.dumps({"base": base, "peak": hwm()}))
"""


@pytest.mark.slow
def test_prune_export_peak_memory_is_at_most_twice_the_fp32_model(tmp_path):
    """A ~50M-parameter source (200 MB fp32) whose checkpoint also holds Adam state (400 MB more):
    the export's peak RSS above its import baseline stays <= 2x the fp32 model bytes (the weights,
    read once through the memory map, plus the cut model and the folding temporaries)."""
    src = ModelShape(d_model=512, n_heads=8, n_kv_heads=8, head_dim=64, n_layers=12, intermediate_size=2048,
                     vocab_size=32000)
    tgt = src.replace(d_model=384, n_heads=4, n_kv_heads=4, n_layers=8, intermediate_size=1024)
    state = _pruning_state(src, tgt)
    model_bytes = sum(v.numel() * 4 for v in state["model"].values())
    torch.save({"state": state, "rng": [{}]}, tmp_path / "ck.pt")
    del state
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "ck.pt"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    extra = r["peak"] - r["base"]
    print(f"prune-export: model {model_bytes / 2**20:.0f} MiB fp32, checkpoint "
          f"{(tmp_path / 'ck.pt').stat().st_size / 2**20:.0f} MiB, peak above baseline {extra / 2**20:.0f} MiB")
    assert extra <= 2 * model_bytes, f"{extra / 2**20:.0f} MiB > 2 x {model_bytes / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("what", ["not_a_checkpoint", "truncated", "folder"])
@pytest.mark.parametrize("command", [["prune-export"], ["convert", "composer-to-hf"]])
def test_bad_checkpoint_is_one_line_naming_the_file(checkpoints, tmp_path, what, command):
    if what == "not_a_checkpoint":
        bad = tmp_path / "notes.pt"
        bad.write_text("hello, I am not a checkpoint\n")
    elif what == "truncated":
        bad = tmp_path / "cut.pt"
        data = checkpoints["full"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad = tmp_path / "empty_folder"
        bad.mkdir()
    exe = Path(sys.executable).parent / "llmshearing"
    p = subprocess.run([str(exe), *command, str(bad), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and str(bad) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
