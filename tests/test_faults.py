"""Faults and bad inputs: each stops early with a message naming the file or key, or is survived; no
checkpoint that was complete before a fault is lost. One test per row of the README's table
"What happens when ...". Runs go through train.py's main (tests/_mp_driver.py injects the faults)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_data import driver_env, make_tiny_data, tiny_model_dirs

from llmshearing.callbacks.dynamic_loading import DynamicLoadingCallback
from llmshearing.training.resume import repair_latest_link

REPO = Path(__file__).resolve().parents[1]
PRUNE, CPT = REPO / "yamls/tiny/prune.yaml", REPO / "yamls/tiny/cpt.yaml"
COMPOSER = Path(sys.executable).parent / "composer"
HANG_GUARD_S = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    data = make_tiny_data(tmp / "tiny")
    model, _ = tiny_model_dirs(data, tmp)
    return {"tmp": tmp, "data": data, "model": model}


def _train(yaml: Path, overrides: list[str], env_extra: dict | None = None, driver: Path | None = None,
           nproc: int = 1):
    """`composer -n NPROC tests/_mp_driver.py` (train.py's main + fault injection), or plain train.py."""
    e = driver_env(env_extra)
    if driver is None:
        cmd = [sys.executable, "train.py", str(yaml), *overrides]
    else:
        cmd = [str(COMPOSER), "-n", str(nproc), "tests/_mp_driver.py", str(driver), str(yaml), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=HANG_GUARD_S)


def _one_line_error(p, *words: str) -> None:
    err = p.stderr.strip()
    assert "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in err, (w, err[-3000:])


def _stop_line(p) -> str:
    """The run's one-line reason (the composer launcher adds its own lines around it)."""
    lines = [ln for ln in p.stderr.splitlines() if "training stopped:" in ln]
    assert lines, p.stderr[-3000:]
    return lines[0][lines[0].index("training stopped:"):]


def _cpt(env, folder: str, *extra: str) -> list[str]:
    return [f"data.root={env['data']}", f"model.path={env['model']}", "data.proportions=[0.34,0.33,0.33]",
            "max_duration=8ba", "save_interval=4ba", "eval_interval=4ba", "loggers.file=false",
            f"save_folder={env['tmp'] / folder}", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "latest-rank0.pt", map_location="cpu", weights_only=False)["state"]["model"]


# --------------------------------------------------------------------------------------- data files
def test_truncated_shard_is_found_before_training(env):
    data = env["tmp"] / "data_truncated"
    shutil.copytree(env["data"], data)
    shard = data / "train" / "legal" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    p = _train(CPT, _cpt(env, "trunc", f"data.root={data}"))
    assert p.returncode == 2
    _one_line_error(p, "data.root", "domain 'legal'", str(shard), "truncated")


def test_corrupted_shard_is_found_with_validate_hash(env):
    data = env["tmp"] / "data_corrupt"
    shutil.copytree(env["data"], data)
    shard = data / "eval" / "code" / "shard.00000.mds"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(raw))
    p = _train(CPT, _cpt(env, "corrupt", f"data.root={data}", "data.validate_hash=true"))
    assert p.returncode == 2
    _one_line_error(p, "domain 'code'", str(shard), "xxh64")


def test_eval_split_without_rows_is_refused_at_start(env):
    data = env["tmp"] / "data_noeval"
    shutil.copytree(env["data"], data)
    m = json.loads((data / "manifest.json").read_text())
    m["splits"]["eval"]["prose"]["sequences"] = 0  # what prepare-data records when a domain got no eval row
    (data / "manifest.json").write_text(json.dumps(m))
    p = _train(CPT, _cpt(env, "noeval", f"data.root={data}"))
    assert p.returncode == 2
    _one_line_error(p, "data.domains", "prose")


