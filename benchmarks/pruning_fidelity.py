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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_common import emit_json  # noqa: E402
from llmshearing.convert.checkpoint import model_from_state_dict, read_composer_checkpoint  # noqa: E402
from llmshearing.data.dynamic import build_eval_dataloader  # noqa: E402
from llmshearing.models.composer_model import shift_targets  # noqa: E402
from llmshearing.pruning import hard_concrete as hc  # noqa: E402
from llmshearing.pruning.cut import cut_model  # noqa: E402
from llmshearing.pruning.export import split_composer_state  # noqa: E402
from llmshearing.pruning.l0 import L0Module  # noqa: E402


@torch.no_grad()
def _eval(model, masks, data_root: Path, domains: list[str], seq_len: int) -> dict[str, float]:
    out = {}
    for dom in domains:
        dl = build_eval_dataloader(data_root, dom, batch_size=16, seq_len=seq_len)
        total, count = 0.0, 0
        for batch in dl:
            ids = batch["input_ids"]
            logits = model(ids, masks) if masks is not None else model(ids)
            t = shift_targets(ids)
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1), reduction="sum"))
            count += int((t != -100).sum())
        dl.dataset.close()
        out[dom] = total / count
    return out


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
    for name, spec in l0.specs.items():
        if len(spec.shape) < 2:
            continue
        p = hc.prob_nonzero(hc.clamp_at_use(l0.log_alpha(name))).reshape(-1, spec.row_size)
        s = 1 - p.mean(-1)
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
