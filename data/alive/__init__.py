"""alive TFDS builder (importing this registers it with TFDS)."""

from .alive_dataset_builder import Builder

__all__ = ["Builder"]
