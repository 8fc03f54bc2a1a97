"""`agri_synthetic/fine`: classes that differ in local structure only, as AgriCLIP's
fine-grained tasks do (lesion types, nutrient deficiencies, breeds).

Within a subject every class draws its colour from one distribution and its markings take that
colour's marking shade, so colour says nothing about the class. A class is a subject with a
marking shape (round spots, ring spots, streaks, blotches), a marking density (sparse, dense)
and an outline (smooth, jagged): 4 x 4 x 2 x 2 = 64 classes. Twelve are held out of training;
each of their words occurs in training in other combinations. Captions name the details.
"""

import dataclasses
import itertools

import numpy as np

from . import render
from . import spec as coarse

SUBJECT_COLOUR = {"leaf": "green", "fruit": "red", "fish": "white", "cattle": "brown"}
MARKINGS = {  # name in class names -> phrase in captions
    "round-spotted": "round spots",
    "ring-spotted": "ring-shaped spots",
    "streaked": "thin streaks",
    "blotched": "irregular blotches",
}
DENSITIES = {"sparsely": "a few", "densely": "many"}
EDGES = {"smooth-edged": "a smooth outline", "jagged-edged": "a jagged, notched outline"}

_LATIN_MARKING = {"round-spotted": "Orbi", "ring-spotted": "Anuli", "streaked": "Lineo",
                  "blotched": "Macul"}
_LATIN_DENSITY = {"sparsely": "rara", "densely": "densa"}
_LATIN_EDGE = {"smooth-edged": "integra", "jagged-edged": "serrata"}
_MARKING_GROUP = {"round-spotted": "Punct", "ring-spotted": "Punct", "streaked": "Stri",
                  "blotched": "Stri"}


@dataclasses.dataclass(frozen=True)
class FineClassSpec:
  label: int
  subject: str
  marking: str
  density: str
  edge: str
  held_out: bool

  @property
  def name(self) -> str:
    return f"{self.density} {self.marking} {self.edge} {self.subject}"

  @property
  def domain(self) -> str:
    return coarse.SUBJECTS[self.subject][0]

  @property
  def colour(self) -> str:
    return SUBJECT_COLOUR[self.subject]

  @property
  def taxonomy(self) -> dict[str, str]:
    kingdom, phylum, klass, order = coarse._HIGHER_RANKS[self.subject]  # pylint: disable=protected-access
    suffix = coarse._LATIN_SUBJECT[self.subject]  # pylint: disable=protected-access
    genus = _LATIN_MARKING[self.marking] + suffix
    return dict(
        kingdom=kingdom, phylum=phylum, order=order, genus=genus,
        family=_MARKING_GROUP[self.marking] + suffix + "aceae",
        species=f"{genus} {_LATIN_DENSITY[self.density]}-{_LATIN_EDGE[self.edge]}",
        **{"class": klass})


def _is_held_out(si: int, mi: int, di: int, ei: int) -> bool:
  # 12 of 64: three (subject, marking) pairs per subject lose one (density, edge) variant, and
  # within each subject the held-out classes include both densities and both outlines.
  return (si + mi) % 4 != 3 and (di * 2 + ei) == (si + 3 * mi) % 4


def classes() -> list[FineClassSpec]:
  """All classes, in label order."""
  out = []
  for (si, subject), (mi, marking), (di, density), (ei, edge) in itertools.product(
      enumerate(coarse.SUBJECTS), enumerate(MARKINGS), enumerate(DENSITIES),
      enumerate(EDGES)):
    out.append(FineClassSpec(len(out), subject, marking, density, edge,
                             _is_held_out(si, mi, di, ei)))
  return out


# Training captions. Fields: subject, marking, marking_phrase, density, density_phrase,
# edge, edge_phrase, context, size, background, species.
CAPTION_TEMPLATES = (
    "a photo of a {size} {density} {marking} {edge} {subject} on {background}.",
    "a {subject} with {density_phrase} {marking_phrase} and {edge_phrase}.",
    "{context} image: a {edge} {subject}, {density} {marking}.",
    "a {size} {subject} showing {density_phrase} {marking_phrase}, seen against {background}.",
    "{species}, a {density} {marking} {edge} {subject}.",
)


