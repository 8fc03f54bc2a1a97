"""Image preprocessing on the host: decode, crop, resize, flip. Output is uint8 [S, S, 3].

Normalisation to float happens on the device (`normalize`), where it fuses into the first
layer and the host sends a quarter of the bytes. Crops are applied while decoding: a JPEG is
decoded at the smallest power-of-two reduction that still covers the crop (PIL `draft`), and
crop + resize is one PIL call with a source box.
"""

import dataclasses
import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter
from PIL import ImageOps

from agriclip_jax import errors

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXIF_ORIENTATION = 0x0112


class CorruptImageError(errors.UserError, ValueError):
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
    drafted = image.draft("RGB", (math.ceil(width * size / crop_w),
                                  math.ceil(height * size / crop_h)))
    if drafted:
      # draft decodes at 1/scale (2, 4 or 8) and rounds each side up, so width and height
      # round differently: map the box with the exact scale (the original spans
      # [0, width / scale]), not with width / new width, and keep it inside the decoded image.
      scale = width / drafted[1][2]
      box = (box[0] / scale, box[1] / scale, min(box[2] / scale, image.size[0]),
             min(box[3] / scale, image.size[1]))
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


def eval_image(data: bytes, size: int, upright: bool = False) -> np.ndarray:
  """Resize the shorter side to `size` and take the central square.

  `upright`: first turn the image as its EXIF orientation says. For files straight from a
  camera (predict, embed); dataset images were turned once, when the dataset was built.
  """
  image = open_image(data)
  if upright:
    image = _upright(image)
  return _finish(image, center_crop_box(*image.size), size)


def _upright(image: Image.Image) -> Image.Image:
  try:
    if image.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9):
      return image  # Left undecoded, so a JPEG can still be drafted.
    return ImageOps.exif_transpose(image)
  except Exception as e:  # Truncated data surfaces here, when pixels are read.
    raise CorruptImageError(f"cannot decode image ({type(e).__name__}: {e})") from None


def normalize(images, mean=CLIP_MEAN, std=CLIP_STD, dtype=jnp.float32):
  """uint8 [..., 3] images -> standardised floats, on the device."""
  mean = jnp.asarray(mean, jnp.float32) * 255
  std = jnp.asarray(std, jnp.float32) * 255
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Crop:
  """One DINO view: a random resized crop, flipped, colour-jittered, maybe blurred/solarised."""
  size: int
  scale: tuple[float, float]
  blur: float  # Probability of a Gaussian blur.
  solarize: float = 0.0  # Probability of solarisation.


# DINO's views: two global crops (blurred always / rarely, the second maybe solarised) and
# local crops. Sizes are set by the config.
def dino_crops(global_size: int, local_size: int, num_local: int,
               global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)) -> tuple[Crop, ...]:
  return ((Crop(global_size, tuple(global_scale), blur=1.0),
           Crop(global_size, tuple(global_scale), blur=0.1, solarize=0.2))
          + tuple(Crop(local_size, tuple(local_scale), blur=0.5) for _ in range(num_local)))


def _jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """Brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 (with p=0.8), grey (p=0.2)."""
  if rng.uniform() < 0.8:
    for enhance, strength in ((ImageEnhance.Brightness, 0.4), (ImageEnhance.Contrast, 0.4),
                              (ImageEnhance.Color, 0.2)):
      image = enhance(image).enhance(rng.uniform(1 - strength, 1 + strength))
    shift = int(rng.uniform(-0.1, 0.1) * 255)
    if shift:
      h, s, v = image.convert("HSV").split()
      h = h.point(lambda x: (x + shift) % 256)
      image = Image.merge("HSV", (h, s, v)).convert("RGB")
  if rng.uniform() < 0.2:
    image = ImageOps.grayscale(image).convert("RGB")
  return image


def multi_crop(data: bytes, crops: tuple[Crop, ...], rng: np.random.Generator,
               blur_reference: int = 224) -> list[np.ndarray]:
  """Each of `crops` of one image (decoded once), uint8 [size, size, 3] each.

  Blur radii are DINO's (0.1 to 2 px, the same for global and local crops) when the global
  crops are `blur_reference` pixels, and scale with the global crop size otherwise.
  """
  global_size = max(crop.size for crop in crops)
  image = open_image(data)
  try:
    image = image.convert("RGB")
  except Exception as e:  # Truncated data surfaces when pixels are read.
    raise CorruptImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
  out = []
  for crop in crops:
    box = random_resized_crop_box(*image.size, rng, scale=crop.scale)
    view = image.resize((crop.size, crop.size), Image.BICUBIC, box=box)
    if rng.uniform() < 0.5:
      view = ImageOps.mirror(view)
    view = _jitter(view, rng)
    if rng.uniform() < crop.blur:
      radius = rng.uniform(0.1, 2.0) * global_size / blur_reference
      view = view.filter(ImageFilter.GaussianBlur(radius))
    if rng.uniform() < crop.solarize:
      view = ImageOps.solarize(view, threshold=128)
    out.append(np.asarray(view, dtype=np.uint8))
  return out
