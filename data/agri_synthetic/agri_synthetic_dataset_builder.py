"""agri_synthetic: a procedural agriculture image-text dataset that needs no download.

The pipeline builds it on first use (see `agriclip_jax/input/datasets.py`). Splits: `train` and `test` (the training classes), `heldout` (classes never seen in
training, for zero-shot evaluation). See `spec.py` for what the classes are.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

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


class Builder(tfds.core.GeneratorBasedBuilder):
  """Procedural crop / fish / livestock images with attribute captions and a taxonomy."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release: 72 classes, 12 of them held out.",
                   "1.1.0": "Per-class taxonomy in the metadata (class_taxonomy)."}
  BUILDER_CONFIGS = [
      AgriSyntheticConfig(name="default", description="72 classes, 12 held out; ~10k images."),
      AgriSyntheticConfig(name="small", description="Few images per class, for tests.",
                          train_per_class=12, test_per_class=3, heldout_per_class=4),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    classes = spec_lib.classes()
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
                k: tfds.features.Text()
                for k in ("subject", "colour", "pattern", "size", "background")}),
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
    for spec in spec_lib.classes():
      if spec.held_out != (split == "heldout"):
        continue
      for index in range(per_class):
        key = f"{split}-{spec.label:03d}-{index:05d}"
        rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], spec.label, index])
        yield key, example(spec, rng, config.image_size, key)


def example(spec: spec_lib.ClassSpec, rng: np.random.Generator, size: int, key: str) -> dict:
  """One example dict in the builder's feature format (image as PNG bytes)."""
  scene = spec_lib.sample_scene(spec, rng)
  png = io.BytesIO()
  Image.fromarray(render.render(spec, scene, rng, size)).save(png, format="PNG")
  return {
      "id": key,
      "image": png.getvalue(),
      "captions": spec_lib.captions(spec, **scene),
      "label": spec.label,
      "class_name": spec.name,
      "domain": spec.domain,
      "taxonomy": spec.taxonomy,
      "attributes": dict(subject=spec.subject, colour=spec.colour, pattern=spec.pattern,
                         **scene),
  }
