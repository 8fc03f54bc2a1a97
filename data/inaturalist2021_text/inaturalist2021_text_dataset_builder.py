"""inaturalist2021_text: iNaturalist-2021 as image-text pairs built from its taxonomy.

The manual directory holds the official files: `train.json`, `train_mini.json` and/or
`val.json`, and the images either extracted (at the paths the JSON's `file_name` gives) or as
the released `train.tar.gz` / `train_mini.tar.gz` / `val.tar.gz`, read without extracting.
One split per JSON present: `train`, `train_mini`, `val`.

Each example carries the image, its species label, every taxonomy field, and six texts:
scientific ("a photo of Danaus plexippus."), common, taxonomic (kingdom ... epithet),
scientific + common, taxonomic + common ("... with common name monarch butterfly.") and the
LiT-species form "<common name> <supercategory> <genus>". A missing common name falls back to
the scientific name. The annotation files are streamed, so memory stays flat however many
images there are; images that are missing or do not decode, and malformed image or annotation
records, are skipped, counted and listed in `build_report.json`.
"""

import collections
import dataclasses
import os
import posixpath
import sqlite3
import tarfile

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

try:  # As data.inaturalist2021_text in the project; top-level under `tfds build`.
  from data import builder_utils
except ImportError:
  import builder_utils  # pylint: disable=import-error

SPLITS = ("train", "train_mini", "val")
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "specific_epithet")
TAXONOMY_FIELDS = RANKS + ("name", "common_name", "supercategory")
TEXT_TYPES = ("scientific", "common", "taxonomic", "scientific_common", "taxonomic_common",
              "lit_species")


def class_texts(category: dict) -> dict[str, str]:
  """Per text type, the name of a species (what prompts wrap, and captions build on)."""
  scientific = category.get("name") or f"{category['genus']} {category['specific_epithet']}"
  common = (category.get("common_name") or "").strip() or scientific
  taxonomic = " ".join(category[rank] for rank in RANKS)
  return {
      "scientific": scientific,
      "common": common,
      "taxonomic": taxonomic,
      "scientific_common": f"{scientific} with common name {common}",
      "taxonomic_common": f"{taxonomic} with common name {common}",
      "lit_species": f"{common} {category['supercategory']} {category['genus']}",
  }


def captions(category: dict) -> dict[str, str]:
  """The six training texts of an image of `category`."""
  names = class_texts(category)
  out = {k: f"a photo of {v}." for k, v in names.items()}
  out["lit_species"] = names["lit_species"]  # Used as is (LiT species recipe).
  return out


@dataclasses.dataclass
class INatConfig(tfds.core.BuilderConfig):
  pass


