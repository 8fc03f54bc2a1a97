"""An image classifier: the ViT tower `img` with a head over the dataset's classes.

Its parameters are named like the two-tower model's image tower (`img/...`), so a classifier
run can initialise the image tower of a contrastive (e.g. LiT) run via `config.init`.
"""

from typing import Any, Mapping

import flax.linen as nn

from agriclip_jax.models import two_towers
from agriclip_jax.models import vit


class Model(nn.Module):
  image: Mapping[str, Any]

  @nn.compact
  def __call__(self, images, train: bool = False):
    logits, _ = vit.Model(**self.image, name="img")(images, train=train)
    return logits


def make(config, num_classes: int) -> Model:
  dtype = two_towers.check_dtype(config.get("dtype", "float32"))
  return Model(image=two_towers.tower_kwargs(config.img, "img", num_classes, dtype))
