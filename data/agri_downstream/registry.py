"""The downstream agriculture tasks of the AgriCLIP evaluation, one entry each.

Add a task by adding a `Task` to TASKS: it becomes a builder config of `agri_downstream`
(`agri_downstream/<name>`) and its templates are what zero-shot evaluation prompts with.
`class_names` fixes the label order when the task's classes are known; otherwise they come
from the folder names (after the optional classnames.json mapping). `num_classes`, when
known, is checked at build time.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # Builder config name: lower_snake_case.
  title: str
  domain: str  # crop | livestock | fish
  templates: tuple[str, ...]  # Zero-shot prompt templates; "{}" is the class name.
  class_names: tuple[str, ...] | None = None
  num_classes: int | None = None


TASKS = (
    Task("acquarium_fish", "Acquarium Fish", "fish",
         ("a photo of a {}, an aquarium fish.", "a photo of {} swimming in an aquarium.")),
    Task("animal_2", "Animal-2", "livestock",
         ("a photo of a {}, a farm animal.", "a photo of a {} on a farm.")),
    Task("banana_deficiency", "Banana Deficiency", "crop",
         ("a photo of a banana leaf with {} deficiency.", "a banana leaf: {}."),
         class_names=("boron", "calcium", "healthy", "iron", "magnesium", "manganese",
                      "potassium", "sulphur", "zinc")),
    Task("bean_lesion", "Bean Lesion", "crop",
         ("a photo of a bean leaf with {}.", "a bean leaf showing {}.")),
    Task("chicken_fecus", "Chicken Fecus", "livestock",
         ("a photo of chicken droppings showing {}.", "poultry feces indicating {}.")),
    Task("cid", "CID", "livestock", ("a photo of {} cattle.", "a photo of cattle: {}.")),
    Task("citrus_fruits", "Citrus Fruits", "crop",
         ("a photo of a citrus fruit with {}.", "a photo of a {} citrus fruit.")),
    Task("citrus_leaves", "Citrus Leaves", "crop",
         ("a photo of a citrus leaf with {}.", "a citrus leaf affected by {}.")),
    Task("cow_breed", "Cow Breed", "livestock",
         ("a photo of a cow from {} breed.", "a photo of a {} cow."), num_classes=3),
    Task("deepfish", "DeepFish", "fish",
         ("an underwater photo of {}.", "a photo of a fish habitat with {}.")),
    Task("fish_freshness", "Fish Freshness", "fish",
         ("a photo of a {} fish.", "a photo of fish that looks {}.")),
    Task("fish_species", "Fish Species", "fish",
         ("a photo of a {}, a type of fish.", "a photo of the fish {}.")),
    Task("fruits_diseases", "Fruits Diseases", "crop",
         ("a photo of a fruit with {}.", "a photo of {} on a fruit.")),
    Task("horse_breed", "Horse Breed", "livestock",
         ("a photo of a {} horse.", "a photo of a horse of the {} breed.")),
    Task("supermarket_fish", "Supermarket Fish", "fish",
         ("a photo of {} fish at the supermarket.", "a photo of a {} for sale.")),
    Task("fishnet", "FishNet", "fish",
         ("a photo of a {}, a type of fish.", "a photo of the fish {}.")),
    Task("soybean_weeds", "Soybean Weeds", "crop",
         ("a photo of {} in a soybean field.", "a field photo of {} among soybeans."),
         num_classes=4),
)

BY_NAME = {task.name: task for task in TASKS}


def select(tasks: str) -> list[str]:
  """Task names joined by "+" ("" = all of them), each checked against the registry.

  "+", not ",": a config's options (`configs/eval_suite.py:tasks=a+b,demo`) are separated by
  commas, so a comma would start the next option.
  """
  names = [t.strip() for t in tasks.split("+") if t.strip()] or [t.name for t in TASKS]
  unknown = [t for t in names if t not in BY_NAME]
  if unknown:
    raise ValueError(f"unknown downstream tasks {unknown}; the registry has {sorted(BY_NAME)}")
  return names