class Builder(builder_utils.ReportedBuild, tfds.core.GeneratorBasedBuilder):
  """iNaturalist-2021 images with taxonomy captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put the iNaturalist-2021 files in --manual_dir: train.json / train_mini.json / val.json and
  either the extracted image folders or the .tar.gz archives.
  """

  def __init__(self, **kwargs):
    kwargs["file_format"] = kwargs.get("file_format") or "array_record"  # Random access.
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "file_name": text(),
            "label": tfds.features.ClassLabel(),  # Species; names set at build time.
            "taxonomy": tfds.features.FeaturesDict({k: text() for k in TAXONOMY_FIELDS}),
            "texts": tfds.features.FeaturesDict({k: text() for k in TEXT_TYPES}),
        }),
        metadata=tfds.core.MetadataDict(prompt_templates=["a photo of {}."]),
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    present = [s for s in SPLITS if os.path.exists(os.path.join(manual_dir, f"{s}.json"))]
    if not present:
      raise builder_utils.InputError(f"{manual_dir} has none of {[s + '.json' for s in SPLITS]}")
    indexes = {s: _SplitIndex(os.path.join(manual_dir, f"{s}.json"), self._scratch,
                              self._report, s) for s in present}
    categories = indexes[present[0]].categories
    for split, index in indexes.items():
      if [c["id"] for c in index.categories] != [c["id"] for c in categories]:
        raise builder_utils.InputError(f"{split}.json lists other categories than "
                                       f"{present[0]}.json")
    self.info.features["label"].names = [c["name"] for c in categories]
    self.info.metadata["class_texts"] = {
        kind: [class_texts(c)[kind] for c in categories] for kind in TEXT_TYPES}
    self.info.metadata["taxonomy_ranks"] = list(RANKS[:-1]) + ["name"]  # ... genus, species
    self.info.metadata["class_taxonomy"] = [
        {rank: str(c.get(rank) or "") for rank in self.info.metadata["taxonomy_ranks"]}
        for c in categories]
    return {split: self._generate_examples(manual_dir, split, index, categories)
            for split, index in indexes.items()}

  def _generate_examples(self, manual_dir, split, index, categories):
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    by_id = {c["id"]: c for c in categories}
    archive = os.path.join(manual_dir, f"{split}.tar.gz")
    extracted = not os.path.exists(archive) or os.path.isdir(os.path.join(manual_dir, split))
    for file_name, image_id, category_id, load in (
        index.from_folder(manual_dir) if extracted else index.from_archive(archive)):
      if image_id is None:
        self._report.skip(split, "not in annotations", file_name, f"{split}.tar.gz member")
        continue
      if category_id is None:
        self._report.skip(split, "no annotation", file_name)
        continue
      if category_id not in by_id:
        self._report.skip(split, "unknown category", file_name,
                          f"{split}.json: category_id {category_id} is not among its categories")
        continue
      try:
        image = builder_utils.checked_image(load())
      except FileNotFoundError:
        self._report.skip(split, "missing file", file_name)
        continue
      except (OSError, builder_utils.BadImage) as e:
        self._report.skip(split, "unreadable image", file_name, str(e))
        continue
      category = by_id[category_id]
      self._report.count(split)
      yield file_name, {
          "image": image, "image_id": image_id, "file_name": file_name,
          "label": label_of[category_id],
          "taxonomy": {k: str(category.get(k) or "") for k in TAXONOMY_FIELDS},
          "texts": captions(category)}
    if not extracted:
      for file_name in index.unseen():
        self._report.skip(split, "missing file", file_name, f"not in {split}.tar.gz")


# The fields read from each record of an annotation file's arrays, and their types.
RECORD_FIELDS = {"images": (("id", int), ("file_name", str)),
                 "annotations": (("image_id", int), ("category_id", int))}
LOGGED_BAD_RECORDS = 20  # Then only counted in the log; all are listed in build_report.json.


def record_fields(item, fields) -> tuple:
  """The values of `fields` ((name, type), ...) of one record; ValueError says what is wrong."""
  if not isinstance(item, dict):
    raise ValueError(f"not an object but {type(item).__name__}")
  values = []
  for field, kind in fields:
    if field not in item:
      raise ValueError(f"no {field!r}")
    value = item[field]
    if kind is str:
      ok = isinstance(value, str) and value
    else:  # An integer, or its digits as a string.
      ok = (isinstance(value, int) and not isinstance(value, bool) or
            isinstance(value, str) and value.strip().lstrip("-").isdigit())
    if not ok:
      raise ValueError(f"{field!r} is {value!r}, not {'a path' if kind is str else 'an integer'}")
    values.append(kind(value))
  return tuple(values)


