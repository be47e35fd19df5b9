"""`llmshearing prune-oneshot`: the cut model equals the source under hard masks that keep the top-scoring
units (chosen here by plain sorting of independently recomputed scores), has the budget's shape, and the
outputs are prune-export's (model dir, domain_weights.json, an HF dir transformers loads to the same logits)."""

from __future__ import annotations

import json

import torch
import transformers
from _tiny_data import DOMAINS, make_tiny_data, tiny_model_dirs
from test_score_init import expected_keep, kept

from llmshearing.cli import main
from llmshearing.convert.checkpoint import load_model
from llmshearing.pruning.budget import resolve_target, tolerance
from llmshearing.pruning.oneshot import train_rows
from llmshearing.pruning.scores import calibration_ids, compute_scores


def test_prune_oneshot_cuts_the_top_scoring_units(tmp_path, capsys):
    data = make_tiny_data(tmp_path / "tiny", docs_per_domain=60)
    src_dir, _ = tiny_model_dirs(data, tmp_path / "models")
    rc = main(["prune-oneshot", str(src_dir), str(tmp_path / "cut"), "--data", str(data), "--domains", *DOMAINS,
               "--target", "params_fraction=0.5", "--batches", "2", "--batch-size", "4", "--hf", str(tmp_path / "hf")])
    assert rc == 0
    printed = capsys.readouterr().out
    src = load_model(src_dir).eval()
    cut = load_model(tmp_path / "cut").eval()
    s, t = src.config.shape, cut.config.shape
    assert t == resolve_target(s, {"params_fraction": 0.5})
    assert f"exactly {t.n_params():,} parameters" in printed
    assert abs(t.n_params() - 0.5 * s.n_params()) <= tolerance(t, s.d_model)

    # scores recomputed on the same calibration rows, the units chosen by plain sorting
    ds = train_rows(data, list(DOMAINS), 128)
    rows = calibration_ids(len(ds), 2, 4, 17, 0, 1)
    calib = [torch.stack([ds[int(i)]["input_ids"] for i in r]) for r in rows]
    sizes = ds.sizes.tolist()
    ds.close()
    want = expected_keep(s, t, compute_scores(src, calib, progress=False))
    from llmshearing.models.masks import StructureMasks

    L = s.n_layers
    masks = StructureMasks(
        layer=torch.tensor([1.0 if i in want["layers"] else 0.0 for i in range(L)]),
        heads=torch.tensor([[1.0 if h in want["heads"][i] else 0.0 for h in range(s.n_heads)] for i in range(L)]),
        intermediate=torch.tensor([[1.0 if c in want["channels"][i] else 0.0 for c in range(s.intermediate_size)]
                                   for i in range(L)]),
        hidden=torch.tensor([1.0 if d in want["hidden"] else 0.0 for d in range(s.d_model)]))
    assert kept(masks, s) == want
    ids = calib[0]
    with torch.no_grad():
        ref, got = src(ids, masks), cut(ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    print(f"cut vs masked source {float((got - ref).abs().max()):.1e}, HF vs cut {float((hf - got).abs().max()):.1e}")
    assert (got - ref).abs().max() <= 1e-4  # fp32, the same function computed on sliced weights
    assert (hf - got).abs().max() <= 1e-4
    w = json.loads((tmp_path / "cut" / "domain_weights.json").read_text())
    assert w["weights"] == {d: n / sum(sizes) for d, n in zip(DOMAINS, sizes)}
    assert w["source_model"] == str(src_dir)
