"""agri_synthetic: a procedural agriculture image-text dataset that needs no download.

The pipeline builds it on first use (see `agriclip_jax/input/datasets.py`). Splits: `train`
and `test` (the training classes), `heldout` (classes never seen in training, for zero-shot
evaluation). See `spec.py` for what the classes are; the `fine` config's classes (`fine.py`)
differ in local structure only (marking shape and density, outline), not in colour.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from . import fine
from . import render
from . import spec as spec_lib

_SPLIT_IDS = {"train": 0, "test": 1, "heldout": 2}


@dataclasses.dataclass
class AgriSyntheticConfig(tfds.core.BuilderConfig):
  train_per_class: int = 150
  test_per_class: int = 25
  heldout_per_class: int = 50
  image_size: int = 64
  seed: int = 0
  family: str = "coarse"  # The classes: "coarse" (spec.py) or "fine" (fine.py).

  def classes(self):
    return fine.classes() if self.family == "fine" else spec_lib.classes()

  def attributes(self) -> tuple[str, ...]:
    return (("subject", "marking", "density", "edge") if self.family == "fine"
            else ("subject", "colour", "pattern")) + ("size", "background")


class Builder(tfds.core.GeneratorBasedBuilder):
  """Procedural crop / fish / livestock images with attribute captions and a taxonomy."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release: 72 classes, 12 of them held out.",
                   "1.1.0": "Per-class taxonomy in the metadata (class_taxonomy)."}
  BUILDER_CONFIGS = [
      AgriSyntheticConfig(name="default", description="72 classes, 12 held out; ~10k images."),
      AgriSyntheticConfig(name="small", description="Few images per class, for tests.",
                          train_per_class=12, test_per_class=3, heldout_per_class=4),
      AgriSyntheticConfig(name="fine", family="fine", description=(
          "64 classes, 12 held out, that share colours within a subject and differ in "
          "marking shape, marking density and outline; ~9k images.")),
      AgriSyntheticConfig(name="fine_small", family="fine", train_per_class=12,
                          test_per_class=3, heldout_per_class=4,
                          description="The fine classes with few images each, for tests."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    classes = self.builder_config.classes()
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "label": tfds.features.ClassLabel(names=[c.name for c in classes]),
            "class_name": tfds.features.Text(),
            "domain": tfds.features.ClassLabel(names=spec_lib.DOMAINS),
            "taxonomy": tfds.features.FeaturesDict(
                {rank: tfds.features.Text() for rank in spec_lib.TAXONOMY_RANKS}),
            "attributes": tfds.features.FeaturesDict({
                k: tfds.features.Text() for k in self.builder_config.attributes()}),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(
            prompt_templates=list(spec_lib.PROMPT_TEMPLATES),
            heldout_classes=[c.name for c in classes if c.held_out],
            taxonomy_ranks=list(spec_lib.TAXONOMY_RANKS),
            class_taxonomy=[c.taxonomy for c in classes],
        ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        "train": self._generate_examples("train", config.train_per_class),
        "test": self._generate_examples("test", config.test_per_class),
        "heldout": self._generate_examples("heldout", config.heldout_per_class),
    }

  def _generate_examples(self, split: str, per_class: int):
    config = self.builder_config
    for spec in config.classes():
      if spec.held_out != (split == "heldout"):
        continue
      for index in range(per_class):
        key = f"{split}-{spec.label:03d}-{index:05d}"
        rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], spec.label, index])
        yield key, example(spec, rng, config.image_size, key)


def example(spec, rng: np.random.Generator, size: int, key: str) -> dict:
  """One example dict in the builder's feature format (image as PNG bytes) of a class of
  `spec.classes()` or `fine.classes()`."""
  scene = spec_lib.sample_scene(spec, rng)
  png = io.BytesIO()
  is_fine = isinstance(spec, fine.FineClassSpec)
  image = (fine.render_fine if is_fine else render.render)(spec, scene, rng, size)
  Image.fromarray(image).save(png, format="PNG")
  attributes = (dict(marking=spec.marking, density=spec.density, edge=spec.edge) if is_fine
                else dict(colour=spec.colour, pattern=spec.pattern))
  return {
      "id": key,
      "image": png.getvalue(),
      "captions": (fine if is_fine else spec_lib).captions(spec, **scene),
      "label": spec.label,
      "class_name": spec.name,
      "domain": spec.domain,
      "taxonomy": spec.taxonomy,
      "attributes": dict(subject=spec.subject, **attributes, **scene),
  }