class _SplitIndex:
  """One annotation file streamed into SQLite: images, their categories, the categories.

  A malformed image or annotation record (a field missing or of the wrong type) is skipped,
  listed in the build report by file and position (`val.json annotations[3]`) and logged; so
  is an image record repeating an earlier one's id or file name (the first is kept).
  """

  def __init__(self, json_path: str, scratch: str, report: builder_utils.Report, split: str):
    name = os.path.splitext(os.path.basename(json_path))[0]
    self.db = sqlite3.connect(os.path.join(scratch, f"{name}.sqlite"), check_same_thread=False)
    self.db.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, file_name TEXT UNIQUE, "
                    "seen INTEGER DEFAULT 0)")
    self.db.execute("CREATE TABLE annotations (image_id INTEGER PRIMARY KEY, category_id INTEGER)")
    self.categories, images, annotations = [], [], []
    logging.info("Indexing %s ...", json_path)
    position, bad = collections.Counter(), 0
    for key, item in builder_utils.stream_json_object(json_path):
      position[key] += 1
      if key in RECORD_FIELDS:
        try:
          (images if key == "images" else annotations).append(
              record_fields(item, RECORD_FIELDS[key]))
        except ValueError as e:
          record = f"{json_path} {key}[{position[key] - 1}]"
          if isinstance(item, dict) and "id" in item:
            record += f" (id {item['id']!r})"
          report.skip(split, "malformed record", record, str(e))
          bad += 1
          if bad <= LOGGED_BAD_RECORDS:
            logging.warning("%s: %s; skipped", record, e)
      elif key == "categories":
        self.categories.append(item)
      if len(images) >= 50_000:
        self._insert_images(images, json_path, report, split)
        images = []
      if len(annotations) >= 50_000:
        self.db.executemany("INSERT OR REPLACE INTO annotations VALUES (?, ?)", annotations)
        annotations = []
    self._insert_images(images, json_path, report, split)
    self.db.executemany("INSERT OR REPLACE INTO annotations VALUES (?, ?)", annotations)
    self.db.commit()
    if bad > LOGGED_BAD_RECORDS:
      logging.warning("%s: %d malformed records skipped in all (each is listed in the build "
                      "report)", json_path, bad)
    if not self.categories:
      raise builder_utils.InputError(f"{json_path}: no categories")
    for i, category in enumerate(self.categories):  # The labels: a bad one stops the build.
      if not isinstance(category, dict):
        raise builder_utils.InputError(f"{json_path} categories[{i}]: not an object")
      missing = [f for f in TAXONOMY_FIELDS + ("id",) if f not in category
                 and f != "common_name"]
      if missing:
        raise builder_utils.InputError(f"{json_path} categories[{i}]: category "
                                       f"{category.get('id')} lacks fields {missing}")
    self.categories.sort(key=lambda c: c["id"])

  def _insert_images(self, images, json_path: str, report, split: str) -> None:
    """Adds (id, file_name) records; each repeating a stored id or file name is reported."""
    inserted = self.db.executemany(
        "INSERT OR IGNORE INTO images (id, file_name) VALUES (?, ?)", images).rowcount
    if inserted == len(images):
      return
    kept = set()  # Records found stored: the first of each stays, later equal ones repeat it.
    for image_id, file_name in images:
      row = self.db.execute("SELECT file_name FROM images WHERE id = ?", (image_id,)).fetchone()
      if row is not None and row[0] == file_name and image_id not in kept:
        kept.add(image_id)
        continue
      record = f"{json_path} images (id {image_id}, {file_name!r})"
      report.skip(split, "duplicate record", record, "repeats an earlier image's id or file name")
      logging.warning("%s repeats an earlier image's id or file name; skipped", record)

  def _lookup(self):
    return ("SELECT images.id, annotations.category_id FROM images LEFT JOIN annotations "
            "ON images.id = annotations.image_id WHERE images.file_name = ?")

  def from_folder(self, root: str):
    rows = self.db.execute("SELECT images.file_name, images.id, annotations.category_id "
                           "FROM images LEFT JOIN annotations ON images.id = "
                           "annotations.image_id ORDER BY images.id")
    for file_name, image_id, category_id in rows:
      path = os.path.join(root, file_name)
      yield file_name, image_id, category_id, lambda path=path: open(path, "rb").read()

  def from_archive(self, archive: str):
    """Streams the archive once; a member the JSON does not list comes with image_id None."""
    with tarfile.open(archive, "r|gz") as tar:
      for member in tar:
        if not member.isfile():
          continue
        name = posixpath.normpath(member.name)  # `tar -C dir .` writes "./train/...".
        row = self.db.execute(self._lookup(), (name,)).fetchone()
        if row is None:
          yield name, None, None, None
          continue
        self.db.execute("UPDATE images SET seen = 1 WHERE id = ?", (row[0],))
        data = tar.extractfile(member).read()
        yield name, row[0], row[1], lambda data=data: data

  def unseen(self):
    """Images the JSON lists that `from_archive` never met."""
    for (file_name,) in self.db.execute("SELECT file_name FROM images WHERE seen = 0 "
                                        "ORDER BY id"):
      yield file_name
