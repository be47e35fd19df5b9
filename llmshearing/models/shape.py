"""ModelShape: the dimensions of a LLaMA-family decoder and its exact parameter count.

This is the one place where shapes and parameter counts are defined. The model builds its
layers from it, the L0 module derives unit sizes (how many weights one head / channel /
hidden dim carries) from it, target validation compares two of them, and reports print it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


class ShapeError(ValueError):
    """A shape that cannot exist (or a target that cannot be cut from a source)."""


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-style biases on q/k/v projections

    def __post_init__(self) -> None:
        for f in ("d_model", "n_heads", "n_kv_heads", "head_dim", "n_layers", "intermediate_size", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ShapeError(f"ModelShape.{f} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ShapeError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) "
                "so that every KV group serves the same number of query heads"
            )

    # ---- derived dimensions -------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV group (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    # ---- parameters carried by one prunable unit (as a function of the hidden size) -----
    # Kept as functions of d so that the L0 module can plug in an *expected* hidden size.
    def params_per_q_head(self, d: float | None = None) -> float:
        """q rows + o columns of one query head (+ its q bias)."""
        d = self.d_model if d is None else d
        return 2 * d * self.head_dim + (self.head_dim if self.qkv_bias else 0)

    def params_per_kv_group(self, d: float | None = None) -> float:
        """k and v rows of one KV group (+ their biases)."""
        d = self.d_model if d is None else d
        return 2 * d * self.head_dim + (2 * self.head_dim if self.qkv_bias else 0)

    def params_per_channel(self, d: float | None = None) -> float:
        """gate row + up row + down column of one MLP channel."""
        d = self.d_model if d is None else d
        return 3 * d

    # ---- counts ---------------------------------------------------------------------------
    def attn_params_per_layer(self) -> int:
        return int(self.n_heads * self.params_per_q_head() + self.n_kv_heads * self.params_per_kv_group())

    def mlp_params_per_layer(self) -> int:
        return int(self.intermediate_size * self.params_per_channel())

    def n_prunable_params(self) -> int:
        """Attention + MLP weights of all layers: what structured pruning removes
        (embeddings, norms and lm_head excluded, as in the method's sparsity definition)."""
        return self.n_layers * (self.attn_params_per_layer() + self.mlp_params_per_layer())

    def n_params(self) -> int:
        """Exact number of parameters of the model (equals sum(p.numel()) of our model and of
        the Hugging Face model with this config)."""
        emb = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        norms = (2 * self.n_layers + 1) * self.d_model
        return emb + head + norms + self.n_prunable_params()

    # ---- conversions -----------------------------------------------------------------------
    def replace(self, **kw: Any) -> "ModelShape":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelShape":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ShapeError(f"unknown ModelShape keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)

    def summary(self) -> str:
        kv = f"{self.n_kv_heads} kv" if self.n_kv_heads != self.n_heads else "MHA"
        return (
            f"d_model={self.d_model} heads={self.n_heads} ({kv}) head_dim={self.head_dim} "
            f"layers={self.n_layers} intermediate={self.intermediate_size} vocab={self.vocab_size}"
            f"{' tied' if self.tie_embeddings else ''} params={self.n_params():,}"
        )


def format_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
