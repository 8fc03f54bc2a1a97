"""inaturalist2021_text TFDS builder (importing this registers it with TFDS)."""

from .inaturalist2021_text_dataset_builder import Builder

__all__ = ["Builder"]
