"""`llmshearing convert`: move weights between Hugging Face and llmshearing.

    llmshearing convert hf-to-composer HF_DIR OUT [--dtype bf16|fp16|fp32]
    llmshearing convert composer-to-hf CKPT OUT_DIR [--tokenizer DIR] [--dtype bf16|fp16|fp32]

User errors surface as ValueError / FileNotFoundError, which the top-level CLI prints as one line.
"""

from __future__ import annotations

import argparse

from llmshearing.logs import setup_logging

# convert.hf (and with it transformers, ~3-5 s) is imported inside the commands: this module is
# imported by `llmshearing --help` and every other sub-command to register `convert`.

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert weights between Hugging Face and llmshearing",
        description="Convert weights between Hugging Face model directories and llmshearing "
                    "(model directories / Composer checkpoints). Every tensor is validated against the config.")
    sub = p.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")

    a = sub.add_parser(
        "hf-to-composer", help="local Hugging Face model directory or GGUF file -> llmshearing model directory",
        description="Convert a local Hugging Face LLaMA/Mistral/Qwen2 directory (config.json + safetensors or .bin, "
                    "single or sharded), or a GGUF file (dequantized, with its tokenizer; needs the [real] extra), "
                    "into an llmshearing model directory (llmshearing.json + model.safetensors). `model.path` "
                    "in the training configs takes this or the Hugging Face directory itself.")
    a.add_argument("hf_dir", metavar="HF_DIR|GGUF", help="local Hugging Face model directory or .gguf file (no downloads)")
    a.add_argument("out", metavar="OUT", help="output llmshearing model directory")
    a.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="cast floating tensors (default: keep the checkpoint's dtype)")
    a.set_defaults(func=run_hf_to_composer)

    b = sub.add_parser(
        "composer-to-hf", help="llmshearing model directory or Composer checkpoint -> Hugging Face directory",
        description="Export an llmshearing model directory, or a Composer training checkpoint (e.g. latest-rank0.pt, "
                    "written by llmshearing's train.py), to a Hugging Face directory that "
                    "AutoModelForCausalLM.from_pretrained loads. Pruning checkpoints must go through "
                    "`llmshearing prune-export` first.")
    b.add_argument("ckpt", metavar="CKPT", help="llmshearing model directory or Composer checkpoint file")
    b.add_argument("out_dir", metavar="OUT_DIR", help="output Hugging Face model directory")
    b.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="copy tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json, ...) from DIR")
    b.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="cast floating tensors (default: keep the checkpoint's dtype)")
    b.set_defaults(func=run_composer_to_hf)


def run_hf_to_composer(args: argparse.Namespace) -> int:
    from llmshearing.convert.gguf import convert_gguf_to_llmshearing, is_gguf_file
    from llmshearing.convert.hf import convert_hf_to_llmshearing
    from llmshearing.convert.hf_weights import resolve_dtype

    setup_logging()
    if is_gguf_file(args.hf_dir):
        cfg = convert_gguf_to_llmshearing(args.hf_dir, args.out, dtype=resolve_dtype(args.dtype))
    else:
        cfg = convert_hf_to_llmshearing(args.hf_dir, args.out, dtype=args.dtype)
    print(f"converted {args.hf_dir} -> {args.out} [{cfg.family}: {cfg.shape.summary()}]")
    return 0


def run_composer_to_hf(args: argparse.Namespace) -> int:
    from llmshearing.convert.hf import convert_composer_to_hf

    setup_logging()
    from llmshearing.convert.model_card import invocation

    cfg = convert_composer_to_hf(args.ckpt, args.out_dir, tokenizer_dir=args.tokenizer, dtype=args.dtype,
                                 commands=[invocation(args)])
    tok = f", tokenizer from {args.tokenizer}" if args.tokenizer else ""
    print(f"exported {args.ckpt} -> {args.out_dir} [{cfg.family}: {cfg.shape.summary()}{tok}]")
    return 0
