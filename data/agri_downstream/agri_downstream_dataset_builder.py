"""agri_downstream: the downstream agriculture tasks, one builder config per registry entry.

`--manual_dir` is one task's image folder: `<class>/<image>`, or `<split>/<class>/<image>`
with split folders named train / test / val(idation). Without split folders a stable
`test_fraction` of the images (by path hash) becomes `test`. An optional `classnames.json`
maps folder names to class names. Hidden entries (`.ipynb_checkpoints`, `._x.jpg`) and
macOS's `__MACOSX` are ignored; split folders beside other folders, and a class folder
without images, stop the build in one line. The task's prompt templates (registry.py) are
stored in the dataset's metadata, where the zero-shot evaluator finds them. Unreadable images
are skipped, counted and listed in `build_report.json`.

  python -m agriclip_jax.input.prepare agri_downstream/banana_deficiency --manual_dir=DIR
"""

import dataclasses
import os

from absl import logging
import tensorflow_datasets as tfds

try:  # As data.agri_downstream in the project; top-level under `tfds build`.
  from data import builder_utils
  from data.agri_downstream import registry
except ImportError:
  import builder_utils  # pylint: disable=import-error
  from agri_downstream import registry  # pylint: disable=import-error

SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "val": "validation", "valid": "validation", "validation": "validation"}


@dataclasses.dataclass
class DownstreamConfig(tfds.core.BuilderConfig):
  task: registry.Task | None = None
  test_fraction: float = 0.2  # Used only when the folders give no split.


class Builder(builder_utils.ReportedBuild, tfds.core.GeneratorBasedBuilder):
  """An image-classification task from an ImageFolder tree, with its prompt templates."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [DownstreamConfig(name=t.name, description=t.title, task=t)
                     for t in registry.TASKS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Point --manual_dir at the task's folder: <class>/<image> or <split>/<class>/<image>, with an
  optional classnames.json mapping folder names to class names.
  """

  def __init__(self, **kwargs):
    kwargs["file_format"] = kwargs.get("file_format") or "array_record"  # Random access.
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    task = self.builder_config.task
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_path": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=task.class_names),
            "class_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(prompt_templates=list(task.templates),
                                        title=task.title, domain=task.domain),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(root):
      raise builder_utils.InputError(f"manual directory {root} does not exist")
    folders = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not builder_utils.is_hidden(d))
    split_folders = [f for f in folders if f.lower() in SPLIT_FOLDERS]
    layout = {SPLIT_FOLDERS[f.lower()]: f for f in split_folders} or None  # None: hash split.
    if split_folders and (len(split_folders) < len(folders) or len(layout) < len(split_folders)):
      raise builder_utils.InputError(
          f"{root}: ambiguous layout: split folders {split_folders} beside "
          f"{sorted(set(folders) - set(split_folders)) or 'each other'}; keep one folder per "
          "split (train, test, val), or only class folders")
    class_dirs = _class_folders(root, layout)
    mapping_path = os.path.join(root, "classnames.json")
    mapping = builder_utils.load_json(mapping_path) if os.path.exists(mapping_path) else {}
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
      raise builder_utils.InputError(f"{mapping_path}: expected an object mapping folder names "
                                     "to class names")
    names = {d: mapping.get(d, d) for d in class_dirs}
    self._check_classes(sorted(set(names.values())))
    label_names = self.info.features["label"].names
    label_of = {d: label_names.index(n) for d, n in names.items()}
    if layout:
      return {split: self._generate_examples(root, [folder], label_of, split, None)
              for split, folder in layout.items()}
    fraction = self.builder_config.test_fraction
    splits = {builder_utils.split_of(path, "test", fraction)
              for path in builder_utils.walk_images(root)}
    if "test" not in splits:
      logging.warning("%s: no image falls in the test split (test_fraction=%s)",
                      self.builder_config.name, fraction)
    return {split: self._generate_examples(root, [""], label_of, split, fraction)
            for split in sorted(splits)}

  def _check_classes(self, found: list[str]) -> None:
    task, label = self.builder_config.task, self.info.features["label"]
    if not found:
      raise builder_utils.InputError(f"{task.title}: no class folders in the manual directory")
    if task.num_classes and len(found) != task.num_classes:
      raise builder_utils.InputError(f"{task.title} has {task.num_classes} classes; the folders "
                                     f"give {len(found)}: {found}")
    if task.class_names:
      unknown = sorted(set(found) - set(task.class_names))
      if unknown:
        raise builder_utils.InputError(f"{task.title}: folders {unknown} are not among the "
                                       f"task's classes {list(task.class_names)} (map them in "
                                       "classnames.json)")
    else:
      label.names = found

  def _generate_examples(self, root, split_dirs, label_of, split, hash_fraction):
    label_names = self.info.features["label"].names
    for split_dir in split_dirs:
      for relative in builder_utils.walk_images(os.path.join(root, split_dir)):
        path = os.path.join(split_dir, relative)
        class_dir = relative.split(os.sep)[0]
        if class_dir not in label_of:
          self._report.skip(split, "not in a class folder", path)
          continue
        if hash_fraction is not None and builder_utils.split_of(
            path, "test", hash_fraction) != split:
          continue
        try:
          image = builder_utils.read_image(os.path.join(root, path))
        except (OSError, builder_utils.BadImage) as e:
          self._report.skip(split, "unreadable image", path, str(e))
          continue
        self._report.count(split)
        label = label_of[class_dir]
        yield path, {"image": image, "image_path": path, "label": label,
                     "class_name": label_names[label]}


def _class_folders(root: str, layout: dict[str, str] | None) -> list[str]:
  """The class folders of every split. One that holds no image in any split is refused: it
  would silently become a class without examples (a distractor in zero-shot, a dead output
  in the probes), and is more often a failed copy than a real empty class."""
  has_image = {}
  for split_dir in (layout or {"": ""}).values():
    for name in os.listdir(os.path.join(root, split_dir)):
      path = os.path.join(root, split_dir, name)
      if os.path.isdir(path) and not builder_utils.is_hidden(name):
        found = next(builder_utils.walk_images(path), None) is not None
        has_image[name] = has_image.get(name, False) or found
  empty = sorted(name for name, found in has_image.items() if not found)
  if empty:
    raise builder_utils.InputError(f"{root}: class folders {empty} hold no image; add their "
                                   "images or remove the folders")
  return sorted(has_image)
