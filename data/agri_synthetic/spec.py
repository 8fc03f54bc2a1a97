"""What `agri_synthetic` contains: classes, their attributes, taxonomy and captions.

A class is a (subject, colour, pattern) triple, e.g. "yellow spotted leaf". Twelve triples are
held out of training entirely; every colour, pattern and subject word of a held-out class is
seen in training in other combinations, so a model that learns the words can name the unseen
class zero-shot. Everything here is deterministic and free of randomness except the functions
that take an `rng`.
"""

import dataclasses
import itertools

import numpy as np

# Subject -> (ALive-style domain, a dataset-level context used in captions).
SUBJECTS = {
    "leaf": ("crop", "crop leaf"),
    "fruit": ("crop", "orchard fruit"),
    "fish": ("fish", "fish"),
    "cattle": ("livestock", "livestock"),
}
DOMAINS = ("crop", "fish", "livestock")

COLOURS = {  # name -> mean RGB
    "red": (200, 40, 40),
    "yellow": (230, 205, 40),
    "green": (50, 165, 60),
    "brown": (125, 75, 35),
    "white": (238, 238, 232),
    "purple": (130, 55, 165),
}
PATTERNS = {  # name -> phrase used in captions
    "plain": "without markings",
    "spotted": "covered in spots",
    "striped": "marked with stripes",
}
SIZES = ("small", "large")
BACKGROUNDS = {  # subject -> background names the renderer knows
    "leaf": ("dark soil", "green grass"),
    "fruit": ("dark soil", "a wooden table"),
    "fish": ("clear water", "murky water"),
    "cattle": ("a pasture", "a dusty yard"),
}

# Made-up Latin for the synthetic taxonomy: genus = subject + colour, species = + pattern.
_LATIN_COLOUR = {"red": "Rubro", "yellow": "Flavo", "green": "Viridi", "brown": "Fusco",
                 "white": "Albo", "purple": "Purpureo"}
_LATIN_SUBJECT = {"leaf": "phyllum", "fruit": "carpus", "fish": "ichthys", "cattle": "bos"}
_LATIN_PATTERN = {"plain": "laevis", "spotted": "maculatus", "striped": "striatus"}
_COLOUR_GROUP = {"red": "Calid", "yellow": "Calid", "green": "Frigid", "purple": "Frigid",
                 "brown": "Terr", "white": "Terr"}
_HIGHER_RANKS = {  # subject -> (kingdom, phylum, class, order)
    "leaf": ("Plantae", "Tracheophyta", "Magnoliopsida", "Foliales"),
    "fruit": ("Plantae", "Tracheophyta", "Magnoliopsida", "Fructales"),
    "fish": ("Animalia", "Chordata", "Actinopterygii", "Pisciformes"),
    "cattle": ("Animalia", "Chordata", "Mammalia", "Artiodactyla"),
}
TAXONOMY_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  label: int
  subject: str
  colour: str
  pattern: str
  held_out: bool

  @property
  def name(self) -> str:
    return f"{self.colour} {self.pattern} {self.subject}"

  @property
  def domain(self) -> str:
    return SUBJECTS[self.subject][0]

  @property
  def taxonomy(self) -> dict[str, str]:
    kingdom, phylum, klass, order = _HIGHER_RANKS[self.subject]
    suffix = _LATIN_SUBJECT[self.subject]
    genus = _LATIN_COLOUR[self.colour] + suffix
    return dict(
        kingdom=kingdom, phylum=phylum, order=order, genus=genus,
        family=_COLOUR_GROUP[self.colour] + suffix + "aceae",
        species=f"{genus} {_LATIN_PATTERN[self.pattern]}",
        **{"class": klass})


def _is_held_out(subject_index: int, colour_index: int, pattern_index: int) -> bool:
  # Six (subject, colour) pairs, one per colour, keep one pattern in training and hold out the
  # other two: 12 classes. Telling a held-out class from its pair-mate takes the pattern, and
  # every subject, colour and pattern word still occurs in training captions.
  total = subject_index + colour_index
  return total % 4 == 0 and pattern_index != total % len(PATTERNS)


def classes() -> list[ClassSpec]:
  """All classes, in label order."""
  out = []
  for (si, subject), (ci, colour), (pi, pattern) in itertools.product(
      enumerate(SUBJECTS), enumerate(COLOURS), enumerate(PATTERNS)):
    out.append(ClassSpec(len(out), subject, colour, pattern, _is_held_out(si, ci, pi)))
  return out


# Zero-shot prompt templates (class name goes in the braces).
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a picture of a {}, a kind of crop, fish or livestock.",
)

# Caption templates for training pairs. Fields: colour, pattern, pattern_phrase, subject,
# context, size, background, genus, species.
CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {pattern} {subject} on {background}.",
    "a {colour} {subject} {pattern_phrase}.",
    "{context} image: a {pattern} {colour} {subject}.",
    "a {size} {subject} that is {colour} and {pattern}, seen against {background}.",
    "{species}, a {colour} {pattern} {subject}.",
)


def captions(spec: ClassSpec, size: str, background: str) -> list[str]:
  fields = dict(
      colour=spec.colour, pattern=spec.pattern, pattern_phrase=PATTERNS[spec.pattern],
      subject=spec.subject, context=SUBJECTS[spec.subject][1], size=size,
      background=background, genus=spec.taxonomy["genus"], species=spec.taxonomy["species"])
  return [t.format(**fields) for t in CAPTION_TEMPLATES]


def sample_scene(spec: ClassSpec, rng: np.random.Generator) -> dict:
  """Per-image nuisance factors that the renderer draws and the captions mention."""
  return dict(size=SIZES[rng.integers(len(SIZES))],
              background=BACKGROUNDS[spec.subject][rng.integers(2)])
