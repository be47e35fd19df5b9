"""Composer fix for several nodes that share one filesystem (a cluster's shared save folder, or two
nodes on one machine).

Composer 0.32.1 makes the name of a node's signal file (the file the local rank 0 of a node writes,
and the node's other ranks wait for, around autoresume and checkpoint loading) on global rank 0 and
broadcasts it, so every node gets `._signal_file_node0_<random>`: on a shared save folder the local
rank 0 of each node writes and then removes the *same* file, and the second removal fails with
FileNotFoundError (mosaicml/llm-foundry#1736). Appending this node's own rank after the broadcast
gives each node its own file while the ranks of one node still agree on it.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_llmshearing_per_node"


def per_node_signal_files() -> None:
    """Idempotent; call before the Trainer is built (every rank)."""
    from composer.utils import dist

    original = dist.get_node_signal_file_name
    if getattr(original, _PATCHED, False):
        return

    def get_node_signal_file_name(rng: Any = None) -> str:
        return f"{original(rng)}_n{dist.get_node_rank()}"  # the broadcast is still made, on every rank

    setattr(get_node_signal_file_name, _PATCHED, True)
    dist.get_node_signal_file_name = get_node_signal_file_name
