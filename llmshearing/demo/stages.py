"""The demo's building blocks, shared by the demo run and the recovery comparison: train one tiny yaml,
save the trained model as a model dir, evaluate per domain, pin the dynamic-loading target losses.

Composer (through the training package) is imported inside `train`: this module is imported by
`llmshearing --help` (through the demo's sub-command), which must stay fast.
"""

from __future__ import annotations

from pathlib import Path

from llmshearing.convert.checkpoint import save_model_dir
from llmshearing.demo.corpus import DOMAINS
from llmshearing.training.reference_losses import domain_losses

REPO = Path(__file__).resolve().parents[2]


def yaml_path(name: str) -> Path:
    """One of `yamls/tiny/`: the demo runs from a source checkout."""
    p = REPO / "yamls" / "tiny" / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: the demo runs from a source checkout (pip install -e .)")
    return p


def train(yaml_name: str, overrides: list[str], loggers=(), callbacks=()):
    """Build and fit the Trainer of a tiny yaml with overrides; returns (trainer, resolved config)."""
    from llmshearing.training.config import load_config
    from llmshearing.training.trainer import build_trainer

    cfg = load_config(yaml_path(yaml_name), overrides)
    trainer = build_trainer(cfg, extra_loggers=loggers, extra_callbacks=callbacks)
    trainer.fit()
    return trainer, cfg


def model_dir_from_trainer(trainer, out: Path) -> Path:
    """The trained (unsharded, single-process) model as one of our model dirs."""
    m = trainer.state.model.model
    save_model_dir(m.state_dict(), m.config, out)
    return out


def evaluate(model, data_root: Path, seq_len: int, split: str = "eval") -> dict[str, float]:
    """Token-averaged next-token loss per domain over the whole eval split."""
    model.eval()
    return domain_losses(model, data_root, DOMAINS, seq_len, split=split)


def target_losses(ref: list[float]) -> str:
    """The override that pins dynamic loading's per-domain target losses."""
    return f"dynamic_loading.target_losses=[{','.join(f'{x:.4f}' for x in ref)}]"
