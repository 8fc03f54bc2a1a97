"""Procedural images for `agri_synthetic`: a subject of a class colour and pattern on a scene.

Pure numpy, vectorised over pixels; one 64x64 image takes well under a millisecond. The class
decides subject shape, colour and pattern; the scene (size, background) and the small jitters
(position, angle, shade, noise) come from the per-image generator.
"""

import numpy as np

from . import spec as spec_lib

_BACKGROUND_RGB = {
    "dark soil": ((70, 50, 35), (95, 70, 50)),
    "green grass": ((70, 120, 55), (100, 150, 70)),
    "a wooden table": ((150, 110, 70), (175, 135, 90)),
    "clear water": ((60, 140, 200), (120, 190, 230)),
    "murky water": ((50, 80, 70), (80, 105, 90)),
    "a pasture": ((110, 170, 230), (80, 140, 60)),   # sky above, grass below
    "a dusty yard": ((190, 200, 215), (165, 140, 105)),
}


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
  top, bottom = (np.asarray(c, np.float32) for c in _BACKGROUND_RGB[name])
  t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
  if name in ("a pasture", "a dusty yard"):  # horizon somewhere around the middle
    horizon = rng.uniform(0.35, 0.55)
    t = (t > horizon).astype(np.float32)
  image = top * (1 - t) + bottom * t
  image = np.broadcast_to(image, (size, size, 3)).copy()
  image += rng.normal(0.0, 8.0, (size, size, 1)).astype(np.float32)
  return image


def _rotated_coords(size, centre, angle):
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
  dy, dx = ys - centre[0], xs - centre[1]
  cos, sin = np.cos(angle), np.sin(angle)
  return dx * cos + dy * sin, -dx * sin + dy * cos  # (u along the subject, v across)


def _subject_mask(subject: str, size: int, scale: float, rng: np.random.Generator):
  """Boolean mask of the subject plus (u, v) coordinates used to lay patterns on it."""
  centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
  r = scale * size
  if subject == "leaf":  # a lens shape with pointed tips
    u, v = _rotated_coords(size, centre, rng.uniform(0, np.pi))
    half_width = 0.45 * r * np.clip(1 - (u / r) ** 2, 0, None)
    mask = (np.abs(u) < r) & (np.abs(v) < half_width)
  elif subject == "fruit":  # a disc with a stem
    u, v = _rotated_coords(size, centre, rng.uniform(-0.3, 0.3))
    mask = u ** 2 + v ** 2 < (0.8 * r) ** 2
    mask |= (np.abs(u) < 0.08 * r) & (v < -0.7 * r) & (v > -1.05 * r)
  elif subject == "fish":  # an ellipse body with a triangular tail, facing left or right
    direction = rng.choice([-1.0, 1.0])
    u, v = _rotated_coords(size, centre, rng.uniform(-0.25, 0.25))
    u = u * direction
    body = (u / r) ** 2 + (v / (0.45 * r)) ** 2 < 1
    tail = (u > 0.8 * r) & (u < 1.25 * r) & (np.abs(v) < (u - 0.8 * r) * 1.1)
    mask = body | tail
  elif subject == "cattle":  # body, head and four legs
    direction = rng.choice([-1.0, 1.0])
    u, v = _rotated_coords(size, centre, 0.0)
    u = u * direction
    body = (np.abs(u) < 0.85 * r) & (np.abs(v) < 0.4 * r)
    head = (u > 0.75 * r) & (u < 1.15 * r) & (v > -0.6 * r) & (v < -0.05 * r)
    legs = (v > 0.35 * r) & (v < 0.9 * r) & (
        (np.abs(np.abs(u) - 0.6 * r) < 0.1 * r) | (np.abs(np.abs(u) - 0.35 * r) < 0.1 * r))
    mask = body | head | legs
  else:
    raise ValueError(f"unknown subject {subject!r}")
  return mask, u, v


def _pattern_mask(pattern, u, v, r, rng):
  if pattern == "plain":
    return np.zeros(u.shape, bool)
  if pattern == "striped":
    period = rng.uniform(0.3, 0.45) * r
    return np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) > 0.3
  if pattern == "spotted":
    spots = np.zeros(u.shape, bool)
    for _ in range(rng.integers(6, 10)):  # spot centres in subject coordinates: all land on it
      su, sv = rng.uniform(-0.8, 0.8) * r, rng.uniform(-0.35, 0.35) * r
      spots |= (u - su) ** 2 + (v - sv) ** 2 < (rng.uniform(0.1, 0.16) * r) ** 2
    return spots
  raise ValueError(f"unknown pattern {pattern!r}")


def render(spec: spec_lib.ClassSpec, scene: dict, rng: np.random.Generator,
           size: int = 64) -> np.ndarray:
  """One uint8 image [size, size, 3] of class `spec` in `scene` (from `spec.sample_scene`)."""
  image = _background(scene["background"], size, rng)
  scale = (0.26 if scene["size"] == "small" else 0.4) * rng.uniform(0.9, 1.1)
  mask, u, v = _subject_mask(spec.subject, size, scale, rng)
  radius = scale * size
  colour = np.asarray(spec_lib.COLOURS[spec.colour], np.float32) + rng.normal(0, 10, 3)
  markings = _pattern_mask(spec.pattern, u, v, radius, rng) & mask
  image = paint(image, mask, markings, colour, v / radius)
  image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def paint(image, mask, markings, colour, v_scaled) -> np.ndarray:
  """`image` with the subject (`mask`) in `colour`, lit from above (`v_scaled`: the across
  coordinate over the subject's radius), and its `markings` in the marking shade."""
  subject = colour * (1.0 - 0.25 * np.clip(v_scaled, -1, 1)[..., None])
  # Markings are dark on light subjects and light on dark ones, so they show on every colour.
  marking_rgb = colour * 0.35 if colour.mean() > 110 else np.minimum(colour + 110, 255)
  subject = np.where(markings[..., None], marking_rgb, subject)
  return np.where(mask[..., None], subject, image)
