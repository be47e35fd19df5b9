"""llmshearing: shear large LLaMA-family models into small, strong ones."""

from llmshearing.shape import ModelShape

__all__ = ["ModelShape"]
__version__ = "0.1.0"