def captions(spec: FineClassSpec, size: str, background: str) -> list[str]:
  fields = dict(
      subject=spec.subject, marking=spec.marking, marking_phrase=MARKINGS[spec.marking],
      density=spec.density, density_phrase=DENSITIES[spec.density], edge=spec.edge,
      edge_phrase=EDGES[spec.edge], context=coarse.SUBJECTS[spec.subject][1], size=size,
      background=background, species=spec.taxonomy["species"])
  return [t.format(**fields) for t in CAPTION_TEMPLATES]


def _markings(spec: FineClassSpec, u, v, r, rng) -> np.ndarray:
  """Where the class's markings lie (subject coordinates u along, v across)."""
  count = rng.integers(3, 6) if spec.density == "sparsely" else rng.integers(10, 15)
  out = np.zeros(u.shape, bool)
  for _ in range(count):
    su, sv = rng.uniform(-0.8, 0.8) * r, rng.uniform(-0.35, 0.35) * r
    d2 = (u - su) ** 2 + (v - sv) ** 2
    if spec.marking == "round-spotted":
      out |= d2 < (rng.uniform(0.09, 0.13) * r) ** 2
    elif spec.marking == "ring-spotted":
      outer = rng.uniform(0.14, 0.18) * r
      out |= (d2 < outer ** 2) & (d2 > (0.55 * outer) ** 2)
    elif spec.marking == "streaked":
      out |= ((u - su) / (0.3 * r)) ** 2 + ((v - sv) / (0.04 * r)) ** 2 < 1
    elif spec.marking == "blotched":  # Three overlapping discs of different sizes.
      for _ in range(3):
        du, dv = rng.uniform(-0.12, 0.12, 2) * r
        out |= (u - su - du) ** 2 + (v - sv - dv) ** 2 < (rng.uniform(0.05, 0.11) * r) ** 2
    else:
      raise ValueError(f"unknown marking {spec.marking!r}")
  return out


def _jagged(mask: np.ndarray, centre, teeth: int, phase: float, depth: int) -> np.ndarray:
  """`mask` with notches cut into its outline: border pixels (within `depth` of the
  outside) are removed in `teeth` angular sectors around `centre`."""
  interior = mask.copy()
  for axis in (0, 1):
    for shift in (-depth, depth):
      interior &= np.roll(mask, shift, axis=axis)
  ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
  notch = np.sin(teeth * (np.arctan2(ys - centre[0], xs - centre[1]) + phase)) > 0.2
  return mask & ~(~interior & notch)


def render_fine(spec: FineClassSpec, scene: dict, rng: np.random.Generator,
                size: int = 64) -> np.ndarray:
  """One uint8 image [size, size, 3] of class `spec` in `scene`.

  The random draws come in the same order for every class, so two classes of a subject
  rendered from the same generator state differ only where their structure does."""
  image = render._background(scene["background"], size, rng)  # pylint: disable=protected-access
  scale = (0.26 if scene["size"] == "small" else 0.4) * rng.uniform(0.9, 1.1)
  mask, u, v = render._subject_mask(spec.subject, size, scale, rng)  # pylint: disable=protected-access
  radius = scale * size
  colour = np.asarray(coarse.COLOURS[spec.colour], np.float32) + rng.normal(0, 14, 3)
  teeth, phase = int(rng.integers(9, 13)), rng.uniform(0, 2 * np.pi)
  noise = rng.normal(0.0, 4.0, image.shape).astype(np.float32)
  marking_rng = np.random.default_rng(rng.integers(2**32))  # Classes draw different counts.
  if spec.edge == "jagged-edged":
    ys, xs = np.nonzero(mask)
    mask = _jagged(mask, (ys.mean(), xs.mean()), teeth, phase, depth=max(2, size // 24))
  markings = _markings(spec, u, v, radius, marking_rng) & mask
  image = render.paint(image, mask, markings, colour, v / radius) + noise
  return np.clip(image, 0, 255).astype(np.uint8)
