"""How well a pruning run hands over to the cut: per-layer spread of the expected sparsity, and the
eval-loss gap between the masked model the run evaluated and the cut model. Prints JSON.

    llmshearing demo --out demo_out            # or any run dir with runs/prune and data/
    python benchmarks/pruning_fidelity.py demo_out [--out F.json]

For every mask type with one row per layer (or per KV group), the expected sparsity of each row
(1 - mean P(z != 0)) at the end of pruning, its spread (std, max - min) and the target. Then the
mean per-domain eval loss of (a) the masked model with the masks the run evaluated with
("current expected" shape, `eval_target_model: false`), (b) the masked model with the exact-target
masks and (c) the cut model (`prune-export`); (b) and (c) agree to float noise, and (c) - (a) is
the loss the cut itself costs. For a source with tied embeddings, whose exact-target hidden mask is
hard 0/1 (so that the cut keeps the tie), also (d) the masked model with the soft hidden values the
mask would otherwise carry: (b) - (d) is what keeping the tie costs right after the cut.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_common import emit_json  # noqa: E402

from llmshearing.convert.checkpoint import (  # noqa: E402
    model_from_state_dict,
    read_composer_checkpoint,
)
from llmshearing.pruning import hard_concrete as hc  # noqa: E402
from llmshearing.pruning.cut import cut_model  # noqa: E402
from llmshearing.pruning.export import split_composer_state  # noqa: E402
from llmshearing.pruning.l0 import L0Module  # noqa: E402
from llmshearing.training.reference_losses import domain_losses  # noqa: E402


def _eval(model, masks, data_root: Path, domains: list[str], seq_len: int) -> dict[str, float]:
    return domain_losses(lambda ids: model(ids, masks), data_root, domains, seq_len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="folder with runs/prune/latest-rank0.pt and data/ (the demo's --out)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    root = Path(a.run_dir)
    ck = read_composer_checkpoint(root / "runs" / "prune" / "latest-rank0.pt")
    model_sd, l0_sd = split_composer_state(ck.model_state)
    model = model_from_state_dict(ck.model_config, model_sd, source="prune checkpoint").eval()
    l0 = L0Module.from_config_dict(ck.model_config.shape, ck.pruning)
    l0.load_state_dict(l0_sd)
    l0.eval()
    rows = {}
    with torch.no_grad():
        per_row = l0.expected_sparsity_per_row()
    for name, s in per_row.items():
        spec = l0.specs[name]
        if len(spec.shape) < 2:
            continue
        rows[name] = {"per_row": [round(float(x), 4) for x in s], "std": float(s.std()),
                      "range": float(s.max() - s.min()), "target": spec.final_target_sparsity}
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    domains, seq_len = list(manifest["domains"]), int(manifest["seq_len"])
    eval_masks = l0.deterministic_masks(target=l0.eval_target_model)
    target_masks = l0.deterministic_masks(target=True)
    losses = {
        "masked_as_evaluated": _eval(model, eval_masks, root / "data", domains, seq_len),
        "masked_exact_target": _eval(model, target_masks, root / "data", domains, seq_len),
        "cut": _eval(cut_model(model, target_masks), None, root / "data", domains, seq_len),
    }
    if ck.model_config.shape.tie_embeddings and "hidden" in l0.specs:
        la = hc.clamp_at_use(l0.log_alpha("hidden"))
        soft = dataclasses.replace(target_masks, hidden=hc.deterministic(la, l0.specs["hidden"].n_keep))
        losses["masked_exact_target_soft_hidden"] = _eval(model, soft, root / "data", domains, seq_len)
    mean = {k: sum(v.values()) / len(v) for k, v in losses.items()}
    result = {"run_dir": str(root), "eval_target_model": l0.eval_target_model, "per_row_expected_sparsity": rows,
              "eval_loss": losses, "mean_eval_loss": mean,
              "cut_minus_masked_as_evaluated": mean["cut"] - mean["masked_as_evaluated"]}
    if "masked_exact_target_soft_hidden" in mean:
        result["hard_hidden_cost"] = mean["masked_exact_target"] - mean["masked_exact_target_soft_hidden"]
    emit_json(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
