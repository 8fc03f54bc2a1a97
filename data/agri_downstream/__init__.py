"""agri_downstream TFDS builder (importing this registers it with TFDS)."""

from .agri_downstream_dataset_builder import Builder

__all__ = ["Builder"]
