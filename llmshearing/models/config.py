"""ModelConfig: a ModelShape plus the non-shape hyperparameters of a LLaMA-family decoder.

Kept separate from ModelShape so that pruning can change the shape (`with_shape`) while RoPE,
norm eps and the architecture family carry over unchanged to the cut model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from llmshearing.models.shape import ModelShape

#: Architecture families we can load and export; value = the HF `architectures` entry.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass(frozen=True)
class ModelConfig:
    shape: ModelShape
    family: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral; forward refuses sequences longer than this
    initializer_range: float = 0.02
    extra_hf: dict[str, Any] = field(default_factory=dict)  # e.g. bos/eos ids, carried to export

    def __post_init__(self) -> None:
        if self.family not in ARCHITECTURES:
            raise ValueError(f"unknown model family {self.family!r}; supported: {sorted(ARCHITECTURES)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; supported: llama3, linear, default (none)"
                )

    def with_shape(self, shape: ModelShape) -> "ModelConfig":
        return replace(self, shape=shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = self.shape.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid: {sorted(names)}")
        if "shape" not in d:
            raise ValueError("model config needs a 'shape' section")
        shape = d.pop("shape")
        shape = shape if isinstance(shape, ModelShape) else ModelShape.from_dict(dict(shape))
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        if "extra_hf" in d:
            d["extra_hf"] = dict(d["extra_hf"])
        return cls(shape=shape, **d)
