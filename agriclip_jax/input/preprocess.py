"""Image preprocessing on the host: decode, crop, resize, flip. Output is uint8 [S, S, 3].

Normalisation to float happens on the device (`normalize`), where it fuses into the first
layer and the host sends a quarter of the bytes. Crops are applied while decoding: a JPEG is
decoded at the smallest power-of-two reduction that still covers the crop (PIL `draft`), and
crop + resize is one PIL call with a source box.
"""

import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CorruptImageError(ValueError):
  """The bytes are not a decodable image."""


def open_image(data: bytes) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(data))
    image.size  # pylint: disable=pointless-statement  (reads the header now)
    return image
  except Exception as e:  # PIL raises many types for bad data.
    raise CorruptImageError(f"cannot decode image ({type(e).__name__}: {e})") from None


def _finish(image: Image.Image, box, size: int) -> np.ndarray:
  """Crop `box` (in the original's coordinates) out of `image` and resize it to size^2."""
  width, height = image.size
  if image.format == "JPEG":
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    image.draft("RGB", (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h)))
    factor = width / image.size[0]  # draft may have decoded at 1/2, 1/4 or 1/8 scale.
    box = tuple(c / factor for c in box)
  try:
    image = image.convert("RGB")
    out = image.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
  except Exception as e:  # Truncated data surfaces here, when pixels are read.
    raise CorruptImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
  return np.asarray(out, dtype=np.uint8)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
  """A box covering a random fraction `scale` of the area with aspect ratio in `ratio`."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      x0 = int(rng.integers(0, width - w + 1))
      y0 = int(rng.integers(0, height - h + 1))
      return (x0, y0, x0 + w, y0 + h)
  return center_crop_box(width, height)  # Extreme aspect ratios: fall back to the centre.


def center_crop_box(width: int, height: int):
  side = min(width, height)
  x0, y0 = (width - side) // 2, (height - side) // 2
  return (x0, y0, x0 + side, y0 + side)


def train_image(data: bytes, size: int, rng: np.random.Generator, scale=(0.5, 1.0),
                flip: bool = True) -> np.ndarray:
  image = open_image(data)
  box = random_resized_crop_box(*image.size, rng, scale=scale)
  out = _finish(image, box, size)
  if flip and rng.uniform() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def eval_image(data: bytes, size: int) -> np.ndarray:
  """Resize the shorter side to `size` and take the central square."""
  image = open_image(data)
  return _finish(image, center_crop_box(*image.size), size)


def normalize(images, mean=CLIP_MEAN, std=CLIP_STD, dtype=jnp.float32):
  """uint8 [..., 3] images -> standardised floats, on the device."""
  mean = jnp.asarray(mean, jnp.float32) * 255
  std = jnp.asarray(std, jnp.float32) * 255
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