# -------------------------------------------------------------------------------------- model files
def test_truncated_model_weights_are_refused(env):
    bad = env["tmp"] / "model_truncated"
    shutil.copytree(env["model"], bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    p = _train(CPT, _cpt(env, "badmodel", f"model.path={bad}"))
    assert p.returncode == 2
    _one_line_error(p, "model.path", str(w), "truncated")


@pytest.mark.parametrize("config,words", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["GPT2LMHeadModel", "LlamaForCausalLM"]),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8},
     ["MixtralForCausalLM", "Qwen2ForCausalLM"]),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     ["rope_scaling type 'yarn'", "llama3, linear, default"]),
])
def test_unsupported_hugging_face_model_is_named(env, config, words):
    d = env["tmp"] / f"hf_{config['model_type']}_{len(config)}"
    d.mkdir(exist_ok=True)
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96,
            "vocab_size": 1024}
    (d / "config.json").write_text(json.dumps({**base, **config}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    p = _train(CPT, _cpt(env, "hfbad", f"model.path={d}"))
    assert p.returncode == 2
    _one_line_error(p, "model.path", *words)


# --------------------------------------------------------------------------------- checkpoint saves
@pytest.fixture(scope="module")
def uninterrupted(env) -> dict[str, torch.Tensor]:
    p = _train(CPT, _cpt(env, "full"), driver=env["tmp"] / "rec_full")
    assert p.returncode == 0, p.stderr[-3000:]
    return _weights(env["tmp"] / "full")


def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(env, uninterrupted):
    folder = env["tmp"] / "killsave"
    p = _train(CPT, _cpt(env, "killsave"), {"DRIVER_KILL_IN_SAVE": "8"}, driver=env["tmp"] / "rec_k")
    assert p.returncode != 0
    half = folder / "ep0-ba8-rank0.pt"
    assert half.is_file() and os.readlink(folder / "latest-rank0.pt") == "ep0-ba4-rank0.pt"
    p = _train(CPT, _cpt(env, "killsave"), driver=env["tmp"] / "rec_k2")  # the same command again
    assert p.returncode == 0, p.stderr[-3000:]
    assert (folder / "ep0-ba8-rank0.pt.incomplete").is_file()  # the half-written file, moved aside
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba8-rank0.pt"
    got = _weights(folder)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)


def test_half_written_file_is_never_taken_for_the_latest(tmp_path):
    """Killed between Composer's removal of the latest link and its re-creation: the link is restored
    to the newest COMPLETE checkpoint, not to the half-written newer file."""
    torch.save({"state": {}}, tmp_path / "ep0-ba4-rank0.pt")
    torch.save({"state": {}}, tmp_path / "ep0-ba8-rank0.pt")
    (tmp_path / "ep0-ba12-rank0.pt").write_bytes((tmp_path / "ep0-ba8-rank0.pt").read_bytes()[:100])
    assert repair_latest_link(tmp_path).name == "ep0-ba8-rank0.pt"
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba8-rank0.pt"
    assert (tmp_path / "ep0-ba12-rank0.pt.incomplete").is_file() and not (tmp_path / "ep0-ba12-rank0.pt").exists()
    (tmp_path / "latest-rank0.pt").unlink()
    (tmp_path / "latest-rank0.pt").symlink_to("ep0-ba12-rank0.pt")  # dangling now
    assert repair_latest_link(tmp_path).name == "ep0-ba8-rank0.pt"


def test_half_written_sharded_checkpoint_is_never_taken_for_the_latest(tmp_path):
    """The same for sharded (FSDP) checkpoints, one folder per save: torch.distributed.checkpoint writes
    the folder's .metadata after every rank's shard file, so a folder without it is a save that died."""
    for ba, done in ((4, True), (8, True), (12, False)):
        d = tmp_path / f"ep0-ba{ba}"
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"x")
        if done:
            (d / ".metadata").write_bytes(b"m")
    assert repair_latest_link(tmp_path).name == "ep0-ba8"
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba8"
    assert (tmp_path / "ep0-ba12.incomplete").is_dir() and not (tmp_path / "ep0-ba12").exists()
    assert repair_latest_link(tmp_path).name == "ep0-ba8"  # a complete link is left alone


