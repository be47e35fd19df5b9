"""`llmshearing` console script.

Each sub-command lives next to the code it drives and registers itself with a
`register(subparsers)` function; modules are imported lazily so `llmshearing --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: (module, one-line help) for every sub-command group; the module's `register()` adds parsers.
COMMANDS = [
    ("llmshearing.convert.cli", "convert weights between Hugging Face and llmshearing"),
    ("llmshearing.pruning.export", "cut a pruning checkpoint to a dense model of the target shape"),
    ("llmshearing.pruning.oneshot", "cut a model to the target shape by importance scores alone (baseline)"),
    ("llmshearing.data.cli", "tokenize raw documents per domain into MDS shards"),
    ("llmshearing.training.reference_losses", "per-domain reference losses for dynamic batch loading (eval, scaling-law fit)"),
    ("llmshearing.evaluation.harness", "lm-evaluation-harness on exported models, side by side"),
    ("llmshearing.demo.run", "run the tiny end-to-end shearing pipeline on CPU"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmshearing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod, _ in COMMANDS:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["llmshearing", *(sys.argv[1:] if argv is None else argv)]  # for the model cards
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"llmshearing {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
