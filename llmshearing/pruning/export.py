"""`llmshearing prune-export`: a Composer pruning checkpoint -> a dense model of the target shape.

The checkpoint is self-describing (ModelInfo callback state: the source ModelConfig and the
`pruning` dict of `L0Module.config_dict()`), so nothing but the file is needed: rebuild the masked
model and the L0 module, take the exact-target deterministic masks (or a saved mask file), cut,
check the shape against the target, write our model directory (and optionally an HF directory).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from llmshearing.convert.checkpoint import (
    CheckpointError,
    model_from_state_dict,
    read_composer_checkpoint,
    save_domain_weights,
    save_model_dir,
    torch_load,
)
from llmshearing.convert.model_card import (
    CardFacts,
    facts_from_checkpoint,
    handover_facts,
    inherited,
    invocation,
    write_card,
)
from llmshearing.models.masks import StructureMasks
from llmshearing.pruning.cut import cut_model, cut_report
from llmshearing.pruning.l0 import L0Module

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def split_composer_state(model_state: StateDict) -> tuple[StateDict, StateDict]:
    """(LlamaForCausalLM state dict, L0Module state dict) from ComposerLlama keys `model.*` / `l0.*`
    (as `read_composer_checkpoint` returns them, wrapper names removed)."""
    model_sd: StateDict = {}
    l0_sd: StateDict = {}
    for k, v in model_state.items():
        if k.startswith("model."):
            model_sd[k[len("model."):]] = v
        elif k.startswith("l0."):
            l0_sd[k[len("l0."):]] = v
        else:
            raise ValueError(f"unexpected key {k!r} in the checkpoint's model state (expected 'model.' or 'l0.')")
    return model_sd, l0_sd


def load_masks_file(path: str | Path) -> StructureMasks:
    """Masks saved by PruningCallback (`{'masks': ...}`) or a bare StructureMasks state dict."""
    obj = torch_load(path, weights_only=False)
    if isinstance(obj, dict) and "masks" in obj and isinstance(obj["masks"], dict):
        obj = obj["masks"]
    try:
        return StructureMasks.from_state_dict(obj)
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a mask file (expected masks_baN.pt from a pruning run): {e}") from e


def _final_domain_weights(loader_state: dict[str, Any] | None) -> dict[str, float] | None:
    """The last mixture in the pruning run's loader state (its proportion history), by domain."""
    if not loader_state or not loader_state.get("proportion_history") or not loader_state.get("domains"):
        return None
    last = loader_state["proportion_history"][-1][1]
    return {str(d): float(w) for d, w in zip(loader_state["domains"], last)}


def export_pruned(ckpt_path: str | Path, out_dir: str | Path, hf_dir: str | Path | None = None,
                  tokenizer_dir: str | Path | None = None, masks_path: str | Path | None = None,
                  commands: list[str] | None = None) -> dict[str, Any]:
    """Cut the pruned model of a Composer checkpoint (full file or sharded folder) and save it;
    returns the cut report. The source weights stay memory-mapped (full checkpoints) and the
    optimizer state is never read, so the peak is about the source weights plus the cut model."""
    ck = read_composer_checkpoint(ckpt_path)
    cfg, pruning = ck.model_config, ck.pruning
    if not pruning:
        raise CheckpointError(f"{ckpt_path}: the checkpoint has no pruning setup (ModelInfo.pruning is empty); "
                              "is it a pruning run?")
    model_sd, l0_sd = split_composer_state(ck.model_state)
    final_weights, source_model = _final_domain_weights(ck.dataset_state), ck.source_path
    card = facts_from_checkpoint(ck)  # tokens, mixture, last eval losses, source, license
    del ck
    model = model_from_state_dict(cfg, model_sd, source=str(ckpt_path))
    l0 = L0Module.from_config_dict(cfg.shape, pruning, eval_target_model=True)
    try:
        l0.load_state_dict(l0_sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: its mask parameters do not match its pruning setup: "
                              f"{str(e).splitlines()[0]}") from e
    l0.eval()
    masks = load_masks_file(masks_path) if masks_path is not None else l0.deterministic_masks(target=True)

    report = cut_report(cfg.shape, masks)
    cut = cut_model(model, masks)
    got, want = cut.config.shape, l0.target
    if got.replace(tie_embeddings=want.tie_embeddings) != want:
        raise ValueError(f"the cut model's shape differs from the pruning target:\n  cut:    {got.summary()}\n"
                         f"  target: {want.summary()}")
    if got.tie_embeddings != want.tie_embeddings:
        log.warning("target asks tie_embeddings=%s but the cut model has %s (hidden mask values folded into the "
                    "embedding)", want.tie_embeddings, got.tie_embeddings)

    return write_cut(cut, report, out_dir, hf_dir, tokenizer_dir, final_weights, str(ckpt_path), source_model,
                     card=card.with_(commands=[*card.commands, *(commands or [invocation()])]))


