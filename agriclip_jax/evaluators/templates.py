"""Named prompt-template sets for zero-shot evaluation (written for this project).

A zero-shot evaluator's `templates` may name a set here instead of listing templates.
"""

from agriclip_jax import config_lib

SETS = {
    "photo": ("a photo of a {}.",),
    # For species (iNaturalist): varied photo conditions, as field observers take them.
    "species": (
        "a photo of {}.",
        "a close-up photo of {}.",
        "a blurry photo of {}.",
        "a bright photo of {}.",
        "a dark photo of {}.",
        "a cropped photo of {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "a photo of {} in the wild.",
        "a photo of {} in its natural habitat.",
        "a field photo of {}.",
        "an observation photo of {}.",
        "a nature photo of {}.",
        "a low-resolution photo of {}.",
        "a photo of {} taken from far away.",
        "a photo of a young {}.",
        "a photo of {} seen from above.",
        "a photo of {} seen from the side.",
        "an iNaturalist photo of {}.",
        "a wildlife photo of {}.",
    ),
}


def resolve(templates) -> tuple[str, ...] | None:
  """A set's name -> its templates; a list of templates -> itself; "" or None -> None."""
  if isinstance(templates, str) and templates:
    if templates not in SETS:
      raise config_lib.ConfigError(f"unknown template set {templates!r}; sets: {sorted(SETS)}")
    return SETS[templates]
  return tuple(templates) if templates else None