def test_disk_full_while_saving_stops_cleanly_and_resumes(env, uninterrupted):
    folder = env["tmp"] / "enospc"
    p = _train(CPT, _cpt(env, "enospc"), {"DRIVER_ENOSPC_AT": "8"}, driver=env["tmp"] / "rec_e")
    assert p.returncode == 1
    line = _stop_line(p)
    assert line.startswith("training stopped: no space left on the device") and str(folder) in line, line
    assert "Traceback" not in p.stderr
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba4-rank0.pt"
    p = _train(CPT, _cpt(env, "enospc"), driver=env["tmp"] / "rec_e2")
    assert p.returncode == 0, p.stderr[-3000:]
    got = _weights(folder)
    for k, v in uninterrupted.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_nan_training_loss_stops_with_the_step_and_the_mask_state(env, ranks):
    """1 rank, and 2 FSDP2 ranks (sharded mask logits and multipliers: the dump gathers them, a
    collective both ranks enter at the same batch since they stop on the all-reduced loss)."""
    folder = env["tmp"] / f"nan{ranks}"
    extra = [] if ranks == 1 else ["fsdp.state_dict_type=sharded", "device_train_microbatch_size=8"]
    p = _train(PRUNE, [f"data.root={env['data']}", "max_duration=8ba", "save_interval=4ba", "eval_interval=4ba",
                       "loggers.file=false", f"save_folder={folder}", *extra], {"DRIVER_NAN_AT": "6"},
               driver=env["tmp"] / f"rec_n{ranks}", nproc=ranks)
    assert p.returncode == 1 if ranks == 1 else p.returncode != 0  # (the launcher's own code for a failed rank)
    last = _stop_line(p)
    assert last.startswith("training stopped: training loss is not finite at batch 7"), last
    assert "Traceback" not in p.stderr
    saved = folder / "masks" / "l0_state_nonfinite_ba7.pt"
    assert saved.is_file() and str(saved) in last
    l0_state = torch.load(saved, weights_only=False)["l0_state"]
    assert any(k.startswith("log_alpha") for k in l0_state)
    for k, v in l0_state.items():  # whole tensors (not one rank's shard), plain (not DTensors)
        assert type(v) is torch.Tensor, (k, type(v))
    shapes = {k: tuple(v.shape) for k, v in l0_state.items()}
    assert shapes["log_alpha_hidden"] == (128,) and shapes["log_alpha_layer"] == (4,), shapes
    latest = "ep0-ba4-rank0.pt" if ranks == 1 else "ep0-ba4"
    assert os.readlink(folder / "latest-rank0.pt") == latest  # the checkpoint before stays


def test_nan_eval_loss_leaves_the_domain_weights_unchanged(caplog):
    from types import SimpleNamespace

    from llmshearing.data.sampler import DynamicBatchSampler

    s = DynamicBatchSampler([100, 100, 100], [0.5, 0.3, 0.2], 6, domains=["a", "b", "c"], on_exhausted="repeat")
    cb = DynamicLoadingCallback(["a", "b", "c"], [1.0, 1.0, 1.0])
    cb._sampler = s
    cb._losses = {"a": 2.0, "b": float("nan"), "c": 3.0}
    logged = []
    cb.eval_after_all(SimpleNamespace(timestamp=SimpleNamespace(batch=4)), SimpleNamespace(log_metrics=logged.append))
    assert np.array_equal(s.proportions, [0.5, 0.3, 0.2]) and np.all(np.isfinite(s.proportions))
    assert "non-finite eval loss" in caplog.text and cb.num_updates == 0


# -------------------------------------------------------------------------------- changed configs
@pytest.mark.parametrize("change,words", [
    (["global_train_batch_size=32"], ["config key 'global_train_batch_size'", "=16", "=32"]),
    # the data itself is 128 long: refused by the data check, with the key and both values too
    (["data.seq_len=64"], ["config key 'data.seq_len'", "seq_len=128", "expects 64"]),
    (["data.domains=[code,legal]", "data.proportions=[0.5,0.5]", "dynamic_loading.target_losses=[3.0,3.0]"],
     ["config key 'data.domains'", "['code', 'legal', 'prose']", "['code', 'legal']"]),
    (["seed=18"], ["config key 'seed'", "seed=17", "seed=18"]),
])
def test_resume_with_a_changed_config_is_refused(env, uninterrupted, change, words):
    p = _train(CPT, _cpt(env, "full", *change))
    assert p.returncode == 2
    _one_line_error(p, *words)


def test_resume_with_a_changed_pruning_target_is_refused(env):
    common = [f"data.root={env['data']}", "max_duration=4ba", "save_interval=4ba", "eval_interval=4ba",
              "loggers.file=false", f"save_folder={env['tmp'] / 'prune_target'}"]
    assert _train(PRUNE, common).returncode == 0
    p = _train(PRUNE, common + ["pruning.target.n_layers=2"])
    assert p.returncode == 2
    _one_line_error(p, "config key 'pruning.target'", "'n_layers': 3", "'n_layers': 2")
