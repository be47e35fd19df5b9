"""The one logging set-up of every command (train.py, the `llmshearing` sub-commands): INFO and
above to stderr, as `LEVEL logger: message` (with a timestamp for long training runs)."""

from __future__ import annotations

import logging


def setup_logging(timestamps: bool = False) -> None:
    """Idempotent: does nothing when the root logger is already configured (e.g. by a test runner)."""
    fmt = ("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
