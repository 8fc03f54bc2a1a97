"""agri_synthetic TFDS builder (importing this registers it with TFDS)."""

from .agri_synthetic_dataset_builder import Builder

__all__ = ["Builder"]
