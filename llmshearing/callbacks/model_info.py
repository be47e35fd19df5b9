"""ModelInfo: makes every Composer checkpoint self-describing.

Its state (the ModelConfig, and the pruning setup when pruning) is saved by Composer in the
checkpoint under `state['callbacks']['ModelInfo']`, so `composer-to-hf` and `prune-export`
need nothing but the checkpoint file (read by `llmshearing.convert.checkpoint`).
"""

from __future__ import annotations

from typing import Any

from composer.core import Callback

from llmshearing.models.config import ModelConfig


class ModelInfo(Callback):
    def __init__(self, model_config: ModelConfig, pruning: dict[str, Any] | None = None,
                 source_path: str | None = None) -> None:
        self.model_config = model_config
        self.pruning = pruning  # e.g. {'target': ModelShape dict, 'modules': [...], ...}
        self.source_path = source_path  # model.path of the run (a pruning run's source: the default teacher)

    def state_dict(self) -> dict[str, Any]:
        return {"model_config": self.model_config.to_dict(), "pruning": self.pruning, "source_path": self.source_path}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The run's own config wins; the checkpoint copy is informational on resume.
        pass
