#!/usr/bin/env python
"""Tokenize raw documents per domain into packed MDS shards (same as `llmshearing prepare-data`).

Example:
    python data_prep/prepare.py --tokenizer /models/llama2-tokenizer --out /data/shear \
        --domain cc=/raw/cc --domain github='/raw/github/*.jsonl.gz' --seq-len 4096 --workers 8
"""

import sys

from llmshearing.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
