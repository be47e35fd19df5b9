"""`llmshearing demo --source MODEL`: the demo's stages on a real pretrained model.

The source (a GGUF file, a Hugging Face directory or our model directory, with its tokenizer) is
converted if needed and pruned to about 40% of its parameters, GQA kept; the plans set what a
pretrained model needs (a small learning rate for its weights, masks started from importance scores and
held near that structure while they learn).
"""

from __future__ import annotations

from pathlib import Path

from llmshearing.convert.checkpoint import load_model
from llmshearing.demo.plan import DemoPlan, Run
from llmshearing.models.shape import ModelShape

# A real pretrained source (`--source`): no source training; a pretrained model's weights take a
# small learning rate. The masks start from importance scores (`pruning.init: scores`, 8 calibration
# batches of the train data), so the step-0 deterministic mask is the one-shot cut by scores, already at
# the target shape: no sparsity warm-up (it would first ask for the source's shape and pull the dropped
# units back), a margin of 8 and a mask learning rate of 0.1 instead of the paper's 1.0, so that the few
# pruning steps refine that structure instead of re-sorting it on noisy gradients
# (benchmarks/score_init.py: at ~40% of SmolLM2-135M this held and improved the one-shot start, where
# lag_lr 1.0 or the warm-up lost it within 20 steps).
# REAL_QUICK fits 10 minutes of 2 CPU cores for a 135M source; REAL_FULL is sized for one GPU.
_REAL = ("optimizer.lr=1e-4",)
_REAL_PRUNE = ("model.init=null", "pruning.init=scores", "pruning.init_margin=8", "pruning.lagrangian_warmup=0ba",
               "pruning.lag_lr=0.1")
REAL_QUICK = DemoPlan(chars_per_domain=300_000, vocab_size=0, source_steps=0, prune_steps=40, cpt_steps=16,
                      eval_seqs_per_domain=16, prune_overrides=_REAL_PRUNE,
                      overrides=(*_REAL, "data.seq_len=128", "global_train_batch_size=8",
                                 "device_train_microbatch_size=8", "device_eval_batch_size=16"))
REAL_FULL = DemoPlan(chars_per_domain=1_500_000, vocab_size=0, source_steps=0, prune_steps=200, cpt_steps=200,
                     eval_seqs_per_domain=64, prune_overrides=_REAL_PRUNE,
                     overrides=(*_REAL, "data.seq_len=512", "global_train_batch_size=16",
                                "device_train_microbatch_size=16", "device_eval_batch_size=16", "device=auto",
                                "precision=amp_bf16"))


def real_target(shape: ModelShape) -> ModelShape:
    """About 40% of a source's parameters, GQA kept: 2/3 of the layers, of the query heads in every KV
    group (all groups kept), of d_model and of the MLP channels (multiples of 64)."""
    def two_thirds(n: int, step: int = 1) -> int:
        return max(step, round(n * 2 / 3 / step) * step)

    g = two_thirds(shape.group_size)
    return shape.replace(n_layers=two_thirds(shape.n_layers), n_heads=g * shape.n_kv_heads,
                         d_model=two_thirds(shape.d_model, 64), intermediate_size=two_thirds(shape.intermediate_size, 64))


def stage_real_source(r: Run, source: Path) -> Path:
    """4 (real source): the source as our model dir with its tokenizer (a GGUF file or an HF dir is
    converted first), and the pruning target of about 40% of its parameters."""
    from llmshearing.convert.gguf import convert_gguf_to_llmshearing, is_gguf_file
    from llmshearing.convert.hf import (
        convert_hf_to_llmshearing,
        copy_tokenizer,
        is_hf_model_dir,
    )

    src_dir = r.out / "models" / "source"
    if is_gguf_file(source):
        convert_gguf_to_llmshearing(source, src_dir)
    elif is_hf_model_dir(source):
        convert_hf_to_llmshearing(source, src_dir)
        copy_tokenizer(source, src_dir)
    else:
        src_dir = source  # our model dir, with its tokenizer files beside the weights
    shape = load_model(src_dir, weights=False).config.shape
    tgt = real_target(shape)
    r.step(f"    real source {source}: {shape.summary()}; pruning target {tgt.summary()} "
           f"({tgt.n_params() / shape.n_params():.0%} of its parameters)")
    r.prune_extra = r.plan.prune_overrides + tuple(
        f"pruning.target.{k}={getattr(tgt, k)}" for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "intermediate_size"))
    return src_dir
