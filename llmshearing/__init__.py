"""llmshearing: shear large LLaMA-family models into small, strong ones."""

from llmshearing.models.shape import ModelShape

__all__ = ["ModelShape"]
__version__ = "0.1.0"
