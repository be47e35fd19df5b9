"""`llmshearing convert`: move weights between Hugging Face and llmshearing.

    llmshearing convert hf-to-composer HF_DIR OUT [--dtype bf16|fp16|fp32]
    llmshearing convert composer-to-hf CKPT OUT_DIR [--tokenizer DIR] [--dtype bf16|fp16|fp32]
    llmshearing convert composer-to-gguf CKPT OUT.gguf [--tokenizer DIR] [--dtype f32|f16|bf16]

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

    g = sub.add_parser(
        "composer-to-gguf", help="llmshearing model dir, HF dir or Composer checkpoint -> GGUF (llama.cpp, Ollama)",
        description="Write one GGUF file (unquantised f32/f16/bf16, with the tokenizer) that llama.cpp and Ollama "
                    "run, through llama.cpp's own `gguf` package (needs the [real] extra). Llama and Qwen2 "
                    "(and Mistral without a sliding window, as llama).")
    g.add_argument("ckpt", metavar="CKPT", help="llmshearing model dir, Hugging Face dir or Composer checkpoint")
    g.add_argument("out", metavar="OUT.gguf", help="output GGUF file")
    g.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory (default: the one inside CKPT, e.g. an HF export)")
    g.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f16", help="tensor type (default f16; "
                   "norms and biases stay f32 as in llama.cpp's converter)")
    g.set_defaults(func=run_composer_to_gguf)


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


def run_composer_to_gguf(args: argparse.Namespace) -> int:
    from llmshearing.convert.gguf_export import convert_to_gguf

    setup_logging()
    cfg = convert_to_gguf(args.ckpt, args.out, tokenizer_dir=args.tokenizer, dtype=args.dtype)
    print(f"wrote {args.out} [{cfg.family}: {cfg.shape.summary()}, {args.dtype}]")
    return 0
