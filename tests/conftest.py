"""Shared pytest setup: GPU tests skip cleanly without CUDA; tests never touch the network."""

import os

import pytest

# session fixture `store`: the S3-compatible test server, the tiny data in it and the 2-rank runs from it
# (tests/_store.py), shared by tests/test_object_storage.py and tests/test_cluster_launch.py
# session fixture `sheared`: one tiny pruned + continued + exported model (tests/_sheared.py), for the
# model card, GGUF and evaluation tests
pytest_plugins = ["_store", "_sheared"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