def write_cut(cut, report: dict[str, Any], out_dir: str | Path, hf_dir: str | Path | None,
              tokenizer_dir: str | Path | None, weights: dict[str, float] | None, source: str,
              source_model: str | None, card: CardFacts | None = None) -> dict[str, Any]:
    """What every cut leaves behind (prune-export, prune-oneshot): our model dir, the domain weights
    continued pre-training starts from (`data.proportions: from_model`) with the facts the model cards
    of later exports need, a model card, optionally an HF dir."""
    sd = cut.state_dict()
    card = (card or CardFacts(config=cut.config, source_model=source_model, **inherited(source_model)))
    card = card.with_(config=cut.config, mixture=weights)
    save_model_dir(sd, cut.config, out_dir)
    write_card(out_dir, card)
    report["out_dir"] = str(out_dir)
    if weights is not None:
        save_domain_weights(out_dir, weights, source=source, source_model=source_model, **handover_facts(card))
        report["domain_weights"] = weights
    if hf_dir is not None:
        from llmshearing.convert.hf import (
            export_to_hf,  # lazy: optional path, heavier imports
        )

        export_to_hf(sd, cut.config, hf_dir, tokenizer_dir=tokenizer_dir, card=card)
        report["hf_dir"] = str(hf_dir)
    return report


def format_report(report: dict[str, Any]) -> str:
    layers = report["kept_layers"]
    lines = [
        f"kept layers ({len(layers)}): {layers}",
        f"heads per layer: {report['heads_per_layer']} (kv heads {report['kv_heads_per_layer']})",
        f"intermediate channels per layer: {report['channels_per_layer']}",
        f"hidden: {report['hidden']}",
        f"parameters: {report['n_params']:,} (source {report['source_n_params']:,})",
        f"wrote {report['out_dir']}" + (f" and {report['hf_dir']}" if report.get("hf_dir") else ""),
    ]
    if report.get("domain_weights"):
        weights = ", ".join(f"{d}={w:.4f}" for d, w in report["domain_weights"].items())
        lines.append(f"final domain weights of the pruning run (domain_weights.json): {weights}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    report = export_pruned(args.ckpt, args.out, hf_dir=args.hf, tokenizer_dir=args.tokenizer, masks_path=args.masks,
                           commands=[invocation(args)])
    print(format_report(report))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prune-export", help="cut a pruning checkpoint to a dense model of the target shape",
        description="Cut a Composer pruning checkpoint to a dense model of the pruning target shape "
                    "(exact-target deterministic masks) and write an llmshearing model directory.")
    p.add_argument("ckpt", help="Composer checkpoint of the pruning run (e.g. latest-rank0.pt)")
    p.add_argument("out", help="output llmshearing model directory")
    p.add_argument("--hf", metavar="OUT_DIR", default=None, help="also write a Hugging Face model directory")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory copied into the HF export")
    p.add_argument("--masks", metavar="masks_baN.pt", default=None,
                   help="cut with these saved masks instead of the checkpoint's exact-target masks")
    p.set_defaults(func=_run)
