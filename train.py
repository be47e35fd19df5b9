"""Entry point: `composer train.py yamls/prune_7b_to_2.7b.yaml key=value ...` (or `python train.py ...`)."""

import sys

from llmshearing.training.entry import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
